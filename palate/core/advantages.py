"""Generalised advantage estimation (Schulman et al. 2016).

Termination and truncation are different things: a terminated episode has no future (V = 0), a
truncated one does (bootstrap with V(final observation)). Both cut the recursion, because the next
row of the buffer belongs to a new episode.
"""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    episode_end: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) over a ``[T, N]`` rollout.

    Args:
        rewards: r_t, shape ``[T, N]``.
        values: V(s_t), shape ``[T, N]``.
        next_values: V(s_{t+1}) where s_{t+1} is the observation that followed step t; for a
            truncated step it must be V(final observation), not V(reset observation).
        terminated: 1 where the episode ended in a terminal state after step t (no bootstrap).
        episode_end: 1 where the episode ended after step t for any reason (terminated or
            truncated): the recursion stops there.
        gamma: discount factor (gamma).
        lam: GAE parameter (lambda).

    Returns:
        ``(advantages, returns)`` with ``returns = advantages + values`` (the value target).
    """
    if not (rewards.shape == values.shape == next_values.shape == terminated.shape == episode_end.shape):
        raise ValueError(
            f"gae: all inputs must share one [T, N] shape, got rewards {tuple(rewards.shape)}, "
            f"values {tuple(values.shape)}, next_values {tuple(next_values.shape)}"
        )
    not_terminal = 1.0 - terminated.to(values.dtype)
    not_end = 1.0 - episode_end.to(values.dtype)
    deltas = rewards + gamma * not_terminal * next_values - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = deltas[t] + gamma * lam * not_end[t] * running
        advantages[t] = running
    return advantages, advantages + values


def gae_masked(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over token sequences ``[B, L]`` with a mask of real (generated) tokens.

    Each row is one episode whose actions are the tokens where ``mask`` is 1 (contiguous, any
    padding on either side). The episode terminates after its last real token, so nothing is
    bootstrapped past it; padded positions get zero advantage and a return equal to their value.
    """
    mask = mask.to(values.dtype)
    rewards = rewards * mask
    values = values * mask
    batch, length = rewards.shape
    advantages = torch.zeros_like(values)
    running = torch.zeros(batch, dtype=values.dtype, device=values.device)
    next_value = torch.zeros(batch, dtype=values.dtype, device=values.device)
    for t in range(length - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = m * (delta + gamma * lam * running) + (1 - m) * running
        # Padding keeps the running sums of the tokens after it (left padding) untouched.
        next_value = m * values[:, t] + (1 - m) * next_value
        advantages[:, t] = m * running
    return advantages, advantages + values
