"""Environment ids, spaces and vector-env checks."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from palate.errors import ConfigError, EnvError
from palate.rl import PPO, PPOConfig, TRPOConfig
from palate.rl.envs import check_env_id, make_vec_env


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


def test_image_observations_are_rejected(count_env_cls):
    def image_env():
        env = count_env_cls()
        env.observation_space = gym.spaces.Box(0, 255, (8, 8), np.uint8)
        return env

    with pytest.raises(EnvError, match="1-D Box"):
        make_vec_env(image_env, 1)


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
