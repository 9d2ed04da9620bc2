"""SFT: the loss sees response tokens only; packing; a tiny run with reward-based selection and LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from palate.data.formats import SFTExample
from palate.lm.formatting import format_prompt
from palate.lm.models import load_model
from palate.lm.sft import SFTConfig, encode_example, pack_examples, sft_loss_sums, train_sft
from palate.lm.testing import tiny_causal_lm, tiny_tokenizer


def test_no_prompt_token_is_a_target() -> None:
    tok = tiny_tokenizer()
    ex = SFTExample(prompt="List three colours:", completion="red, green, blue.")
    enc = encode_example(tok, ex, chat=True, max_length=128)
    n_prompt = len(tok(format_prompt(tok, ex.prompt, True), add_special_tokens=False)["input_ids"])
    assert enc["labels"][:n_prompt] == [-100] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert enc["labels"][-1] == tok.eos_token_id

    # The loss does not depend on the logits at positions that predict prompt tokens.
    labels = torch.tensor([enc["labels"]])
    torch.manual_seed(0)
    logits = torch.randn(1, len(enc["input_ids"]), len(tok), requires_grad=True)
    loss_sum, n = sft_loss_sums(logits, labels)
    loss_sum.backward()
    assert int(n) == len(enc["input_ids"]) - n_prompt
    # Position t predicts token t+1: positions 0..n_prompt-2 predict prompt tokens.
    assert torch.count_nonzero(logits.grad[0, : n_prompt - 1]) == 0
    assert torch.count_nonzero(logits.grad[0, n_prompt - 1:-1].abs().sum(-1)) == int(n)


def test_chat_messages_train_on_the_last_assistant_turn_only() -> None:
    tok = tiny_tokenizer()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "List colours"}, {"role": "assistant", "content": "red, blue."}]
    enc = encode_example(tok, SFTExample(prompt=None, completion="red, blue.", messages=messages), True, 256)
    targets = [t for t in enc["labels"] if t != -100]
    assert tok.decode(targets) == "red, blue.<|im_end|>"


def test_packing_keeps_every_target_and_fills_blocks() -> None:
    tok = tiny_tokenizer()
    encs = [encode_example(tok, SFTExample(prompt=f"Prompt {i}", completion="The sea is blue."), False, 64)
            for i in range(6)]
    blocks = pack_examples(encs, max_length=32)
    assert all(len(b["input_ids"]) == 32 for b in blocks[:-1])
    assert sum(len(b["input_ids"]) for b in blocks) == sum(len(e["input_ids"]) for e in encs)
    assert sum(t != -100 for b in blocks for t in b["labels"]) == sum(t != -100 for e in encs for t in e["labels"])


@pytest.fixture()
def tiny_dir(tmp_path: Path) -> Path:
    model, tok = tiny_causal_lm()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_train_sft_writes_a_loadable_model_and_metrics(tiny_dir: Path, tmp_path: Path) -> None:
    from palate.lm.reward_model import RewardModel

    data = tmp_path / "demos.jsonl"
    with open(data, "w") as fh:
        for i in range(12):
            fh.write(json.dumps({"prompt": f"Review {i}: the film was", "response": " wonderful and happy."}) + "\n")
    model, tok = load_model(str(tiny_dir))
    RewardModel.from_causal_lm(model).save_pretrained(tmp_path / "rm", tokenizer=tok)
    run = train_sft(SFTConfig(model=str(tiny_dir), train_data=str(data), val_fraction=0.25, task="sentiment",
                              max_steps=3, batch_size=4, lr=1e-3, eval_every=2, use_lora=True, lora_r=4,
                              reward_model=str(tmp_path / "rm"), select_prompts=3, max_new_tokens=4,
                              runs_dir=str(tmp_path / "runs"), tensorboard=False))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*records)
    assert {"sft/loss", "sft/val_loss", "sft/val_ppl", "sft/val_reward", "charts/tokens_per_s"} <= keys
    losses = [r["sft/loss"] for r in records if "sft/loss" in r]
    assert losses[-1] < losses[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selected_step"] in (2, 3) and summary["chat"] is False
    loaded, _ = load_model(str(run))  # the merged model, a plain transformers model
    assert not any("lora_" in n for n, _ in loaded.named_parameters())
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "config.yaml").is_file()


def test_forward_loss_on_target_positions_only_equals_the_full_loss() -> None:
    """The head run only where targets are read gives the full-logits loss and gradients."""
    from palate.lm.sft import sft_forward_loss_sums
    from palate.lm.testing import tiny_causal_lm

    model, _tok = tiny_causal_lm()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # right padding
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, :2] = -100
    labels[2, :5] = -100
    labels[2, 6:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    loss_a, n_a = sft_forward_loss_sums(model, batch)
    grads_a = torch.autograd.grad(loss_a, list(model.parameters()))
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss_b, n_b = sft_loss_sums(logits, labels)
    grads_b = torch.autograd.grad(loss_b, list(model.parameters()))
    assert int(n_a) == int(n_b) == int((labels[:, 1:] != -100).sum()) == 5 + 7 + 1
    torch.testing.assert_close(loss_a, loss_b, atol=1e-4, rtol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)
