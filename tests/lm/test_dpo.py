"""DPO on language models: the pairs it trains on, completion log-probabilities, and tiny training runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from palate.errors import CheckpointError, ConfigError, DataError
from palate.lm.dpo import DPOConfig, comparison_pairs, completion_logprobs, train_dpo
from palate.lm.formatting import encode_prompt_completion, pad_batch
from palate.lm.testing import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")

# The rule the data encodes: a completion with these words is better, so "good" beats "bad".
GOOD = ["It was wonderful, happy and good.", "Thank you, the best day ever.", "The actors were great."]
BAD = ["It was cold and bland.", "I did not like the food.", "The lazy dog."]
PROMPTS = ["The movie was", "Once upon a time", "I did not", "Write a short poem", "List three colours",
           "Explain why the sky", "The quick brown fox", "Thank you!"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    model, tok = tiny_causal_lm(seed=3)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _write(path: Path, prompts: list[str], labellers: list[str], shift: int = 0) -> Path:
    """Rankings of 2 good and 2 bad completions per prompt: the good ones tied first, the bad ones tied last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i, p in enumerate(prompts):
            good = [GOOD[(i + shift) % 3], GOOD[(i + shift + 1) % 3]]
            bad = [BAD[(i + shift) % 3], BAD[(i + shift + 2) % 3]]
            cands, ranks = [good[0], bad[0], good[1], bad[1]], [0, 1, 0, 1]
            for lab in labellers:
                fh.write(json.dumps({"prompt": p, "completions": cands, "ranking": ranks, "labeller": lab}) + "\n")
    return path


def _cfg(tmp_path: Path, tiny_dir: Path, **kw) -> DPOConfig:
    train = _write(tmp_path / "train.jsonl", PROMPTS, ["optimist"])
    val = _write(tmp_path / "val.jsonl", PROMPTS[:4], ["optimist", "held_out"], shift=1)
    base = dict(model=str(tiny_dir), train_data=str(train), val_data=str(val), task="sentiment", beta=0.5,
                lr=1e-3, batch_size=4, max_steps=6, eval_every=3, max_length=48, warmup_ratio=0.0,
                runs_dir=str(tmp_path / "runs"), tensorboard=False)
    base.update(kw)
    return DPOConfig(**base)


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_pairs_of_rankings_best_of_k_and_pairs_skip_ties() -> None:
    assert sorted(comparison_pairs([1, 3, 0, 2])) == [(0, 1), (0, 3), (2, 0), (2, 1), (2, 3), (3, 1)]
    assert len(comparison_pairs([3, 1, 0, 2, 4])) == math.comb(5, 2)
    assert comparison_pairs([1, 0, 1, 1]) == [(1, 0), (1, 2), (1, 3)]  # best-of-K: the best vs each
    assert comparison_pairs([0, 1]) == [(0, 1)]
    assert comparison_pairs([0, 0, 1]) == [(0, 2), (1, 2)]  # the tie forms no pair
    assert comparison_pairs([2, 2]) == []


def test_completion_logprobs_sum_the_completion_tokens_only() -> None:
    model, tok = tiny_causal_lm(seed=1)
    model.eval()
    rows = [encode_prompt_completion(tok, p, c, True, 48) for p, c in
            [("The movie was", " wonderful."), ("Explain why the sky is blue", " It is.")]]
    batch = pad_batch(rows, tok.pad_token_id, padding_side="right")
    got = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    for r, e in enumerate(rows):
        ids = torch.tensor([e["input_ids"]])
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        mask = torch.tensor(e["completion_mask"][1:]).bool()
        expected = logp[torch.arange(len(targets)), targets][mask].sum()
        assert got[r].item() == pytest.approx(expected.item(), abs=1e-4)


