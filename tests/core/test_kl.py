import pytest
import torch

from palate.core.kl import AdaptiveKLController, FixedKLController, kl_k3, kl_shaped_rewards


def test_kl_shaped_rewards_hand_values_left_and_right_padding():
    scores = torch.tensor([2.0, -1.0])
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [0.0, -1.0, -1.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [0.0, -2.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    rewards, kl = kl_shaped_rewards(scores, logp, ref, mask, kl_coef=0.1)
    expected_kl = torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.0, 1.0, 0.0, -2.0]])
    torch.testing.assert_close(kl, expected_kl)
    expected = -0.1 * expected_kl
    expected[0, 2] += 2.0  # last real token of row 0 (right padded)
    expected[1, 3] += -1.0  # last real token of row 1 (left padded)
    torch.testing.assert_close(rewards, expected)


def test_k3_is_nonnegative_and_zero_at_equality():
    logp = torch.randn(100)
    ref = torch.randn(100)
    assert (kl_k3(logp, ref) >= 0).all()
    assert kl_k3(logp, logp).abs().max() == 0


def test_adaptive_controller_moves_beta_towards_target():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000, k_beta=0.1)
    up = ctl.update(kl=12.0, n_steps=256)  # error clipped to +0.2
    assert abs(up - 0.2 * (1 + 0.1 * 0.2 * 256 / 10000)) < 1e-12
    ctl2 = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    down = ctl2.update(kl=3.0, n_steps=256)  # error -0.5 clipped to -0.2
    assert down < 0.2
    assert FixedKLController(0.05).update(100.0, 256) == 0.05


def test_kl_budget_stops_on_the_two_batch_mean_and_round_trips_its_state():
    from palate.core.kl import KLBudget

    budget = KLBudget(9.0)
    assert not budget.check(8.0, 0) and not budget.check(9.5, 1)  # means 8.0, 8.75
    assert budget.check(9.2, 2)  # mean of 9.5 and 9.2 is 9.35 > 9
    assert budget.stopped["iteration"] == 2 and budget.stopped["mean_kl_last_2"] == pytest.approx(9.35)
    assert budget.history == [8.0, 9.5]  # the batch past the budget is not recorded as trained on
    again = KLBudget(9.0)
    again.load_state_dict(budget.state_dict())
    assert again.history == budget.history and again.stopped == budget.stopped
    assert not KLBudget(None).check(1e9, 0)
    with pytest.raises(ValueError, match="budget"):
        KLBudget(0.0)
