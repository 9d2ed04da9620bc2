"""Environment ids, spaces and vector-env checks."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from palate.errors import ConfigError, EnvError
from palate.rl import PPO, PPOConfig, TRPOConfig
from palate.rl.envs import SAME_STEP, LeanSyncVectorEnv, check_env_id, make_vec_env


def test_unknown_env_id_names_it_and_suggests_close_matches():
    with pytest.raises(EnvError) as err:
        check_env_id("CartPol-v1")
    assert "CartPol-v1" in str(err.value)
    assert "CartPole-v1" in str(err.value)


def test_learn_with_unknown_env_raises_env_error():
    with pytest.raises(EnvError, match="Hoper-v5.*Hopper-v5"):
        PPO(PPOConfig(n_steps=8, batch_size=8)).learn("Hoper-v5", total_steps=8, progress=False)


def test_vector_env_must_autoreset_on_the_same_step():
    envs = gym.make_vec("CartPole-v1", 2, vectorization_mode="sync")  # NEXT_STEP by default
    try:
        with pytest.raises(EnvError, match="SAME_STEP"):
            make_vec_env(envs, 2)
    finally:
        envs.close()


def test_single_env_instance_needs_one_actor():
    env = gym.make("CartPole-v1")
    with pytest.raises(EnvError, match="n_envs=4"):
        make_vec_env(env, 4)
    env.close()


@pytest.mark.parametrize("space,match", [
    (gym.spaces.Sequence(gym.spaces.Discrete(3)), "Sequence observations are not supported.*pad it"),
    (gym.spaces.Graph(gym.spaces.Box(0, 1, (2,)), None), "Graph observations are not supported"),
    (gym.spaces.Dict({"ok": gym.spaces.Discrete(2), "bad": gym.spaces.Text(5)}), r"\['bad'\]: Text"),
])
def test_unsupported_observation_spaces_are_named(count_env_cls, space, match):
    def env_with_space():
        env = count_env_cls()
        env.observation_space = space
        return env

    with pytest.raises(EnvError, match=match):
        make_vec_env(env_with_space, 1)


@pytest.mark.parametrize("cls,field,value", [
    (PPOConfig, "gamma", 1.5), (PPOConfig, "batch_size", 10_000), (PPOConfig, "clip_range", 0.0),
    (TRPOConfig, "max_kl", -1.0), (TRPOConfig, "line_search_shrink", 1.0), (PPOConfig, "n_envs", 0),
])
def test_bad_config_values_raise_config_error(cls, field, value):
    with pytest.raises(ConfigError, match=field):
        cls(**{field: value})


def test_unknown_override_raises_config_error():
    with pytest.raises(ConfigError, match="max_kl"):
        PPO(max_kl=0.01)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_lean_sync_vector_env_steps_like_gymnasiums(env_id):
    """Same observations, rewards, flags and final observations as SyncVectorEnv, step for step."""
    def make():
        return gym.wrappers.TimeLimit(gym.make(env_id).unwrapped, max_episode_steps=7)  # truncation too

    lean = LeanSyncVectorEnv([make, make], autoreset_mode=SAME_STEP)
    ref = gym.vector.SyncVectorEnv([make, make], autoreset_mode=SAME_STEP)
    try:
        obs_a, _ = lean.reset(seed=3)
        obs_b, _ = ref.reset(seed=3)
        np.testing.assert_array_equal(obs_a, obs_b)
        rng = np.random.default_rng(0)
        ended = 0
        for _ in range(40):
            actions = np.stack([lean.single_action_space.sample() for _ in range(2)])
            if isinstance(lean.single_action_space, gym.spaces.Box):
                actions = rng.uniform(-2, 2, (2, 1)).astype(np.float32)
            a, b = lean.step(actions), ref.step(actions)
            for x, y in zip(a[:4], b[:4]):
                np.testing.assert_array_equal(x, y)
            if "final_obs" in b[4]:
                ended += 1
                np.testing.assert_array_equal(a[4]["_final_obs"], b[4]["_final_obs"])
                for i in np.flatnonzero(b[4]["_final_obs"]):
                    np.testing.assert_array_equal(a[4]["final_obs"][i], b[4]["final_obs"][i])
            else:
                assert a[4] == {}
        assert ended > 0
    finally:
        lean.close()
        ref.close()
