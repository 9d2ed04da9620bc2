import math

import torch

from palate.core.ppo import AdaptiveKLPenalty, clipped_surrogate_loss, kl_penalty_loss, value_loss


def test_clipped_surrogate_matches_formula():
    old = torch.log(torch.tensor([0.5, 0.5, 0.2, 0.4]))
    new = torch.log(torch.tensor([0.8, 0.3, 0.2, 0.5]))
    adv = torch.tensor([1.0, -2.0, 0.5, -1.0])
    eps = 0.2
    loss, stats = clipped_surrogate_loss(new, old, adv, eps)
    ratios = [1.6, 0.6, 1.0, 1.25]
    per = []
    for rho, a in zip(ratios, adv.tolist()):
        per.append(min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a))
    assert math.isclose(loss.item(), -sum(per) / 4, rel_tol=1e-5)
    assert math.isclose(stats["clipfrac"].item(), 3 / 4)  # ratios 1.6, 0.6 and 1.25 lie outside [0.8, 1.2]
    expected_kl = sum((r - 1) - math.log(r) for r in ratios) / 4
    assert math.isclose(stats["approx_kl"].item(), expected_kl, rel_tol=1e-5)


def test_clipped_surrogate_respects_mask():
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.1, 0.0, 5.0], [0.0, -0.1, 5.0]])
    adv = torch.ones(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    loss, _ = clipped_surrogate_loss(new, old, adv, 0.2, mask)
    expected = -(math.exp(0.1) + 1 + 1 + math.exp(-0.1)) / 4
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_kl_penalty_loss_matches_formula_and_gradient():
    old = torch.log(torch.tensor([0.5, 0.25]))
    new = torch.log(torch.tensor([0.6, 0.2])).requires_grad_()
    adv = torch.tensor([2.0, -1.0])
    kl = torch.tensor([0.01, 0.03])
    loss, stats = kl_penalty_loss(new, old, adv, kl, kl_coef=3.0)
    expected = -((1.2 * 2.0 + 0.8 * -1.0) / 2 - 3.0 * 0.02)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(stats["approx_kl"].item(), 0.02, rel_tol=1e-6)
    loss.backward()
    # d/dlogp of -rho*A/2 is -rho*A/2.
    torch.testing.assert_close(new.grad, torch.tensor([-1.2, 0.4]))


def test_value_loss_clipping_is_pessimistic():
    values = torch.tensor([2.0, 0.0])
    old = torch.tensor([1.0, 0.0])
    returns = torch.tensor([3.0, 1.0])
    plain, _ = value_loss(values, old, returns)
    assert math.isclose(plain.item(), 0.5 * (1 + 1) / 2)
    clipped, stats = value_loss(values, old, returns, clip_range_vf=0.5)
    # first: clipped value 1.5 -> (1.5-3)^2 = 2.25 > 1; second: unchanged.
    assert math.isclose(clipped.item(), 0.5 * (2.25 + 1) / 2)
    assert math.isclose(stats["vf_clipfrac"].item(), 0.5)


def test_adaptive_kl_penalty_doubles_and_halves():
    ctl = AdaptiveKLPenalty(init_kl_coef=1.0, target=0.01)
    assert ctl.update(0.02) == 2.0  # > 1.5 * d_targ
    assert ctl.update(0.012) == 2.0  # inside the band
    assert ctl.update(0.001) == 1.0  # < d_targ / 1.5
