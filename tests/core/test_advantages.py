import torch

from palate.core.advantages import gae, gae_masked


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_hand_values_termination_and_truncation():
    # One env, 4 steps. Step 1 terminates (no bootstrap), step 3 is truncated (bootstrap V(final)).
    gamma, lam = 0.9, 0.5
    r = _t([[1.0], [2.0], [0.5], [1.0]])
    v = _t([[0.5], [1.0], [0.2], [0.4]])
    # next_values: V(s1)=1.0, V(terminal)=anything (masked), V(s3)=0.4, V(final obs)=0.8
    nv = _t([[1.0], [7.0], [0.4], [0.8]])
    term = _t([[0], [1], [0], [0]])
    end = _t([[0], [1], [0], [1]])
    adv, ret = gae(r, v, nv, term, end, gamma, lam)
    d3 = 1.0 + 0.9 * 0.8 - 0.4  # truncated: bootstrapped
    d2 = 0.5 + 0.9 * 0.4 - 0.2
    d1 = 2.0 - 1.0  # terminated: no bootstrap
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a3 = d3
    a2 = d2 + 0.45 * a3
    a1 = d1  # the recursion stops at the episode end
    a0 = d0 + 0.45 * a1
    expected = _t([[a0], [a1], [a2], [a3]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + v)


def test_gae_lambda_one_is_discounted_return_minus_value():
    r = torch.rand(6, 3, dtype=torch.float64)
    v = torch.rand(6, 3, dtype=torch.float64)
    nv = torch.cat([v[1:], torch.zeros(1, 3, dtype=torch.float64)])
    term = torch.zeros(6, 3, dtype=torch.float64)
    term[-1] = 1
    adv, ret = gae(r, v, nv, term, term.clone(), gamma=0.99, lam=1.0)
    disc = torch.zeros(3, dtype=torch.float64)
    for t in range(5, -1, -1):
        disc = r[t] + 0.99 * disc
        torch.testing.assert_close(ret[t], disc)


def test_gae_masked_matches_unmasked_on_right_and_left_padding():
    rewards = torch.tensor([[0.1, -0.2, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.3, 0.1, 0.5]], dtype=torch.float64)
    gamma, lam = 1.0, 0.95
    adv, ret = gae_masked(rewards, values, torch.ones(1, 3), gamma, lam)
    d2 = 1.0 - 0.5
    d1 = -0.2 + 0.5 - 0.1
    d0 = 0.1 + 0.1 - 0.3
    a2 = d2
    a1 = d1 + lam * a2
    a0 = d0 + lam * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]], dtype=torch.float64))
    # Right padding: two pad positions after; left padding: two before. Same real advantages.
    pad = torch.zeros(1, 2, dtype=torch.float64)
    for r_p, v_p, m in [
        (torch.cat([rewards, pad + 9], 1), torch.cat([values, pad + 9], 1), torch.tensor([[1, 1, 1, 0, 0]])),
        (torch.cat([pad + 9, rewards], 1), torch.cat([pad + 9, values], 1), torch.tensor([[0, 0, 1, 1, 1]])),
    ]:
        a_p, r_ret = gae_masked(r_p, v_p, m, gamma, lam)
        torch.testing.assert_close(a_p[m.bool()], adv[0])
        assert (a_p[~m.bool()] == 0).all()
