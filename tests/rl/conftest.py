"""Small environments with known dynamics for the control tests."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest


class CountEnv(gym.Env):
    """obs = [t / 10], reward 1 per step; terminates at ``terminate_at`` steps if given.

    With a TimeLimit around it, every episode ends by truncation (or termination when
    ``terminate_at`` is below the limit), so the tests know exactly where bootstrapping belongs.
    """

    def __init__(self, terminate_at: int | None = None, continuous: bool = False) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
        self.action_space = (gym.spaces.Box(-1.0, 1.0, (1,), np.float32) if continuous
                             else gym.spaces.Discrete(2))
        self.terminate_at = terminate_at
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.terminate_at is not None and self.t >= self.terminate_at
        return np.array([self.t / 10], np.float32), 1.0, terminated, False, {}


@pytest.fixture
def count_env_factory():
    def make(limit: int = 5, terminate_at: int | None = None, continuous: bool = False):
        return lambda: gym.wrappers.TimeLimit(CountEnv(terminate_at, continuous), max_episode_steps=limit)

    return make


@pytest.fixture
def count_env_cls():
    return CountEnv
