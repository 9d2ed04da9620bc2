"""The LM PPO bench's own checks (no model is trained here)."""

import json

import pytest

from palate.bench.lm_ppo import SETTINGS, check_settings, report_lines, trl_ppo_blocker


def test_trl_ppo_is_blocked_only_for_a_pooled_or_multi_head_reward_model(tmp_path) -> None:
    (tmp_path / "mean").mkdir()
    (tmp_path / "mean" / "reward.json").write_text(json.dumps({"pool": "mean", "n_heads": 5}))
    (tmp_path / "last" / "model").mkdir(parents=True)
    (tmp_path / "last" / "model" / "reward.json").write_text(json.dumps({"pool": "last", "n_heads": 1}))
    assert "mean-pools" in trl_ppo_blocker(tmp_path / "mean")
    assert trl_ppo_blocker(tmp_path / "last") is None


def test_group_arms_need_a_batch_that_their_k_divides() -> None:
    check_settings(SETTINGS, ("palate", "trl-rloo", "trl-grpo"))
    with pytest.raises(ValueError, match="--grpo-k"):
        check_settings({**SETTINGS, "grpo_k": 5}, ("trl-grpo",))
    check_settings({**SETTINGS, "grpo_k": 5}, ("palate", "trl-rloo"))


def test_report_says_whether_each_target_is_met() -> None:
    def arm(tokens: int, wall: float, win: float) -> dict:
        return {"train_wall_s": wall, "generated_tokens": tokens, "peak_rss_mb": 1.0, "load_before": 1.0,
                "load_after": 1.0, "eval": {"reward": 0.0, "reward_reference": 0.0, "kl": 1.0, "kl_stderr": 0.1,
                                            "win_rate": win, "win_rate_stderr": 0.04, "n_comparisons": 152}}

    results = {"settings": SETTINGS, "threads": 1, "parallel": False, "date": "d", "commit": "c", "machine": "m",
               "palate": arm(300, 10.0, 0.7), "trl-rloo": arm(100, 10.0, 0.5), "trl-grpo": arm(200, 10.0, 0.75),
               "trl-ppo": {"skipped": "not run: reason"}}
    text = "\n".join(report_lines(results, ("palate", "trl-ppo", "trl-rloo", "trl-grpo")))
    assert "| trl-ppo | not run: reason |" in text
    assert "vs trl-rloo: generated tokens/s 3.00x (target >= 2x: met); held-out win rate +0.200" in text
    assert "vs trl-grpo: generated tokens/s 1.50x (target >= 2x: not met)" in text
    assert "-0.050 ± 0.057 (target higher: not met, within 2 standard errors)" in text
