"""Best-of-N: the order-statistics estimator, the closed-form KL, the held-out labeller's expected win."""

import math

import numpy as np
import pytest

from palate.lm.best_of_n import best_of_n_curve, bon_kl, expected_win_against_pool, max_of_subset_weights


def test_subset_max_weights_match_enumeration() -> None:
    import itertools

    pool, n = 6, 3
    counts = np.zeros(pool)
    for subset in itertools.combinations(range(pool), n):
        counts[max(subset)] += 1
    assert np.allclose(max_of_subset_weights(pool, n), counts / counts.sum())
    assert max_of_subset_weights(pool, 1) == pytest.approx(np.full(pool, 1 / pool))
    assert max_of_subset_weights(pool, pool)[-1] == 1.0
    with pytest.raises(ValueError, match="best-of-7"):
        max_of_subset_weights(pool, 7)


def test_bon_kl_closed_form() -> None:
    assert bon_kl(1) == 0.0
    assert bon_kl(64) == pytest.approx(math.log(64) - 63 / 64)


def test_curve_n1_is_the_mean_and_n_pool_is_the_rm_pick() -> None:
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    win = rng.uniform(size=(5, 8))
    curve = best_of_n_curve(proxy, gold, win, [1, 8])
    assert curve[0]["gold"] == pytest.approx(gold.mean()) and curve[0]["kl"] == 0.0
    pick = proxy.argmax(1)
    assert curve[1]["gold"] == pytest.approx(gold[np.arange(5), pick].mean())
    assert curve[1]["proxy"] == pytest.approx(proxy.max(1).mean())


def test_expected_win_is_the_labellers_noise_model() -> None:
    gold = np.array([1.0, 0.0, 0.5])
    win = expected_win_against_pool(gold, ["a", "b", "c"], temperature=0.2)
    sig = lambda d: 1 / (1 + math.exp(-d / 0.2))  # noqa: E731
    assert win[0] == pytest.approx((sig(1.0) + sig(0.5)) / 2)
    assert win.mean() == pytest.approx(0.5)  # every pair's two chances sum to one
    # Identical texts tie; a noiseless labeller is a step function.
    assert expected_win_against_pool(np.array([0.3, 0.3]), ["x", "x"], 0.2).tolist() == [0.5, 0.5]
    assert expected_win_against_pool(np.array([1.0, 0.0]), ["x", "y"], 0.0).tolist() == [1.0, 0.0]
