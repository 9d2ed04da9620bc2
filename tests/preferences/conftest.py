"""Small fixtures shared by the preference tests: a linear-reward toy problem."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from gymnasium import spaces

from palate.preferences.segments import Segment, SegmentPair

OBS_DIM, ACT_DIM = 4, 2
WEIGHTS = np.array([1.0, -2.0, 0.5, 0.0, 1.5, -1.0])


def linear_segment(rng: np.random.Generator, length: int = 10) -> Segment:
    obs = rng.normal(size=(length, OBS_DIM)).astype(np.float32)
    actions = rng.uniform(-1, 1, size=(length, ACT_DIM)).astype(np.float32)
    rewards = np.concatenate([obs, actions], axis=1) @ WEIGHTS
    return Segment(obs, actions, rewards)


def linear_pairs(rng: np.random.Generator, n: int, length: int = 10) -> list[SegmentPair]:
    return [SegmentPair(linear_segment(rng, length), linear_segment(rng, length)) for _ in range(n)]


@pytest.fixture
def box_spaces() -> tuple[spaces.Box, spaces.Box]:
    return (spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32), spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32))


@pytest.fixture
def linear() -> SimpleNamespace:
    """The linear-reward toy problem: r(o, a) = WEIGHTS . [o, a]."""
    return SimpleNamespace(obs_dim=OBS_DIM, act_dim=ACT_DIM, weights=WEIGHTS, segment=linear_segment,
                           pairs=linear_pairs)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small MLPs train several times faster on one thread (and the CI box has two cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
