import torch

from palate.core.trust_region import (
    backtracking_line_search,
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    flat_params,
    natural_gradient_step,
    set_flat_params,
)


def test_conjugate_gradient_matches_solve():
    torch.manual_seed(0)
    m = torch.randn(8, 8, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iters=50, residual_tol=1e-20)
    torch.testing.assert_close(x, torch.linalg.solve(a, b))


def _tiny_policy():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()


def _mean_kl(policy, obs, old_logits):
    logp_old = torch.log_softmax(old_logits, -1)
    logp = torch.log_softmax(policy(obs), -1)
    return (logp_old.exp() * (logp_old - logp)).sum(-1).mean()


def test_fisher_vector_product_equals_explicit_kl_hessian():
    policy = _tiny_policy()
    params = list(policy.parameters())
    obs = torch.randn(16, 3, dtype=torch.float64)
    old_logits = policy(obs).detach()
    damping = 0.1
    fvp = fisher_vector_product(lambda: _mean_kl(policy, obs, old_logits), params, damping)

    theta0 = flat_params(params)

    def kl_of_flat(theta):
        # Rebuild the forward pass functionally so autograd sees theta.
        shapes = [p.shape for p in params]
        chunks, offset = [], 0
        for s in shapes:
            n = int(torch.tensor(s).prod())
            chunks.append(theta[offset : offset + n].view(s))
            offset += n
        w1, b1, w2, b2 = chunks
        logits = torch.tanh(obs @ w1.T + b1) @ w2.T + b2
        logp_old = torch.log_softmax(old_logits, -1)
        return (logp_old.exp() * (logp_old - torch.log_softmax(logits, -1))).sum(-1).mean()

    hessian = torch.autograd.functional.hessian(kl_of_flat, theta0)
    for _ in range(3):
        v = torch.randn_like(theta0)
        torch.testing.assert_close(fvp(v), hessian @ v + damping * v, rtol=1e-6, atol=1e-8)


def test_line_search_rejects_step_that_breaks_kl_bound_and_restores_params():
    policy = _tiny_policy()
    params = list(policy.parameters())
    obs = torch.randn(32, 3, dtype=torch.float64)
    old_logits = policy(obs).detach()
    actions = torch.randint(0, 3, (32,))
    adv = torch.randn(32, dtype=torch.float64)
    old_logp = torch.log_softmax(old_logits, -1).gather(1, actions[:, None]).squeeze(1)

    def surrogate():
        logp = torch.log_softmax(policy(obs), -1).gather(1, actions[:, None]).squeeze(1)
        return (torch.exp(logp - old_logp) * adv).mean()

    def kl():
        return _mean_kl(policy, obs, old_logits)

    before = flat_params(params)
    g = flat_grad(surrogate(), params)
    # A huge step along the gradient: every backtrack still breaks a tiny KL bound.
    result = backtracking_line_search(params, 1e3 * g, surrogate, kl, max_kl=1e-12, max_backtracks=5)
    assert not result.accepted
    torch.testing.assert_close(flat_params(params), before)

    # With a sane bound, the natural-gradient step is accepted and respects it.
    result = natural_gradient_step(params, surrogate, kl, max_kl=0.01)
    assert result.accepted
    assert result.kl <= 0.01
    assert result.surrogate_improvement > 0
    set_flat_params(params, before)
