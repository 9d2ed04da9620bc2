"""Query selection: which pairs of segments to show the labeller.

A selector receives a way to sample candidate pairs and returns the ``n`` pairs to ask about.
Two are provided:

* :class:`RandomSelector`: uniformly random pairs (the paper's "no queries" ablation, and the
  first batch, when the ensemble knows nothing yet).
* :class:`DisagreementSelector`: Christiano et al. 2017, section 2.2.4: sample ``oversample`` x
  ``n`` candidate pairs (the paper samples a large number; 10x is our default), score each by the
  variance across ensemble members of the predicted preference, and keep the ``n`` highest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from palate.errors import PreferenceError
from palate.preferences.segments import SegmentPair

#: Returns ``k`` candidate pairs (from the trajectory pool).
PairSampler = Callable[[int], list[SegmentPair]]


@runtime_checkable
class PairScorer(Protocol):
    """Anything that scores candidate pairs by disagreement (a :class:`RewardEnsemble`)."""

    def disagreement(self, pairs: Sequence[SegmentPair]) -> np.ndarray: ...


@runtime_checkable
class QuerySelector(Protocol):
    """Picks the pairs to ask about; plug a new strategy in by implementing ``select``."""

    def select(self, sample_pairs: PairSampler, n: int, scorer: PairScorer | None) -> list[SegmentPair]: ...


class RandomSelector:
    """``n`` uniformly random pairs; ignores the reward model."""

    def select(self, sample_pairs: PairSampler, n: int, scorer: PairScorer | None = None) -> list[SegmentPair]:
        return sample_pairs(n) if n > 0 else []


class DisagreementSelector:
    """Keep the ``n`` of ``oversample * n`` random candidates the ensemble disagrees on most.

    Args:
        oversample: candidates drawn per query kept (10 by default).
    """

    def __init__(self, oversample: int = 10) -> None:
        if oversample < 1:
            raise PreferenceError(f"oversample must be at least 1, got {oversample}")
        self.oversample = int(oversample)
        self.last_scores: np.ndarray | None = None

    def select(self, sample_pairs: PairSampler, n: int, scorer: PairScorer | None) -> list[SegmentPair]:
        if n <= 0:
            return []
        if scorer is None:
            # No reward model yet: nothing to disagree about.
            return sample_pairs(n)
        candidates = sample_pairs(self.oversample * n)
        scores = np.asarray(scorer.disagreement(candidates), dtype=np.float64)
        if scores.shape != (len(candidates),):
            raise PreferenceError(
                f"the scorer returned {scores.shape} disagreement scores for {len(candidates)} candidate pairs"
            )
        # Stable sort on -score: ties keep sampling order, so a fixed seed gives fixed queries.
        best = np.argsort(-scores, kind="stable")[:n]
        self.last_scores = scores[best]
        return [candidates[int(i)] for i in best]


def make_selector(name: str, oversample: int = 10) -> QuerySelector:
    """The selector called ``name`` (``random`` or ``disagreement``)."""
    if name == "random":
        return RandomSelector()
    if name == "disagreement":
        return DisagreementSelector(oversample)
    raise PreferenceError(f"unknown query selector {name!r}; choose 'random' or 'disagreement'")
