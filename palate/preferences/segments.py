"""Trajectory segments and the pool they are cut from.

Christiano et al. 2017 ask for comparisons of short clips (1-2 seconds; 25 steps of a MuJoCo
task at 60 Hz-ish control is 1.5 s) rather than whole episodes: a clip is quick to judge and many
clips come from one episode. This module keeps a bounded pool of the policy's *recent*
trajectories (old behaviour is of little use to the reward model once the policy moved on) and
cuts fixed-length segments from it.

Variable-length episodes. The paper uses fixed-length episodes so that the moment an episode
ends cannot tell the agent anything about the reward. palate does the same where the
environment allows it (``PreferenceConfig.fixed_length_episodes`` turns off the early
termination of MuJoCo locomotion tasks); elsewhere episodes keep their natural length and a
segment is never padded and never crosses an episode boundary. Segments are cut only from
trajectories at least ``segment_length`` long; when the pool holds none that long (a falling
CartPole under a random policy), both sides of each pair are cut at the longest length the pool
offers instead, so the two clips a labeller compares always cover the same number of steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from palate.errors import PreferenceError


@dataclass
class Segment:
    """A clip of consecutive steps from one episode.

    Attributes:
        obs: ``[L, *obs_shape]`` raw observations o_t (never normalised: the reward model keeps
            its own input statistics).
        actions: ``[L, *act_shape]`` actions a_t taken on them.
        true_rewards: ``[L]`` the environment's reward; only the synthetic oracle and the
            metrics read it, never the agent.
        info: provenance (episode id, start step) for rendering and debugging.
    """

    obs: np.ndarray
    actions: np.ndarray
    true_rewards: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    @property
    def true_return(self) -> float:
        """sum_t r(o_t, a_t) under the environment's reward."""
        return float(np.sum(self.true_rewards))

    def copy(self) -> Segment:
        """The segment with arrays of its own (a view into the pool would keep a whole trajectory alive)."""
        return Segment(self.obs.copy(), self.actions.copy(), self.true_rewards.astype(np.float64, copy=True),
                       dict(self.info))


@dataclass
class SegmentPair:
    """The two clips of one comparison; ``left`` is sigma^1 and ``right`` sigma^2 in the paper."""

    left: Segment
    right: Segment

    def copy(self) -> SegmentPair:
        """Both segments with arrays of their own (see :meth:`Segment.copy`)."""
        return SegmentPair(self.left.copy(), self.right.copy())


@dataclass
class Trajectory:
    """A contiguous stretch of one episode (a whole episode when ``finished``)."""

    obs: np.ndarray
    actions: np.ndarray
    true_rewards: np.ndarray
    finished: bool
    episode_id: int
    start: int = 0

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    def cut(self, start: int, length: int, copy: bool = True) -> Segment:
        """Steps ``start:start+length``; ``copy=False`` gives views into this trajectory (candidates only)."""
        end = start + length
        seg = Segment(
            obs=self.obs[start:end],
            actions=self.actions[start:end],
            true_rewards=self.true_rewards[start:end],
            info={"episode": self.episode_id, "start": self.start + start},
        )
        return seg.copy() if copy else seg


