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
from palate.rl.spaces import Obs, ObsLayout, tree_map

RewardFn = Callable[[Any, np.ndarray], np.ndarray]
"""reward_fn(obs [B, obs_dim], actions [B, ...]) -> rewards [B]: replaces the env reward.
For a Dict or Tuple observation space ``obs`` is a dict of parts (see palate.rl.spaces)."""

RolloutCallback = Callable[[dict[str, Any]], None]
"""Called after each rollout with raw ``obs``, ``actions``, ``true_rewards``, ``terminated``,
``truncated`` arrays of shape ``[T, N, ...]`` (``obs`` a dict of parts for Dict/Tuple spaces)."""


@dataclass
class Batch:
    """One rollout flattened to ``B = T * N`` rows, ready for minibatches."""

    obs: torch.Tensor | dict[str, torch.Tensor]
    actions: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def __len__(self) -> int:
        return self.logp.shape[0]

    def rows(self, idx: torch.Tensor) -> Batch:
        """A minibatch."""
        obs = self.obs[idx] if not isinstance(self.obs, dict) else tree_map(lambda x: x[idx], self.obs)
        return Batch(obs, self.actions[idx], self.logp[idx], self.values[idx], self.advantages[idx], self.returns[idx])

    def slice(self, start: int, end: int) -> Batch:
        """Rows ``start:end`` as views: a minibatch of an already shuffled batch, without copies."""
        obs = self.obs[start:end] if not isinstance(self.obs, dict) else tree_map(lambda x: x[start:end], self.obs)
        return Batch(obs, self.actions[start:end], self.logp[start:end], self.values[start:end],
                     self.advantages[start:end], self.returns[start:end])


class RolloutBuffer:
    """``T`` steps of ``N`` environments.

    Args:
        n_steps, n_envs: T and N.
        obs_shape: shape of one observation.
        action_shape: shape of one action (``()`` for Discrete).
        discrete: store actions as int64 rather than float32.
        layout: for observations other than a flat Box, their parts: ``obs`` and ``raw_obs`` are
            then dicts of arrays in each part's dtype (images uint8). Parts that are never
            normalised (images, discrete parts) are one array shared by both.
    """

    def __init__(self, n_steps: int, n_envs: int, obs_shape: tuple[int, ...], action_shape: tuple[int, ...],
                 discrete: bool, layout: ObsLayout | None = None) -> None:
        shape = (n_steps, n_envs)
        self.n_steps, self.n_envs = n_steps, n_envs
        self.layout = layout
        self.obs: Obs
        self.raw_obs: Obs
        if layout is None:
            self.obs = np.zeros(shape + obs_shape, np.float32)  # normalised, what the policy saw
            self.raw_obs = np.zeros(shape + obs_shape, np.float32)  # as the env returned it
        else:
            self.obs = layout.zeros(shape)
            self.raw_obs = {p.key: np.zeros_like(self.obs[p.key]) if p.kind == "box" else self.obs[p.key]
                            for p in layout.parts}
            # (key, normalised, raw or None where it is the same array): what store_obs writes.
            self._writes = [(k, self.obs[k], None if self.raw_obs[k] is self.obs[k] else self.raw_obs[k])
                            for k in self.obs]
        self.actions = np.zeros(shape + action_shape, np.int64 if discrete else np.float32)  # sampled
        self.env_actions = np.zeros_like(self.actions)  # as executed (clipped to the Box)
        self.logp = np.zeros(shape, np.float32)
        self.values = np.zeros(shape, np.float32)
        self.true_rewards = np.zeros(shape, np.float32)  # from the env, even when reward_fn is set
        self.terminated = np.zeros(shape, bool)
        self.truncated = np.zeros(shape, bool)
        self.bootstrap = np.zeros(shape, np.float32)  # V(final obs) where truncated
        self.last_value = np.zeros(n_envs, np.float32)  # V(s_T), bootstraps the rollout's end

    def store_obs(self, t: int, obs: dict[str, np.ndarray], raw_obs: dict[str, np.ndarray]) -> None:
        """Write step ``t`` of a parts observation (a flat one is two plain assignments in the loop)."""
        for key, norm, raw in self._writes:
            norm[t] = obs[key]
            if raw is not None:
                raw[t] = raw_obs[key]

    def external_raw_obs(self, prefix: tuple[int, ...]) -> Any:
        """The raw observations reshaped to ``prefix + part shape``, as user hooks see them."""
        if self.layout is None:
            return self.raw_obs.reshape(*prefix, *self.raw_obs.shape[2:])
        return self.layout.external(tree_map(lambda x: x.reshape(*prefix, *x.shape[2:]), self.raw_obs))

    def raw_dict(self) -> dict[str, Any]:
        """Copies of the raw rollout for ``rollout_callback`` (the buffer is reused)."""
        obs = tree_map(np.copy, self.external_raw_obs((self.n_steps, self.n_envs)))
        return {"obs": obs, "actions": self.env_actions.copy(),
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
            obs=tree_map(lambda x: torch.from_numpy(x).reshape(flat, *x.shape[2:]), self.obs),
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
