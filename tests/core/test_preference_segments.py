import math

import pytest
import torch

from palate.core.preference import bradley_terry_loss, ensemble_disagreement, segment_returns


def test_segment_returns_sums_and_respects_mask():
    r = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 10.0]])
    assert segment_returns(r).tolist() == [6.0, 9.5]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert segment_returns(r, mask).tolist() == [6.0, -0.5]


def test_ensemble_disagreement_is_variance_of_member_probabilities():
    # Pair 0: members agree exactly -> 0. Pair 1: sigma(0)=0.5 and sigma(ln 3)=0.75.
    r1 = torch.tensor([[1.0, 0.0], [1.0, math.log(3.0)]])
    r2 = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    # Member 0 pair 1: sigma(0) = 0.5; member 1 pair 1: 0.75 -> var = 0.015625.
    var = ensemble_disagreement(r1, r2)
    assert var[0].item() == pytest.approx(0.0, abs=1e-9)
    assert var[1].item() == pytest.approx(0.015625, rel=1e-6)


def test_ensemble_disagreement_low_when_all_members_are_sure():
    # Very different reward gaps, but every member gives ~1: little disagreement.
    r1 = torch.tensor([[20.0], [40.0], [60.0]])
    r2 = torch.zeros(3, 1)
    assert ensemble_disagreement(r1, r2).item() < 1e-12


def test_ensemble_disagreement_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="members, pairs"):
        ensemble_disagreement(torch.zeros(3), torch.zeros(3))


def test_masked_segment_sums_feed_the_loss_like_hand_values():
    # Left sums to 1, right to 0 (last step padded): d = 1, label left -> -log sigma(1).
    left = torch.tensor([[0.5, 0.5]])
    right = torch.tensor([[0.0, 7.0]])
    loss = bradley_terry_loss(segment_returns(left), segment_returns(right, torch.tensor([[1, 0]])), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-6)
