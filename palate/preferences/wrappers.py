"""Environment wrappers for fixed-length episodes (see :func:`palate.preferences.loop.make_env_factory`).

They live at module level, apart from the loop, for one reason: a class defined inside a function
cannot be pickled, and a resumed run continues its episodes exactly only if its environments can
be (:func:`palate.rl.envs.snapshot_envs`). Importing this module imports gymnasium, so the loop
imports it only when it builds an environment.
"""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym


class FallPenaltyWrapper(gym.Wrapper):
    """Subtract ``penalty`` from the reward of every step the robot is unhealthy (has fallen)."""

    def __init__(self, env: gym.Env, penalty: float) -> None:
        super().__init__(env)
        self.penalty = float(penalty)

    def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if not self.env.unwrapped.is_healthy:
            reward = float(reward) - self.penalty
        return obs, reward, terminated, truncated, info


class IgnoreTerminationWrapper(gym.Wrapper):
    """Report no termination, so an env that keeps simulating runs to its time limit (CartPole)."""

    def step(self, action: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "step() called after terminated": intended
            obs, reward, _terminated, truncated, info = self.env.step(action)
        return obs, reward, False, truncated, info
