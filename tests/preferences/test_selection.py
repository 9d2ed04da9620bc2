import numpy as np
import pytest

from palate.errors import PreferenceError
from palate.preferences.selection import DisagreementSelector, QuerySelector, RandomSelector, make_selector


class FixedScorer:
    """Scores pair k by the variance of hand-set member preferences: pair k's score is known."""

    def __init__(self, member_probs: np.ndarray) -> None:
        self.member_probs = member_probs  # [M, n_candidates]
        self.calls = 0

    def disagreement(self, pairs):
        self.calls += 1
        idx = [p.left.info["k"] for p in pairs]
        return self.member_probs[:, idx].var(axis=0)


def _sampler(linear, rng):
    counter = iter(range(10_000))

    def sample(k):
        pairs = linear.pairs(rng, k, length=3)
        for p in pairs:
            p.left.info["k"] = next(counter)
        return pairs

    return sample


def test_disagreement_selector_keeps_the_highest_variance_pairs(linear):
    rng = np.random.default_rng(0)
    probs = np.random.default_rng(1).uniform(0, 1, size=(3, 40))
    scorer = FixedScorer(probs)
    chosen = DisagreementSelector(oversample=10).select(_sampler(linear, rng), 4, scorer)
    expected = set(np.argsort(-probs.var(axis=0))[:4].tolist())
    assert {p.left.info["k"] for p in chosen} == expected
    assert scorer.calls == 1


def test_disagreement_selector_orders_by_score_and_draws_oversample_candidates(linear):
    rng = np.random.default_rng(0)
    drawn = []
    base = _sampler(linear, rng)

    def sample(k):
        drawn.append(k)
        return base(k)

    probs = np.zeros((2, 15))
    probs[0, [3, 7, 11]] = [0.9, 0.6, 0.99]  # variances: 11 > 3 > 7 > rest (0)
    selector = DisagreementSelector(oversample=5)
    chosen = selector.select(sample, 3, FixedScorer(probs))
    assert drawn == [15]
    assert [p.left.info["k"] for p in chosen] == [11, 3, 7]
    assert selector.last_scores[0] == pytest.approx(0.99**2 / 4)


def test_random_selector_and_fallback_without_model(linear):
    rng = np.random.default_rng(0)
    assert len(RandomSelector().select(_sampler(linear, rng), 5, None)) == 5
    assert len(DisagreementSelector().select(_sampler(linear, rng), 5, None)) == 5
    assert DisagreementSelector().select(_sampler(linear, rng), 0, None) == []
    assert isinstance(make_selector("disagreement"), QuerySelector)
    with pytest.raises(PreferenceError, match="unknown query selector"):
        make_selector("greedy")
