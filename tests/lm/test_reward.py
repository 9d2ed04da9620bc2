"""The reward model: the token it reads, its losses, normalisation, save/load and a tiny training run."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from palate.core.preference import pairwise_loss, ranking_loss
from palate.lm.formatting import encode_prompt_completion, pad_batch
from palate.lm.reward import RewardModel, collate_comparisons, comparison_loss, load_reward_model
from palate.lm.testing import tiny_causal_lm


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_causal_lm(seed=1)
    return RewardModel.from_causal_lm(model, chat=True, max_length=64), tokenizer


def _encoded(tokenizer, pairs):
    return [{k: e[k] for k in ("input_ids", "attention_mask")}
            for e in (encode_prompt_completion(tokenizer, p, c, True, 64) for p, c in pairs)]


def test_backbone_has_no_unembedding_and_head_is_scalar(tiny) -> None:
    rm, _ = tiny
    assert not any(n.startswith("lm_head") for n, _ in rm.backbone.named_parameters())
    assert rm.head.out_features == 1 and rm.head.in_features == rm.backbone.config.hidden_size


def test_head_reads_last_real_token_under_both_padding_sides(tiny) -> None:
    rm, tok = tiny
    rows = _encoded(tok, [("Write a poem", "The sea is blue."), ("Hi", "ok"), ("List colours", "red, green")])
    alone = torch.stack([rm(torch.tensor([r["input_ids"]]), torch.tensor([r["attention_mask"]]))[0] for r in rows])
    for side in ("left", "right"):
        batch = pad_batch(rows, tok.pad_token_id, padding_side=side)
        scores = rm(batch["input_ids"], batch["attention_mask"])
        assert torch.allclose(scores, alone, atol=1e-5), side
        # The head reads the final hidden state at the last real token, and nothing else.
        hidden = rm.backbone(input_ids=torch.tensor([rows[1]["input_ids"]])).last_hidden_state
        assert torch.allclose(rm.hidden_at_last_token(batch["input_ids"], batch["attention_mask"])[1],
                              hidden[0, -1], atol=1e-5)
        # Whatever sits in the padding does not change a score.
        noisy = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7)
        assert torch.allclose(rm(noisy, batch["attention_mask"]), scores, atol=1e-5)


def test_k_choose_2_loss_is_the_mean_of_its_pairwise_losses() -> None:
    torch.manual_seed(0)
    rewards = torch.randn(3, 4)
    ranks = torch.tensor([[2, 0, 3, 1], [0, 1, 1, 2], [1, 0, 0, 0]])  # ties in rows 2 and 3
    loss, _ = ranking_loss(rewards, ranks)
    per_prompt = []
    for b in range(3):
        pairs = [(i, j) for i, j in itertools.permutations(range(4), 2) if ranks[b, i] < ranks[b, j]]
        per_prompt.append(torch.stack([pairwise_loss(rewards[b, i], rewards[b, j]) for i, j in pairs]).mean())
    assert torch.allclose(loss, torch.stack(per_prompt).mean())
    # The batched version used by training (sums, for exact multi-process combination) agrees.
    items = [{"seqs": [{"input_ids": [1], "attention_mask": [1]}] * 4, "ranks": ranks[b].tolist(),
              "kind": "ranking", "best": -1, "labeller": ""} for b in range(3)]
    out = comparison_loss(rewards, collate_comparisons(items, 0))
    assert torch.allclose(out["loss_sum"] / out["n"], loss)
    # loss: pairwise weighs pairs, not prompts: the mean over all 6 + 5 + 3 pairs.
    flat = comparison_loss(rewards, collate_comparisons(items, 0), loss="pairwise")
    all_pairs = [pairwise_loss(rewards[b, i], rewards[b, j]) for b in range(3)
                 for i, j in itertools.permutations(range(4), 2) if ranks[b, i] < ranks[b, j]]
    assert int(flat["n"]) == len(all_pairs) == 6 + 5 + 3
    assert torch.allclose(flat["loss_sum"] / flat["n"], torch.stack(all_pairs).mean())


def test_best_of_k_loss_against_hand_values() -> None:
    rewards = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    batch = collate_comparisons([
        {"seqs": [{"input_ids": [1], "attention_mask": [1]}] * 3, "ranks": [0, 1, 1], "kind": "best_of_k",
         "best": 0, "labeller": ""},
        {"seqs": [{"input_ids": [1], "attention_mask": [1]}] * 2, "ranks": [1, 0], "kind": "best_of_k",
         "best": 1, "labeller": ""},
    ], 0)
    # Second prompt has K=2: its third reward is masked out of the softmax.
    hand0 = -(1.0 - math.log(math.exp(1.0) + math.exp(0.0) + math.exp(-1.0)))
    hand1 = -(0.5 - math.log(2 * math.exp(0.5)))
    out = comparison_loss(rewards, batch)
    assert out["n"] == 2
    assert abs(float(out["loss_sum"]) / 2 - (hand0 + hand1) / 2) < 1e-6
    assert abs(float(F.cross_entropy(torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([0]))) - hand0) < 1e-6


def test_normalisation_gives_mean_zero_std_one_and_round_trips(tiny, tmp_path: Path) -> None:
    rm, tok = tiny
    prompts = ["Write a poem", "Hi", "List colours", "Explain the sky"]
    completions = ["The sea is blue.", "ok", "red, green", "It scatters light."]
    raw = rm.score_texts(prompts, completions, tok, normalized=False)
    rm.set_normalization(raw)
    normed = rm.score_texts(prompts, completions, tok, batch_size=3)
    assert abs(float(normed.mean())) < 1e-5 and abs(float(normed.std()) - 1.0) < 1e-4
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    loaded, loaded_tok = load_reward_model(tmp_path / "rm")
    assert loaded.chat is True and loaded.max_length == 64
    assert torch.allclose(loaded.score_texts(prompts, completions, loaded_tok), normed, atol=1e-5)
    assert float(loaded.gain) == pytest.approx(float(rm.gain))


def test_train_reward_model_tiny_run(tmp_path: Path) -> None:
    from palate.data.tasks import load_task
    from palate.lm.reward import RMConfig, train_reward_model

    model, tok = tiny_causal_lm()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    task = load_task("sentiment")
    rng = np.random.default_rng(0)
    cands = ["It was wonderful, I loved it.", "It was awful and sad.", "It was fine.", "Terrible, bad."]

    def write(path: Path, prompts: list[str], labellers) -> None:
        with open(path, "w") as fh:
            for i, p in enumerate(prompts):
                for lab in labellers(i):
                    fh.write(json.dumps({"prompt": p, "completions": cands, "labeller": lab.name,
                                         "ranking": lab.compare(p, cands, rng)}) + "\n")

    train_labs = task.panel.train_labellers
    write(tmp_path / "train.jsonl", task.prompts("train")[:16], lambda i: [train_labs[i % len(train_labs)]])
    write(tmp_path / "val.jsonl", task.prompts("validation")[:4], lambda i: task.panel.labellers)
    run = train_reward_model(RMConfig(
        model=str(tmp_path / "tiny"), train_data=str(tmp_path / "train.jsonl"), val_data=str(tmp_path / "val.jsonl"),
        task="sentiment", max_steps=4, batch_size=4, lr=1e-3, eval_every=2, runs_dir=str(tmp_path / "runs"),
        tensorboard=False))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*records)
    for key in ("rm/loss", "rm/accuracy", "rm/val_accuracy", "rm/held_out_accuracy", "rm/val_ece",
                "rm/val_brier", "rm/val_accuracy/held_out", "rm/val_accuracy/optimist"):
        assert key in keys, key
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["held_out_labeller"] == "held_out"
    loaded, loaded_tok = load_reward_model(run)
    # Normalised on the validation completions: they now have mean 0 and std 1.
    val_prompt = task.prompts("validation")[0]
    scores = loaded.score_texts([val_prompt] * 4, cands, loaded_tok)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    assert summary["normalized_on"] == 4 * 4  # 4 prompts x 4 completions, each counted once
