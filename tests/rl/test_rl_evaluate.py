"""Evaluation: repeatable deterministic returns, stochastic sampling, video files."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from palate.errors import EnvError
from palate.rl import PPO, PPOConfig
from palate.rl.evaluate import evaluate


@pytest.fixture(scope="module")
def cartpole_model():
    return PPO(PPOConfig(env="CartPole-v1", n_envs=2, n_steps=128, batch_size=64, total_steps=512)).learn(
        progress=False)


def test_deterministic_evaluation_is_repeatable(cartpole_model):
    first = evaluate(cartpole_model, episodes=3)
    second = evaluate(cartpole_model, episodes=3)
    assert first.returns == second.returns and len(first.lengths) == 3
    assert first.to_dict()["mean_return"] == pytest.approx(np.mean(first.returns))


def test_stochastic_evaluation_samples_actions(cartpole_model):
    obs = np.zeros((256, 4), np.float32)
    greedy = cartpole_model.predict(obs, deterministic=True)
    sampled = cartpole_model.predict(obs, deterministic=False)
    assert len(set(greedy.tolist())) == 1 and len(set(sampled.tolist())) == 2
    assert len(evaluate(cartpole_model, episodes=2, deterministic=False).returns) == 2


def test_bad_episode_count(cartpole_model):
    with pytest.raises(EnvError, match="episodes"):
        evaluate(cartpole_model, episodes=0)


def test_video_of_a_mujoco_episode(tmp_path):
    model = PPO(PPOConfig(env="Hopper-v5", n_envs=1, n_steps=64, batch_size=64, n_epochs=1, total_steps=64))
    model.learn(progress=False)
    # The same task, filmed small and cut at 30 steps, so the test stays fast.
    gym.register("palate-test/SmallHopper-v5", entry_point="gymnasium.envs.mujoco.hopper_v5:HopperEnv",
                 max_episode_steps=30, kwargs={"width": 96, "height": 96})
    try:
        result = evaluate(model, "palate-test/SmallHopper-v5", episodes=1, video_path=tmp_path / "hopper.mp4")
    except Exception as err:  # no off-screen OpenGL on this machine
        pytest.skip(f"MuJoCo cannot render here: {err}")
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix in (".gif", ".mp4") and files[0].stat().st_size > 1000
    assert 1 <= result.lengths[0] <= 30