class _OpenEpisode:
    """Steps of an episode still running in one vector-env slot, kept as a list of chunks."""

    def __init__(self, episode_id: int) -> None:
        self.episode_id = episode_id
        self.start = 0
        self.obs: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.rewards: list[np.ndarray] = []
        self.length = 0
        self.true_return = 0.0

    def append(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
        if len(obs) == 0:
            return
        self.obs.append(obs)
        self.actions.append(actions)
        self.rewards.append(rewards)
        self.length += len(obs)
        self.true_return += float(np.sum(rewards))

    def to_trajectory(self, finished: bool) -> Trajectory:
        return Trajectory(
            obs=np.concatenate(self.obs),
            actions=np.concatenate(self.actions),
            true_rewards=np.concatenate(self.rewards).astype(np.float64),
            finished=finished,
            episode_id=self.episode_id,
            start=self.start,
        )


class TrajectoryPool:
    """A bounded pool of the policy's recent trajectories, fed by the trainer's rollout callback.

    ``add_rollout`` is the ``rollout_callback`` of :class:`palate.rl.PPO`/``TRPO``: it receives
    ``obs [T, N, ...]``, ``actions [T, N, ...]``, ``true_rewards [T, N]``, ``terminated [T, N]``
    and ``truncated [T, N]`` and splits each env's column at episode ends. Episodes still running
    at the end of a rollout stay open and continue with the next rollout, so a segment can span
    two rollouts of the same episode. Oldest trajectories are evicted once the pool holds more
    than ``max_steps`` steps.

    Args:
        max_steps: capacity in environment steps (the "recent" window segments are cut from).
        max_open_steps: an episode that never ends (no time limit) is flushed into the pool in
            pieces of this many steps, so memory stays bounded.
    """

    def __init__(self, max_steps: int = 100_000, max_open_steps: int | None = None) -> None:
        if max_steps <= 0:
            raise PreferenceError(f"trajectory pool max_steps must be positive, got {max_steps}")
        self.max_steps = int(max_steps)
        self.max_open_steps = int(max_open_steps or max(1, max_steps // 4))
        self._closed: deque[Trajectory] = deque()
        self._closed_steps = 0
        self._open: list[_OpenEpisode] = []
        self._next_episode = 0
        self.completed_returns: list[float] = []
        self.completed_lengths: list[int] = []
        self.total_steps = 0

    # ---------------------------------------------------------------- feeding
    def _new_episode(self) -> _OpenEpisode:
        ep = _OpenEpisode(self._next_episode)
        self._next_episode += 1
        return ep

    def _push(self, traj: Trajectory) -> None:
        if len(traj) == 0:
            return
        self._closed.append(traj)
        self._closed_steps += len(traj)
        while self._closed_steps > self.max_steps and len(self._closed) > 1:
            old = self._closed.popleft()
            self._closed_steps -= len(old)

    def add_rollout(self, batch: dict[str, np.ndarray]) -> None:
        """The trainer's ``rollout_callback``: split a ``[T, N]`` rollout at episode ends."""
        try:
            obs, actions = np.asarray(batch["obs"]), np.asarray(batch["actions"])
            rewards = np.asarray(batch["true_rewards"], dtype=np.float64)
            done = np.logical_or(np.asarray(batch["terminated"]), np.asarray(batch["truncated"]))
        except KeyError as err:
            raise PreferenceError(
                f"rollout batch lacks {err.args[0]!r}; the trainer's rollout_callback must pass "
                "obs, actions, true_rewards, terminated and truncated"
            ) from err
        if obs.ndim < 2 or rewards.shape != done.shape or obs.shape[:2] != rewards.shape:
            raise PreferenceError(
                f"rollout arrays must be [T, N, ...] with matching T and N; got obs {obs.shape}, "
                f"true_rewards {rewards.shape}, done {done.shape}"
            )
        n_envs = rewards.shape[1]
        if len(self._open) != n_envs:
            # First rollout, or a trainer with a different number of envs: start afresh.
            for ep in self._open:
                if ep.length:
                    self._push(ep.to_trajectory(finished=False))
            self._open = [self._new_episode() for _ in range(n_envs)]
        for i in range(n_envs):
            self.add_env_steps(i, obs[:, i], actions[:, i], rewards[:, i], done[:, i])

    def add_env_steps(self, slot: int, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                      done: np.ndarray) -> None:
        """Append consecutive steps of vector-env slot ``slot``; ``done[t]`` ends an episode after step t."""
        while len(self._open) <= slot:
            self._open.append(self._new_episode())
        self.total_steps += len(rewards)
        begin = 0
        for end in np.flatnonzero(done).tolist():
            ep = self._open[slot]
            ep.append(obs[begin:end + 1], actions[begin:end + 1], rewards[begin:end + 1])
            self.completed_returns.append(ep.true_return)
            self.completed_lengths.append(ep.start + ep.length)
            self._push(ep.to_trajectory(finished=True))
            self._open[slot] = self._new_episode()
            begin = end + 1
        if begin < len(rewards):
            self._open[slot].append(obs[begin:], actions[begin:], rewards[begin:])
        ep = self._open[slot]
        if ep.length > self.max_open_steps:
            # An episode with no end in sight: keep memory bounded by flushing it as a piece.
            piece = ep.to_trajectory(finished=False)
            self._push(piece)
            nxt = _OpenEpisode(ep.episode_id)
            nxt.start = ep.start + ep.length
            nxt.true_return = ep.true_return
            self._open[slot] = nxt

    def add_trajectory(self, obs: np.ndarray, actions: np.ndarray, true_rewards: np.ndarray,
                       finished: bool = True) -> None:
        """Add one whole trajectory (used by the random-policy warm-up and by tests)."""
        traj = Trajectory(np.asarray(obs), np.asarray(actions), np.asarray(true_rewards, dtype=np.float64),
                          finished, self._next_episode)
        self._next_episode += 1
        self.total_steps += len(traj)
        if finished:
            self.completed_returns.append(float(np.sum(true_rewards)))
            self.completed_lengths.append(len(traj))
        self._push(traj)

    def close_open_episodes(self) -> None:
        """Keep the running episodes as unfinished trajectories and start new ones in every slot.

        For a resume whose environments could not be restored: their next steps belong to new
        episodes, and appending them to the old ones would cut segments across the seam.
        """
        for ep in self._open:
            if ep.length:
                self._push(ep.to_trajectory(finished=False))
        self._open = [self._new_episode() for _ in self._open]

    def drain_episode_stats(self) -> tuple[list[float], list[int]]:
        """True returns and lengths of the episodes finished since the last call (for metrics)."""
        returns, lengths = self.completed_returns, self.completed_lengths
        self.completed_returns, self.completed_lengths = [], []
        return returns, lengths

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything in the pool, open episodes included, as NumPy arrays and plain values.

        A resumed run cuts its next segments from exactly the steps the interrupted one held; the
        running sums (episode returns) are saved as they are rather than recomputed, so they stay
        bit-for-bit what continuing without a restart would have given.
        """
        def arrays(ep: _OpenEpisode) -> tuple[np.ndarray, ...] | None:
            return tuple(np.concatenate(x) for x in (ep.obs, ep.actions, ep.rewards)) if ep.length else None

        return {
            "max_steps": self.max_steps,
            "max_open_steps": self.max_open_steps,
            "closed": [(t.obs, t.actions, t.true_rewards, t.finished, t.episode_id, t.start) for t in self._closed],
            "open": [{"episode_id": ep.episode_id, "start": ep.start, "length": ep.length,
                      "true_return": ep.true_return, "arrays": arrays(ep)} for ep in self._open],
            "next_episode": self._next_episode,
            "completed_returns": list(self.completed_returns),
            "completed_lengths": list(self.completed_lengths),
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; replaces the pool's contents."""
        self.max_steps, self.max_open_steps = int(state["max_steps"]), int(state["max_open_steps"])
        self._closed = deque(Trajectory(obs, actions, rewards, bool(finished), int(episode), int(start))
                             for obs, actions, rewards, finished, episode, start in state["closed"])
        self._closed_steps = sum(len(t) for t in self._closed)
        self._open = []
        for item in state["open"]:
            ep = _OpenEpisode(int(item["episode_id"]))
            ep.start = int(item["start"])
            if item["arrays"] is not None:
                ep.obs, ep.actions, ep.rewards = ([a] for a in item["arrays"])
            ep.length = int(item["length"])
            ep.true_return = float(item["true_return"])
            self._open.append(ep)
        self._next_episode = int(state["next_episode"])
        self.completed_returns = list(state["completed_returns"])
        self.completed_lengths = list(state["completed_lengths"])
        self.total_steps = int(state["total_steps"])

    # ---------------------------------------------------------------- reading
    def trajectories(self) -> list[Trajectory]:
        """Every trajectory in the pool, including the still-running episodes."""
        out = list(self._closed)
        out.extend(ep.to_trajectory(finished=False) for ep in self._open if ep.length)
        return out

    def __len__(self) -> int:
        return self._closed_steps + sum(ep.length for ep in self._open)

    def recent_transitions(self, max_steps: int, rng: np.random.Generator | None = None
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Up to ``max_steps`` (obs, action, true reward) rows from the pool, subsampled uniformly.

        These are the states the policy visits now: the reward model's output statistics and the
        r_hat-vs-true-reward correlation are measured on them.
        """
        trajs = self.trajectories()
        if not trajs:
            raise PreferenceError("the trajectory pool is empty; collect a rollout before asking for transitions")
        lengths = np.array([len(t) for t in trajs])
        total = int(lengths.sum())
        if total > max_steps:
            rng = rng or np.random.default_rng(0)
            idx = np.sort(rng.choice(total, size=max_steps, replace=False))
        else:
            idx = np.arange(total)
        # Gather the chosen rows trajectory by trajectory: concatenating the whole pool first
        # would copy all of it (a 25k-step Atari pool is 700 MB of frames).
        offsets = np.cumsum(lengths) - lengths
        which = np.searchsorted(offsets, idx, side="right") - 1
        picks = [(trajs[k], idx[which == k] - offsets[k]) for k in np.unique(which)]
        obs = np.concatenate([t.obs[rows] for t, rows in picks])
        actions = np.concatenate([t.actions[rows] for t, rows in picks])
        rewards = np.concatenate([t.true_rewards[rows] for t, rows in picks])
        return obs, actions, rewards

    def sample_segments(self, n: int, length: int, rng: np.random.Generator, copy: bool = True) -> list[Segment]:
        """``n`` segments of ``length`` steps (or the longest length available, see module doc).

        Start positions are uniform over every valid start in the pool, so a long episode gives
        proportionally more clips than a short one. ``copy=False`` returns views into the pool:
        for candidates that are scored and mostly thrown away (ten 700 KB Atari clips per pair
        kept); copy the ones kept (:meth:`SegmentPair.copy`).
        """
        return sample_segments(self.trajectories(), n, length, rng, copy)

    def sample_pairs(self, n: int, length: int, rng: np.random.Generator, copy: bool = True) -> list[SegmentPair]:
        """``n`` pairs of independently sampled segments, both sides of equal length (``copy``: as above)."""
        segs = self.sample_segments(2 * n, length, rng, copy)
        return [SegmentPair(segs[2 * k], segs[2 * k + 1]) for k in range(n)]


def effective_segment_length(lengths: Iterable[int], length: int) -> int:
    """``length`` if some trajectory is that long, else the longest trajectory's length."""
    longest = max(lengths, default=0)
    if longest <= 0:
        raise PreferenceError("no trajectories to cut segments from; collect experience first")
    return min(length, longest)


def sample_segments(trajectories: Sequence[Trajectory], n: int, length: int,
                    rng: np.random.Generator, copy: bool = True) -> list[Segment]:
    """Cut ``n`` segments uniformly over valid start positions; never across an episode end."""
    if length <= 0:
        raise PreferenceError(f"segment_length must be positive, got {length}")
    eff = effective_segment_length((len(t) for t in trajectories), length)
    eligible = [t for t in trajectories if len(t) >= eff]
    starts = np.array([len(t) - eff + 1 for t in eligible], dtype=np.float64)
    probs = starts / starts.sum()
    which = rng.choice(len(eligible), size=n, p=probs)
    out = []
    for k in which:
        traj = eligible[int(k)]
        start = int(rng.integers(0, len(traj) - eff + 1))
        out.append(traj.cut(start, eff, copy))
    return out
