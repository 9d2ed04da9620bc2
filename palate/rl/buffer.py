"""The rollout buffer: ``[T, N]`` arrays filled step by step, turned into one training batch.

Storage is preallocated NumPy: a step writes a handful of rows with plain array assignment (far
cheaper than torch indexing at these sizes), and the whole rollout becomes torch tensors with
``torch.from_numpy`` (no copy) once, when GAE runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from palate.core.advantages import gae

RewardFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""reward_fn(obs [B, obs_dim], actions [B, ...]) -> rewards [B]: replaces the env reward."""

RolloutCallback = Callable[[dict[str, np.ndarray]], None]
"""Called after each rollout with raw ``obs``, ``actions``, ``true_rewards``, ``terminated``,
``truncated`` arrays of shape ``[T, N, ...]``."""


@dataclass
class Batch:
    """One rollout flattened to ``B = T * N`` rows, ready for minibatches."""

    obs: torch.Tensor
    actions: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def __len__(self) -> int:
        return self.obs.shape[0]

    def rows(self, idx: torch.Tensor) -> Batch:
        """A minibatch."""
        return Batch(self.obs[idx], self.actions[idx], self.logp[idx], self.values[idx],
                     self.advantages[idx], self.returns[idx])

    def slice(self, start: int, end: int) -> Batch:
        """Rows ``start:end`` as views: a minibatch of an already shuffled batch, without copies."""
        return Batch(self.obs[start:end], self.actions[start:end], self.logp[start:end], self.values[start:end],
                     self.advantages[start:end], self.returns[start:end])


class RolloutBuffer:
    """``T`` steps of ``N`` environments.

    Args:
        n_steps, n_envs: T and N.
        obs_shape: shape of one observation.
        action_shape: shape of one action (``()`` for Discrete).
        discrete: store actions as int64 rather than float32.
    """

    def __init__(self, n_steps: int, n_envs: int, obs_shape: tuple[int, ...], action_shape: tuple[int, ...],
                 discrete: bool) -> None:
        shape = (n_steps, n_envs)
        self.n_steps, self.n_envs = n_steps, n_envs
        self.obs = np.zeros(shape + obs_shape, np.float32)  # normalised, what the policy saw
        self.raw_obs = np.zeros(shape + obs_shape, np.float32)  # as the env returned it
        self.actions = np.zeros(shape + action_shape, np.int64 if discrete else np.float32)  # sampled
        self.env_actions = np.zeros_like(self.actions)  # as executed (clipped to the Box)
        self.logp = np.zeros(shape, np.float32)
        self.values = np.zeros(shape, np.float32)
        self.true_rewards = np.zeros(shape, np.float32)  # from the env, even when reward_fn is set
        self.terminated = np.zeros(shape, bool)
        self.truncated = np.zeros(shape, bool)
        self.bootstrap = np.zeros(shape, np.float32)  # V(final obs) where truncated
        self.last_value = np.zeros(n_envs, np.float32)  # V(s_T), bootstraps the rollout's end

    def raw_dict(self) -> dict[str, np.ndarray]:
        """Copies of the raw rollout for ``rollout_callback`` (the buffer is reused)."""
        return {"obs": self.raw_obs.copy(), "actions": self.env_actions.copy(),
                "true_rewards": self.true_rewards.copy(), "terminated": self.terminated.copy(),
                "truncated": self.truncated.copy()}

    def compute_batch(self, rewards: np.ndarray, gamma: float, gae_lambda: float) -> Batch:
        """GAE over the rollout with ``rewards [T, N]`` (already replaced/normalised), flattened.

        The value that follows step t is V(s_{t+1}), except where the episode was truncated at t:
        s_{t+1} is then the reset observation of the next episode and the right bootstrap is
        V(final observation), recorded at collection time. Terminated steps bootstrap with 0.
        """
        values = torch.from_numpy(self.values)
        next_values = torch.empty_like(values)
        next_values[:-1] = values[1:]
        next_values[-1] = torch.from_numpy(self.last_value)
        truncated = torch.from_numpy(self.truncated)
        terminated = torch.from_numpy(self.terminated)
        next_values = torch.where(truncated, torch.from_numpy(self.bootstrap), next_values)
        advantages, returns = gae(torch.from_numpy(rewards), values, next_values, terminated,
                                  terminated | truncated, gamma, gae_lambda)
        flat = self.n_steps * self.n_envs
        return Batch(
            obs=torch.from_numpy(self.obs).reshape(flat, *self.obs.shape[2:]),
            actions=torch.from_numpy(self.actions).reshape(flat, *self.actions.shape[2:]),
            logp=torch.from_numpy(self.logp).reshape(flat),
            values=values.reshape(flat),
            advantages=advantages.reshape(flat),
            returns=returns.reshape(flat),
        )


def episode_stats(returns: list[float], lengths: list[int]) -> dict[str, Any]:
    """CleanRL's chart names for the episodes finished since the last log."""
    if not returns:
        return {}
    return {"charts/episodic_return": float(np.mean(returns)), "charts/episodic_length": float(np.mean(lengths))}
