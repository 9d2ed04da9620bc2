"""The reward-head block probe: features equal a cut reward model's, the fit learns a readable rule."""

import json
from pathlib import Path

import pytest
import torch

from palate.bench.rm_layers import block_features, main
from palate.data.formats import Comparison, write_comparisons
from palate.lm.reward_model import RewardModel
from palate.lm.testing import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_block_features_are_what_a_model_cut_after_that_block_reads():
    model, tok = tiny_causal_lm(num_layers=3)
    full = RewardModel.from_causal_lm(model, chat=False, max_length=32, n_heads=1, pool="mean")
    texts = [("the film was", " great fun"), ("a", " long and quite slow story")]
    feats = block_features(full, tok, texts, [2, 3], batch_size=1)
    for block in (2, 3):
        cut = RewardModel.from_causal_lm(tiny_causal_lm(num_layers=3)[0], chat=False, max_length=32, n_heads=1,
                                         pool="mean", n_layers=block)
        batch = cut.encode_texts([p for p, _ in texts], [c for _, c in texts], tok)
        with torch.no_grad():
            want = cut.pooled(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        torch.testing.assert_close(feats[block], want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="outside 1..3"):
        block_features(full, tok, texts, [4])


def test_last_token_and_concatenated_pools():
    model, tok = tiny_causal_lm(num_layers=2)
    texts = [("the film was", " great fun"), ("a", " long and quite slow story")]
    mean = block_features(RewardModel.from_causal_lm(model, chat=False, max_length=32, n_heads=1, pool="mean"),
                          tok, texts, [2], batch_size=2)[2]
    last_rm = RewardModel.from_causal_lm(model, chat=False, max_length=32, n_heads=1, pool="last")
    batch = last_rm.encode_texts([p for p, _ in texts], [c for _, c in texts], tok)
    with torch.no_grad():
        want = last_rm.pooled(batch["input_ids"], batch["attention_mask"])
    rm = RewardModel.from_causal_lm(model, chat=False, max_length=32, n_heads=1, pool="mean")
    last = block_features(rm, tok, texts, [2], batch_size=1, pool="last")[2]
    torch.testing.assert_close(last, want, atol=1e-4, rtol=1e-4)
    both = block_features(rm, tok, texts, [2], batch_size=2, pool="mean+last")[2]
    torch.testing.assert_close(both, torch.cat([mean, want], 1), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pool must be one of"):
        block_features(rm, tok, texts, [2], pool="max")


def test_probe_on_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    model, tok = tiny_causal_lm(num_layers=2)
    run = tmp_path / "run"
    model.save_pretrained(run / "sft" / "model")
    tok.save_pretrained(run / "sft" / "model")
    (run / "pipeline.json").write_text(json.dumps({"task": "sentiment", "rm": {"max_length": 32}}))
    # Labellers who prefer the completion with more "good": a rule a linear head on the mean can read.
    def comps(n, labeller_names):
        out = []
        for i in range(n):
            texts = [" good" * (j + 1) + " ok" * (3 - j) for j in range(3)]
            out.append(Comparison(f"prompt {i}", texts, [2, 1, 0], "ranking",
                                  labeller=labeller_names[i % len(labeller_names)]))
        return out
    write_comparisons(run / "label" / "comparisons.jsonl", comps(12, ["optimist", "editor"]))
    write_comparisons(run / "label" / "val.jsonl", comps(4, ["optimist", "held_out"]))
    assert main([str(run), "--blocks", "1", "2", "--combine", "1,2", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "rm_layers.json").read_text())["runs"][str(run)]
    assert set(result) == {"block 1", "block 2", "blocks 1 + 2"}
    assert all(r["held_out_accuracy"] == 1.0 for r in result.values())
    assert "| block 2 |" in capsys.readouterr().out
    assert main([str(run), "--blocks", "2", "--combine", "--pool", "mean+last", "--out", str(tmp_path / "o2")]) == 0
    result = json.loads((tmp_path / "o2" / "rm_layers.json").read_text())["runs"][str(run)]
    assert set(result) == {"block 2", "block 2, mean alone", "block 2, last token alone"}
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing")])
