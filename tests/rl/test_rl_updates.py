"""The update rules as the trainers apply them: KL-penalty beta, target_kl, the trust region."""

from __future__ import annotations

import json

import pytest

from palate.rl import PPO, TRPO, PPOConfig, TRPOConfig


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kl_penalty_beta_follows_the_papers_rule(tmp_path):
    cfg = PPOConfig(env="CartPole-v1", loss="kl_penalty", kl_coef=1.0, kl_target=0.01, n_envs=2, n_steps=128,
                    batch_size=64, n_epochs=4, learning_rate=3e-3, total_steps=2048, checkpoint_every=0)
    PPO(cfg).learn(run_dir=tmp_path, progress=False)
    beta = cfg.kl_coef
    rows = metrics(tmp_path)
    assert len(rows) == 8
    for row in rows:
        d = row["losses/kl"]
        expected = beta / 2 if d < 0.01 / 1.5 else beta * 2 if d > 0.01 * 1.5 else beta
        assert row["losses/kl_coef"] == pytest.approx(expected)
        beta = expected
    assert len({r["losses/kl_coef"] for r in rows}) > 1  # it did adapt


def test_target_kl_stops_the_epochs_early(tmp_path):
    cfg = PPOConfig(env="CartPole-v1", target_kl=1e-6, n_envs=2, n_steps=64, batch_size=32, n_epochs=10,
                    learning_rate=1e-2, total_steps=256, checkpoint_every=0)
    PPO(cfg).learn(run_dir=tmp_path, progress=False)
    assert all(row["losses/early_stop"] == 1.0 for row in metrics(tmp_path))


@pytest.mark.parametrize("update", ["trust_region", "kl_penalty"])
def test_trpo_steps_respect_their_objective(tmp_path, update):
    cfg = TRPOConfig(env="Pendulum-v1", update=update, max_kl=0.005, n_envs=2, n_steps=128, batch_size=64,
                     vf_iters=2, total_steps=1024, checkpoint_every=0)
    model = TRPO(cfg).learn(run_dir=tmp_path, progress=False)
    rows = metrics(tmp_path)
    assert model.line_search_attempts == len(rows) == 4
    for row in rows:
        if row["trpo/line_search_accepted"]:
            assert 0 < row["trpo/step_fraction"] <= 1
            if update == "trust_region":
                assert row["losses/approx_kl"] <= cfg.max_kl * (1 + 1e-5)
        else:  # rejected: parameters restored, the policy did not move
            assert row["trpo/step_fraction"] == 0 and row["losses/approx_kl"] == pytest.approx(0, abs=1e-9)
    assert rows[-1]["trpo/line_search_success_rate"] == pytest.approx(model.line_search_successes / 4)
