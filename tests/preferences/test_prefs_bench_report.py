"""Gathering preference-benchmark rows run as separate processes into one table and plot."""

import json

import pytest

from palate.bench.prefs import load_rows, report


def _row(method: str, labels: int, seed: int, ret: float) -> dict:
    return {"method": method, "algo": "trpo", "env": "Hopper-v5", "seed": seed, "labels": labels,
            "steps": 1000, "eval_true_return_mean": ret, "eval_true_returns": [ret], "wall_time_s": 10.0}


def test_report_merges_row_files_and_reports(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_row("true reward", 0, 0, 200.0)))
    (tmp_path / "b.json").write_text(json.dumps({"rows": [_row("palate prefs", 700, 0, 150.0),
                                                          _row("palate prefs", 700, 1, 250.0)]}))
    table = report([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "out")
    line = next(ln for ln in table.splitlines() if "palate prefs" in ln)
    assert "| 2 | 200 +- 50 | 100% |" in line
    assert (tmp_path / "out" / "prefs_return_vs_labels.png").stat().st_size > 0


def test_unreadable_or_foreign_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_rows([bad])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(ValueError, match="other.json.*'env' and 'method'"):
        load_rows([other])


def test_true_reward_row_reports_the_steps_it_ran():
    from palate.bench.prefs import run_true_reward
    from palate.rl import PPOConfig

    row = run_true_reward("CartPole-v1", 300, 0, "ppo", 1)
    rollout = PPOConfig().n_envs * PPOConfig().n_steps
    # Whole rollouts: the first one already passes 300 steps.
    assert row["steps"] == rollout >= 300, row
    assert row["method"] == "true reward" and len(row["eval_true_returns"]) == 1
