"""The pipeline end to end on a tiny model: every stage's run dir, the report, and skipping done stages."""

import json

import pytest

from palate.config import config_from_dict
from palate.lm.pipeline import PipelineConfig, run_pipeline, stage_done
from palate.lm.testing import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_tiny_pipeline_runs_every_stage_then_skips_them(tmp_path):
    model, tok = tiny_causal_lm()
    base = tmp_path / "tiny"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    small = {"max_new_tokens": 6, "batch_size": 4}
    cfg = config_from_dict(PipelineConfig, {
        "name": "tiny", "runs_dir": str(tmp_path / "runs"), "task": "sentiment", "base_model": str(base),
        "ppo_reward": "rm",
        "demos": {"limit": 4, "n": 2, **small},
        "sft": {"epochs": 1, "batch_size": 2, "max_length": 48, "eval_every": 100, "cpu": True},
        "label": {"limit": 4, "k": 3, **small},
        "label_val": {"limit": 3, "k": 3, **small},
        "rm": {"epochs": 1, "batch_size": 2, "max_length": 48, "eval_every": 100, "cpu": True},
        "ppo": {"iterations": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 6,
                "device": "cpu", "ptx_coef": 0.1, "ptx_batch_size": 2, "ptx_block_size": 32, "online_every": 1,
                "online_prompts": 2, "online_k": 3},
        "eval": {"n_prompts": 3, "samples_per_prompt": 1, "max_new_tokens": 6, "ptx_block_size": 32,
                 "max_ppl_blocks": 2, "device": "cpu"},
        "bon": {"n_prompts": 2, "n": 4, "max_new_tokens": 6, "device": "cpu"},
        "dpo": {"epochs": 1, "batch_size": 2, "max_length": 48, "eval_every": 100, "cpu": True},
        "stages": ["demos", "sft", "label", "rm", "ppo", "eval", "bon", "dpo", "dpo_eval", "report"],
    })
    root = run_pipeline(cfg)
    for stage in ("demos", "sft", "label", "rm", "ppo", "eval", "bon", "dpo", "dpo_eval"):
        assert stage_done(root, stage), stage
    # The RM's validation set is ranked by every labeller, so the held-out one's accuracy is measured.
    val_labellers = {json.loads(line)["labeller"] for line in (root / "label" / "val.jsonl").read_text().splitlines()}
    assert "held_out" in val_labellers
    assert "rm/held_out_accuracy" in json.loads((root / "rm" / "summary.json").read_text())
    train_lines = (root / "label" / "comparisons.jsonl").read_text().splitlines()
    assert "held_out" not in {json.loads(line)["labeller"] for line in train_lines}
    ev = json.loads((root / "eval" / "summary.json").read_text())
    assert ev["n_comparisons"] == 3 and 0.0 <= ev["win_rate"] <= 1.0 and ev["judge"] == "held_out"
    assert "rm_score" in ev and ev["perplexity"] > 1.0
    ppo_config = (root / "ppo" / "config.yaml").read_text()
    assert str(root / "sft" / "model") in ppo_config and str(root / "rm" / "model") in ppo_config
    metrics = [json.loads(line) for line in (root / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["phase"] for m in metrics] == ["ppo", "online", "ppo"]
    assert all("ptx/loss" in m for m in metrics if m["phase"] == "ppo")
    report = (root / "report.md").read_text()
    assert "win rate vs SFT" in report and "## Samples" in report
    bon = json.loads((root / "bon" / "summary.json").read_text())
    assert [c["n"] for c in bon["curve"]] == [1, 2, 4] and bon["judge"] == "held_out"
    assert "best-of-4 with the reward model" in report
    # DPO: trained from the SFT model on the label stage's rankings, judged on PPO's test prompts.
    dpo_config = (root / "dpo" / "config.yaml").read_text()
    assert str(root / "sft" / "model") in dpo_config and str(root / "label" / "comparisons.jsonl") in dpo_config
    dpo_ev = json.loads((root / "dpo_eval" / "summary.json").read_text())
    assert dpo_ev["n_comparisons"] == ev["n_comparisons"] and 0.0 <= dpo_ev["win_rate"] <= 1.0
    def prompts(stage: str) -> list[str]:
        return [json.loads(line)["prompt"] for line in (root / stage / "samples.jsonl").read_text().splitlines()]

    assert prompts("dpo_eval") == prompts("eval")
    assert "| DPO on the same rankings |" in report and "DPO's sampled win rate" in report
    for png in ("reward_kl.png", "frontier.png", "win_rate.png", "overoptimisation.png"):
        assert (root / png).stat().st_size > 1000

    # Everything done: a second run only rebuilds the report.
    mtime = (root / "ppo" / "summary.json").stat().st_mtime
    run_pipeline(cfg)
    assert (root / "ppo" / "summary.json").stat().st_mtime == mtime
    timings = json.loads((root / "timings.json").read_text())
    assert set(timings) >= {"demos", "sft", "label", "rm", "ppo", "eval", "bon", "dpo", "dpo_eval", "report"}


def test_an_evaluation_by_people_still_waiting_is_not_a_done_stage(tmp_path):
    from palate.lm.pipeline import stage_done

    (tmp_path / "eval").mkdir()
    summary = tmp_path / "eval" / "summary.json"
    assert not stage_done(tmp_path, "eval")
    summary.write_text(json.dumps({"win_rate": 0.6, "human": {"complete": False, "pairs_open": 3}}))
    assert not stage_done(tmp_path, "eval")  # the next pipeline run goes on waiting for the answers
    summary.write_text(json.dumps({"win_rate": 0.6, "human": {"complete": True, "pairs_open": 0}}))
    assert stage_done(tmp_path, "eval")
    summary.write_text(json.dumps({"win_rate": 0.6}))  # judged by the labeller alone
    assert stage_done(tmp_path, "eval")


def test_warn_if_cpu_busy_names_the_fix(monkeypatch, caplog):
    """Several threads on a loaded CPU get one warning that names --torch-threads 1; one thread or an
    idle CPU get none."""
    from palate.lm import pipeline

    monkeypatch.setattr(pipeline.os, "getloadavg", lambda: (1.8, 1.5, 1.0))
    with caplog.at_level("WARNING", logger="palate.lm.pipeline"):
        assert pipeline.warn_if_cpu_busy(2)
        assert not pipeline.warn_if_cpu_busy(1)
    assert "--torch-threads 1" in caplog.text and caplog.text.count("busy") == 1
    monkeypatch.setattr(pipeline.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert not pipeline.warn_if_cpu_busy(2)


def test_report_names_the_iteration_where_ppo_hit_its_kl_budget():
    from palate.lm.report import _kl_budget_note

    assert _kl_budget_note(None) == ""
    note = _kl_budget_note({"reason": "kl_budget", "iteration": 19, "kl": 9.8, "mean_kl_last_2": 9.4, "kl_budget": 9.0})
    assert "before iteration 20's update" in note and "9.400 > 9.000" in note
    kept = _kl_budget_note({"reason": "kl_budget", "iteration": 19, "kl": 10.5, "mean_kl_last_2": 9.1,
                            "kl_budget": 9.0, "policy_iteration": 18, "policy_kl": 7.7})
    assert "the policy kept is the one after iteration 18 (its batch: KL 7.70)" in kept
