"""Learning: PPO and TRPO solve CartPole-v1 (mean return >= 475) within 100k steps, fixed seed.

Both use the shipped preset configs/rl/cartpole.yaml (rl-baselines3-zoo hyperparameters, whose
learning-rate schedule spans 100k steps). Training runs in chunks of 20k steps (which gives the
same run as one call: see test_learn_in_chunks_equals_one_call) with a deterministic 10-episode
evaluation after each, and stops at the first that reaches 475.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from palate.config import config_from_dict, load_yaml
from palate.rl import PPO, TRPO, PPOConfig, TRPOConfig
from palate.rl.cli import preset_values
from palate.rl.evaluate import evaluate

PRESET = Path(__file__).resolve().parents[2] / "configs" / "rl" / "cartpole.yaml"


def preset(algo: str):
    cls = PPOConfig if algo == "ppo" else TRPOConfig
    return config_from_dict(cls, {**preset_values(load_yaml(PRESET), algo), "seed": 0})


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "trpo"])
def test_cartpole_is_solved_within_100k_steps(algo):
    cfg = preset(algo)
    assert cfg.total_steps <= 100_000
    model = (PPO if algo == "ppo" else TRPO)(cfg)
    history = []
    while model.global_step < cfg.total_steps:
        model.learn(total_steps=min(20_000, cfg.total_steps - model.global_step), progress=False)
        result = evaluate(model, episodes=10, deterministic=True)
        history.append((model.global_step, result.mean_return))
        if result.mean_return >= 475:
            break
    assert model.global_step <= 100_000 + cfg.rollout_size
    assert history[-1][1] >= 475, f"{algo}: (step, mean return) = {history}"