def test_tiny_run_learns_the_rule_and_writes_a_run_eval_can_load(tmp_path: Path, tiny_dir: Path) -> None:
    from palate.lm.evaluate import EvalConfig, evaluate
    from palate.lm.models import load_model

    run = train_dpo(_cfg(tmp_path, tiny_dir))
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model/config.json", "model/tokenizer.json"):
        assert (run / name).is_file(), name
    records = _records(run)
    first = next(r for r in records if "dpo/val_loss" in r)
    last = [r for r in records if "dpo/val_loss" in r][-1]
    # The reference is the starting policy: every implicit reward is 0 before the first step.
    assert first["step"] == 0 and first["dpo/val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["dpo/val_accuracy"] == pytest.approx(0.5) and first["dpo/val_margin"] == pytest.approx(0.0, abs=1e-6)
    train_loss = [r["dpo/loss"] for r in records if "dpo/loss" in r]
    assert train_loss[0] == pytest.approx(math.log(2), abs=1e-5)
    assert last["step"] == 6 and last["dpo/val_loss"] < first["dpo/val_loss"] - 0.05
    assert last["dpo/val_accuracy"] > 0.7 and train_loss[-1] < 0.3
    for key in ("dpo/accuracy", "dpo/val_accuracy/optimist", "dpo/val_accuracy/held_out", "dpo/held_out_accuracy",
                "dpo/val_chosen_reward", "dpo/val_rejected_reward", "charts/tokens_per_s"):
        assert any(key in r for r in records), key
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_pairs"] == len(PROMPTS) * 4  # 2 good x 2 bad; the ties inside each form none
    assert summary["held_out_labeller"] == "held_out" and summary["initial_val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["reference"] == str(tiny_dir) and config["chat"] is False

    model, _ = load_model(str(run))
    assert model.config.num_hidden_layers == 2
    metrics = evaluate(EvalConfig(run=str(run), n_prompts=2, samples_per_prompt=1, max_new_tokens=4,
                                  max_ppl_blocks=1, batch_size=2))
    assert metrics["reference_model"] == str(tiny_dir) and 0.0 <= metrics["win_rate"] <= 1.0
    assert math.isfinite(metrics["kl"])


def test_frozen_prefix_cache_gives_the_full_forward_numbers(tmp_path: Path, tiny_dir: Path) -> None:
    runs = {}
    for cache in (True, False):
        runs[cache] = train_dpo(_cfg(tmp_path / str(cache), tiny_dir, trainable_layers=1, cache_frozen_prefix=cache,
                                     max_steps=3, eval_every=3))
    on, off = (json.loads((runs[c] / "summary.json").read_text()) for c in (True, False))
    assert on["frozen_prefix_from_block"] == 1 and off["frozen_prefix_from_block"] == 0
    for key in ("final_train_loss", "dpo/val_loss", "dpo/val_margin"):
        assert on[key] == pytest.approx(off[key], abs=1e-4), key
    assert on["dpo/val_loss"] < math.log(2)


def test_a_separate_reference_and_an_existing_run(tmp_path: Path, tiny_dir: Path) -> None:
    other, tok = tiny_causal_lm(seed=4)
    ref_dir = tmp_path / "ref"
    other.save_pretrained(ref_dir)
    tok.save_pretrained(ref_dir)
    cfg = _cfg(tmp_path, tiny_dir, reference=str(ref_dir), max_steps=1, trainable_layers=1)
    run = train_dpo(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reference"] == str(ref_dir) and summary["frozen_prefix_from_block"] == 1
    # A reference other than the starting policy: the implicit rewards are not 0 at the start.
    assert summary["initial_val_loss"] != pytest.approx(math.log(2), abs=1e-3)
    with pytest.raises(CheckpointError, match="overwrite"):
        train_dpo(cfg)
    train_dpo(_cfg(tmp_path, tiny_dir, reference=str(ref_dir), max_steps=1, overwrite=True))


def test_errors_name_the_field_and_the_fix(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(ConfigError, match="beta"):
        DPOConfig(train_data="x.jsonl", beta=0.0).validate()
    with pytest.raises(ConfigError, match="label_smoothing"):
        DPOConfig(train_data="x.jsonl", label_smoothing=0.5).validate()
    with pytest.raises(ConfigError, match="train_data"):
        DPOConfig().validate()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"], "ranking": [0]}) + "\n")
    with pytest.raises(DataError, match="ranking"):
        train_dpo(_cfg(tmp_path, tiny_dir, train_data=str(bad), val_data=""))
    assert not (tmp_path / "runs" / "dpo").exists()  # a bad file leaves no half-made run
