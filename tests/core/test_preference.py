import math
from itertools import combinations

import torch

from palate.core.preference import (
    best_of_k_loss,
    bradley_terry_loss,
    dpo_loss,
    pairwise_loss,
    preference_probability,
    ranking_loss,
)


def test_bradley_terry_hand_values():
    r1 = torch.tensor([1.0, 0.0, 2.0])
    r2 = torch.tensor([0.0, 0.0, -1.0])
    label = torch.tensor([1.0, 0.5, 0.0])
    loss = bradley_terry_loss(r1, r2, label)
    p = [1 / (1 + math.exp(-1)), 0.5, 1 / (1 + math.exp(-3))]
    expected = -(math.log(p[0]) + 0.5 * math.log(0.5) + 0.5 * math.log(0.5) + math.log(1 - p[2])) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_error_model_mixes_in_uniform_answers():
    r1, r2 = torch.tensor([30.0]), torch.tensor([0.0])
    p = preference_probability(r1, r2, error_rate=0.1)
    assert math.isclose(p.item(), 0.95, rel_tol=1e-6)
    # A confident wrong prediction costs at most -log(0.05) under the error model.
    loss = bradley_terry_loss(r1, r2, torch.tensor([0.0]), error_rate=0.1)
    assert math.isclose(loss.item(), -math.log(0.05), rel_tol=1e-4)
    d = 0.7
    loss = bradley_terry_loss(torch.tensor([d]), torch.tensor([0.0]), torch.tensor([1.0]), error_rate=0.1)
    assert math.isclose(loss.item(), -math.log(0.9 / (1 + math.exp(-d)) + 0.05), rel_tol=1e-6)


def test_ranking_loss_is_mean_of_its_pairwise_losses():
    torch.manual_seed(0)
    rewards = torch.randn(2, 4)
    ranks = torch.tensor([[2, 0, 3, 1], [0, 1, 1, 2]])  # second prompt has a tie
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    loss, acc = ranking_loss(rewards, ranks, valid)
    per_prompt = []
    for b in range(2):
        pairs = []
        idx = [i for i in range(4) if valid[b, i]]
        for i, j in combinations(idx, 2):
            if ranks[b, i] == ranks[b, j]:
                continue
            w, lo = (i, j) if ranks[b, i] < ranks[b, j] else (j, i)
            pairs.append(pairwise_loss(rewards[b, w : w + 1], rewards[b, lo : lo + 1]))
        per_prompt.append(torch.stack(pairs).mean())
    torch.testing.assert_close(loss, torch.stack(per_prompt).mean())
    assert 0.0 <= acc.item() <= 1.0


def test_best_of_k_hand_values():
    rewards = torch.tensor([[1.0, 2.0, 0.0, -1.0]])
    loss = best_of_k_loss(rewards, torch.tensor([1]))
    z = sum(math.exp(x) for x in [1.0, 2.0, 0.0, -1.0])
    assert math.isclose(loss.item(), -math.log(math.exp(2.0) / z), rel_tol=1e-6)
    valid = torch.tensor([[1, 1, 0, 0]]).bool()
    loss = best_of_k_loss(rewards, torch.tensor([0]), valid)
    assert math.isclose(loss.item(), -math.log(math.exp(1) / (math.exp(1) + math.exp(2))), rel_tol=1e-6)


def test_dpo_loss_hand_values():
    # Pair 1: policy moved +1 on the chosen, -0.5 on the rejected -> margin 1.5 nats, x beta 0.5.
    # Pair 2: the wrong way round by 2 nats.
    pw, pl = torch.tensor([-9.0, -4.0]), torch.tensor([-10.5, -5.0])
    rw, rl = torch.tensor([-10.0, -3.0]), torch.tensor([-10.0, -6.0])
    out = dpo_loss(pw, pl, rw, rl, beta=0.5)
    z = [0.5 * 1.5, 0.5 * -2.0]
    expected = sum(math.log1p(math.exp(-x)) for x in z) / 2
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.25, 0.5]))
    assert out.accuracy.item() == 0.5
    # cDPO: -(1 - eps) log sigma(z) - eps log sigma(-z).
    eps = 0.1
    smoothed = dpo_loss(pw, pl, rw, rl, beta=0.5, label_smoothing=eps)
    expected = sum((1 - eps) * math.log1p(math.exp(-x)) + eps * math.log1p(math.exp(x)) for x in z) / 2
    assert math.isclose(smoothed.loss.item(), expected, rel_tol=1e-6)


def test_dpo_loss_is_log_2_at_zero_margin():
    torch.manual_seed(0)
    logp = torch.randn(5) * 10
    other = torch.randn(5) * 10
    for eps in (0.0, 0.2):
        # The policy equal to its reference: every implicit reward is 0.
        out = dpo_loss(logp, other, logp, other, beta=0.3, label_smoothing=eps)
        assert math.isclose(out.loss.item(), math.log(2), rel_tol=1e-6)
        assert out.accuracy.item() == 0.5  # ties count one half
    # A non-zero reward difference that cancels in the margin: still log 2.
    out = dpo_loss(logp + 1.0, other + 1.0, logp, other, beta=2.0)
    assert math.isclose(out.loss.item(), math.log(2), rel_tol=1e-6)


def test_dpo_loss_gradient_raises_the_chosen_and_lowers_the_rejected():
    pw = torch.tensor([-3.0], requires_grad=True)
    pl = torch.tensor([-3.0], requires_grad=True)
    dpo_loss(pw, pl, torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.1).loss.backward()
    # d/dz of -log sigma(z) at z = 0 is -1/2; z = beta (pw - pl).
    assert math.isclose(pw.grad.item(), -0.05, rel_tol=1e-6)
    assert math.isclose(pl.grad.item(), 0.05, rel_tol=1e-6)
