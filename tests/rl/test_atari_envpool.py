"""envpool as the vector env of Atari runs: palate's SAME_STEP contract, whole-game scores, clear errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from palate.errors import EnvError
from palate.rl.atari import envpool_task
from palate.rl.envs import make_vec_env


def test_envpool_takes_atari_ids_only_and_names_the_fix(monkeypatch):
    with pytest.raises(EnvError, match="envpool runs Atari games only.*CartPole-v1.*vec_env: sync"):
        make_vec_env("CartPole-v1", 2, "envpool")
    assert envpool_task("PongNoFrameskip-v4") == envpool_task("ALE/Pong-v5") == "Pong-v5"
    with pytest.raises(EnvError, match="BreakoutDeterministic-v4.*vec_env: sync"):
        envpool_task("BreakoutDeterministic-v4")
    pytest.importorskip("ale_py")
    monkeypatch.setitem(sys.modules, "envpool", None)  # as if it were not installed
    with pytest.raises(EnvError, match="pip install 'palate\\[envpool\\]'.*vec_env: sync"):
        make_vec_env("PongNoFrameskip-v4", 2, "envpool")


def test_envpool_lost_lives_end_episodes_and_games_report_unclipped_scores():
    pytest.importorskip("envpool")
    pytest.importorskip("ale_py")
    envs, owned = make_vec_env("SpaceInvadersNoFrameskip-v4", 2, "envpool")
    assert owned and envs.single_observation_space.shape == (4, 84, 84)
    obs, _ = envs.reset(seed=0)
    rng = np.random.default_rng(0)
    rewards, life_ends, games = set(), 0, []
    for _ in range(5000):
        obs, reward, terminated, truncated, info = envs.step(rng.integers(0, 6, size=2))
        assert obs.dtype == np.uint8 and obs.shape == (2, 4, 84, 84)
        rewards.update(reward.tolist())
        done = terminated | truncated
        life_ends += int(done.sum())
        if done.any():
            assert all(info["final_obs"][i].shape == (4, 84, 84) for i in np.flatnonzero(done))
        if "final_info" in info:
            mask = info["final_info"]["_episode"]
            games += info["final_info"]["episode"]["r"][mask].tolist()
            break
    assert rewards <= {0.0, 1.0}  # the training reward is the sign of the points
    assert games and max(games) > 1.0  # the game's score is not: invaders are worth 5 to 30 points
    assert life_ends >= 3  # SpaceInvaders' three lives: each lost one ends the learner's episode
    assert [s for scores, _ in envs.call("pop_game_scores") for s in scores] == games
    envs.close()


def test_envpool_runs_ppo_and_continuous_games_for_preference_runs():
    pytest.importorskip("envpool")
    pytest.importorskip("ale_py")
    from palate.preferences.config import PreferenceConfig
    from palate.preferences.wrappers import make_env_factory
    from palate.rl import PPO

    model = PPO(env="PongNoFrameskip-v4", vec_env="envpool", n_envs=2, n_steps=32, batch_size=64, n_epochs=1,
                cnn_features=32, total_steps=128)
    model.learn(progress=False)
    assert model.global_step == 128
    # A preference run's factory asks envpool for its stack: unclipped, and a game over ends nothing.
    envs, _ = make_vec_env(make_env_factory(PreferenceConfig(env="PongNoFrameskip-v4")), 1, "envpool")
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(3000):
        _obs, _reward, terminated, truncated, _info = envs.step(rng.integers(0, 6, size=1))
        assert not terminated.any() and not truncated.any()
        ((scores, lengths),) = envs.call("pop_game_scores")
        if scores:
            break
    assert scores and -21.0 <= scores[0] < 0 and lengths[0] > 500
    envs.close()
