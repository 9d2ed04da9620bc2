"""Observation and reward normalisation, done in the trainer's process so the statistics travel
with the checkpoint (a policy trained on normalised observations is useless without them).

Same rules as Stable-Baselines3's VecNormalize, so presets tuned there transfer: observations are
whitened by a running mean/variance and clipped; rewards are divided (not centred) by the running
standard deviation of the discounted return, which keeps their sign and the meaning of termination.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from palate.rl.spaces import ObsLayout


class RunningMeanStd:
    """Running mean and variance over batches (Chan et al.'s parallel update), in float64."""

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4) -> None:
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = epsilon

    def update(self, batch: np.ndarray) -> None:
        """Fold a batch ``[B, *shape]`` into the statistics."""
        # Written out rather than np.mean/np.var: this runs every env step on a few rows, where
        # those functions' generic argument handling costs more than the arithmetic.
        batch = np.asarray(batch, np.float64)
        batch_count = batch.shape[0]
        batch_mean = batch.sum(axis=0) / batch_count
        batch_var = np.square(batch - batch_mean).sum(axis=0) / batch_count
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean = self.mean + delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        # Plain lists, so checkpoints load with torch.load(weights_only=True).
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": float(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = np.asarray(state["mean"], np.float64).copy()
        self.var = np.asarray(state["var"], np.float64).copy()
        self.count = float(state["count"])


class ObsNormalizer:
    """(obs - mean) / sqrt(var + eps), clipped; the statistics update only while ``training``."""

    def __init__(self, shape: tuple[int, ...], enabled: bool, clip: float = 10.0, eps: float = 1e-8) -> None:
        self.enabled = enabled
        self.clip = clip
        self.eps = eps
        self.rms = RunningMeanStd(shape)

    def __call__(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        """Normalised float32 copy of ``obs`` ``[B, *shape]``; ``update`` folds it in first."""
        if not self.enabled:
            return obs.astype(np.float32)
        if update:
            self.rms.update(obs)
        out = (obs - self.rms.mean) / np.sqrt(self.rms.var + self.eps)
        # np.minimum/np.maximum rather than np.clip: the same numbers without np.clip's wrapper,
        # which costs more than the arithmetic on the few rows of a rollout step.
        np.maximum(out, -self.clip, out=out)
        np.minimum(out, self.clip, out=out)
        return out.astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "clip": self.clip, "rms": self.rms.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.enabled = bool(state["enabled"])
        self.clip = float(state["clip"])
        self.rms.load_state_dict(state["rms"])


class PartsNormalizer:
    """:class:`ObsNormalizer` for the float Box parts of a parts observation; the rest pass through.

    Images are never whitened (the network scales them by 1/255, and per-pixel statistics of
    uint8 frames would cost four times the buffer's memory for no gain), nor are discrete parts
    (they become one-hot). Same interface as :class:`ObsNormalizer`, so the trainer holds either.
    """

    def __init__(self, layout: ObsLayout, enabled: bool, clip: float = 10.0, eps: float = 1e-8) -> None:
        self.enabled = enabled
        self.norms = {p.key: ObsNormalizer(p.shape, enabled, clip, eps) for p in layout.parts if p.kind == "box"}

    def __call__(self, obs: dict[str, np.ndarray], update: bool = False) -> dict[str, np.ndarray]:
        """A new dict: Box parts normalised (float32), the others the same arrays."""
        out = dict(obs)
        for key, norm in self.norms.items():
            out[key] = norm(obs[key], update)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "parts": {k: n.state_dict() for k, n in self.norms.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.enabled = bool(state["enabled"])
        for key, norm in self.norms.items():
            norm.load_state_dict(state["parts"][key])


class RewardNormalizer:
    """r / sqrt(Var[G] + eps) with G the running discounted return of each env, clipped.

    Applied row by row over a ``[T, N]`` rollout so the result equals per-step normalisation.
    """

    def __init__(self, n_envs: int, gamma: float, enabled: bool, clip: float = 10.0, eps: float = 1e-8) -> None:
        self.enabled = enabled
        self.gamma = gamma
        self.clip = clip
        self.eps = eps
        self.rms = RunningMeanStd(())
        self.returns = np.zeros(n_envs, np.float64)

    def __call__(self, rewards: np.ndarray, episode_end: np.ndarray) -> np.ndarray:
        """Normalise ``rewards [T, N]`` given ``episode_end [T, N]`` (resets the running return)."""
        if not self.enabled:
            return rewards.astype(np.float32)
        out = np.empty(rewards.shape, np.float32)
        for t in range(rewards.shape[0]):
            self.returns = self.returns * self.gamma + rewards[t]
            self.rms.update(self.returns)
            out[t] = np.clip(rewards[t] / np.sqrt(self.rms.var + self.eps), -self.clip, self.clip)
            self.returns[episode_end[t]] = 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "clip": self.clip, "rms": self.rms.state_dict(),
                "returns": self.returns.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.enabled = bool(state["enabled"])
        self.clip = float(state["clip"])
        self.rms.load_state_dict(state["rms"])
        self.returns = np.asarray(state["returns"], np.float64).copy()
