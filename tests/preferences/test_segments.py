import numpy as np
import pytest

from palate.errors import PreferenceError
from palate.preferences.segments import TrajectoryPool, sample_segments


def _rollout(T, N, done_at):
    """obs[t, i] = [100 * i + t]: each row's value identifies env and step."""
    obs = np.array([[[100 * i + t] for i in range(N)] for t in range(T)], dtype=np.float32)
    actions = np.zeros((T, N, 1), np.float32)
    rewards = obs[..., 0].astype(np.float64)
    terminated = np.zeros((T, N), bool)
    truncated = np.zeros((T, N), bool)
    for t, i in done_at:
        terminated[t, i] = True
    return {"obs": obs, "actions": actions, "true_rewards": rewards, "terminated": terminated,
            "truncated": truncated}


def test_rollout_split_at_episode_ends_and_continued_across_rollouts():
    pool = TrajectoryPool(max_steps=1000)
    pool.add_rollout(_rollout(6, 2, done_at=[(2, 0)]))
    pool.add_rollout(_rollout(4, 2, done_at=[(1, 1)]))
    trajs = pool.trajectories()
    lengths = sorted(len(t) for t in trajs)
    # env 0: episode of 3 steps then 3 + 4 = 7 open; env 1: 6 + 2 = 8 closed, then 2 open.
    assert lengths == [2, 3, 7, 8]
    assert pool.completed_lengths == [3, 8]
    returns, _ = pool.drain_episode_stats()
    assert returns[0] == pytest.approx(0 + 1 + 2)
    assert pool.drain_episode_stats() == ([], [])
    assert len(pool) == 20


def test_segments_never_cross_episode_boundaries():
    pool = TrajectoryPool(max_steps=1000)
    pool.add_rollout(_rollout(50, 3, done_at=[(9, 0), (29, 0), (19, 1), (44, 2)]))
    rng = np.random.default_rng(0)
    for seg in pool.sample_segments(200, 8, rng):
        steps = seg.obs[:, 0] % 100
        assert len(seg) == 8
        assert np.all(np.diff(steps) == 1), "a segment must be consecutive steps of one env"
        env = int(seg.obs[0, 0] // 100)
        ends = {0: [9, 29], 1: [19], 2: [44]}[env]
        for e in ends:
            assert not (steps[0] <= e < steps[-1]), "segment crossed the end of an episode"


def test_short_episodes_give_shorter_equal_length_pairs():
    pool = TrajectoryPool(max_steps=1000)
    for length in (3, 5, 4):
        pool.add_trajectory(np.zeros((length, 1)), np.zeros((length, 1)), np.ones(length))
    pairs = pool.sample_pairs(10, 25, np.random.default_rng(1))
    assert all(len(p.left) == len(p.right) == 5 for p in pairs)


def test_pool_evicts_oldest_and_bounds_endless_episodes():
    pool = TrajectoryPool(max_steps=100, max_open_steps=30)
    for k in range(10):
        pool.add_trajectory(np.full((20, 1), k), np.zeros((20, 1)), np.zeros(20))
    assert len(pool) <= 100
    assert min(int(t.obs[0, 0]) for t in pool.trajectories()) >= 5
    # An episode that never ends is flushed in pieces.
    pool2 = TrajectoryPool(max_steps=100, max_open_steps=30)
    for _ in range(5):
        pool2.add_rollout(_rollout(20, 1, done_at=[]))
    assert len(pool2) <= 130


def test_empty_pool_and_bad_length_raise():
    with pytest.raises(PreferenceError, match="no trajectories"):
        sample_segments([], 1, 5, np.random.default_rng(0))
    pool = TrajectoryPool()
    pool.add_trajectory(np.zeros((5, 1)), np.zeros((5, 1)), np.zeros(5))
    with pytest.raises(PreferenceError, match="segment_length"):
        pool.sample_segments(1, 0, np.random.default_rng(0))
    with pytest.raises(PreferenceError, match="true_rewards"):
        pool.add_rollout({"obs": np.zeros((2, 1, 1))})
