import numpy as np
import pytest

from palate.errors import PreferenceError
from palate.preferences.labellers import Labeller, Query, SyntheticOracle, label_to_mu
from palate.preferences.segments import Segment, SegmentPair


def _pair(r_left, r_right):
    seg = lambda r: Segment(np.zeros((1, 1)), np.zeros((1, 1)), np.array([r], float))  # noqa: E731
    return SegmentPair(seg(r_left), seg(r_right))


def test_label_vocabulary():
    assert [label_to_mu(x) for x in ("left", "right", "equal", "cant_tell")] == [1.0, 0.0, 0.5, None]
    with pytest.raises(PreferenceError, match="'better'.*comparison 'c1'"):
        label_to_mu("better", "c1")


def test_exact_oracle_prefers_higher_return():
    oracle = SyntheticOracle(temperature=0.0, error_rate=0.0, rng=np.random.default_rng(0))
    assert isinstance(oracle, Labeller)
    queries = [Query.new(_pair(1.0, 0.0)), Query.new(_pair(-5.0, 3.0))]
    oracle.submit(queries)
    answers = oracle.collect()
    assert [(a.id, a.label) for a in answers] == [(queries[0].id, "left"), (queries[1].id, "right")]
    assert oracle.collect() == []


def test_boltzmann_on_normalised_returns_is_scale_free():
    # The same relative gap must give the same answer rates whatever the reward scale.
    rates = []
    for scale in (0.01, 1000.0):
        oracle = SyntheticOracle(temperature=1.0, error_rate=0.0, rng=np.random.default_rng(0))
        rng = np.random.default_rng(1)
        pairs = [_pair(scale * a, scale * b) for a, b in rng.normal(size=(2000, 2))]
        oracle.submit([Query.new(p) for p in pairs])
        labels = [a.label for a in oracle.collect()]
        rates.append(np.mean([lab == ("left" if p.left.true_return > p.right.true_return else "right")
                              for lab, p in zip(labels, pairs)]))
    assert rates[0] == pytest.approx(rates[1], abs=0.03)
    assert 0.6 < rates[0] < 0.9  # neither deterministic nor random at temperature 1
    # P for a one-std gap at temperature 1 is sigma(1).
    assert oracle.preference_probability(_pair(oracle.moments.std, 0).left, _pair(0, 0).left) == pytest.approx(
        1 / (1 + np.exp(-1)), rel=1e-6)


def test_error_model_answers_at_random():
    oracle = SyntheticOracle(temperature=0.0, error_rate=1.0, rng=np.random.default_rng(0))
    oracle.submit([Query.new(_pair(100.0, 0.0)) for _ in range(2000)])
    left = np.mean([a.label == "left" for a in oracle.collect()])
    assert left == pytest.approx(0.5, abs=0.04)


def test_equal_margin_gives_equal_answers():
    oracle = SyntheticOracle(temperature=0.0, error_rate=0.0, equal_margin=0.5, rng=np.random.default_rng(0))
    oracle.submit([Query.new(_pair(1.0, 0.99)), Query.new(_pair(10.0, -10.0))])
    assert [a.label for a in oracle.collect()] == ["equal", "left"]
