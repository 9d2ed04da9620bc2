"""TRPO's natural-gradient step (Schulman et al. 2015, appendix C).

The step direction solves F x = g by conjugate gradient, where F (the Fisher matrix, i.e. the
Hessian of the mean KL at the current policy) is never formed: only products F v, computed by
differentiating (grad KL) . v a second time. The maximal step scales x so that the quadratic
model of the KL equals delta; a backtracking line search then checks the true KL and surrogate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def flat_params(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate parameters into one detached vector."""
    return torch.cat([p.detach().reshape(-1) for p in params])


def set_flat_params(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a flat vector back into parameters (in place, no autograd)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def flat_grad(output: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool = False,
              retain_graph: bool | None = None) -> torch.Tensor:
    """Gradient of a scalar with respect to ``params`` as one vector (zeros for unused params)."""
    grads = torch.autograd.grad(output, list(params), create_graph=create_graph,
                                retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def fisher_vector_product(
    mean_kl_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    damping: float = 0.1,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return v -> (H + damping I) v, H the Hessian of the mean KL at the current parameters.

    ``mean_kl_fn`` must compute KL[pi_old || pi_theta] with pi_old detached, so that its value and
    gradient are zero at theta = theta_old and its Hessian is the Fisher information matrix.
    The first-order gradient graph is built once and reused for every product.
    """
    kl = mean_kl_fn()
    grad_kl = flat_grad(kl, params, create_graph=True)

    def product(v: torch.Tensor) -> torch.Tensor:
        hv = flat_grad((grad_kl * v.detach()).sum(), params, retain_graph=True)
        return hv + damping * v

    return product


def conjugate_gradient(
    avp: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    iters: int = 10,
    residual_tol: float = 1e-10,
) -> torch.Tensor:
    """Approximately solve A x = b for symmetric positive-definite A given only x -> A x."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr < residual_tol:
            break
        ap = avp(p)
        alpha = rr / (p @ ap)
        x += alpha * p
        r -= alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


@dataclass
class LineSearchResult:
    """Outcome of a backtracking line search."""

    accepted: bool
    step_fraction: float
    surrogate_improvement: float
    kl: float
    backtracks: int


def backtracking_line_search(
    params: Sequence[torch.Tensor],
    full_step: torch.Tensor,
    surrogate_fn: Callable[[], torch.Tensor],
    mean_kl_fn: Callable[[], torch.Tensor],
    max_kl: float,
    max_backtracks: int = 10,
    backtrack_ratio: float = 0.5,
) -> LineSearchResult:
    """Try theta + f * full_step for f = 1, r, r^2, ...; accept the first that raises the surrogate
    AND keeps the mean KL <= max_kl (delta). If none does, restore theta and report failure.

    ``surrogate_fn`` returns the surrogate to maximise (e.g. E[rho A]), evaluated at the parameters
    currently set; ``mean_kl_fn`` the mean KL[pi_old || pi].
    """
    old = flat_params(params)
    with torch.no_grad():
        base = float(surrogate_fn())
        for i in range(max_backtracks):
            frac = backtrack_ratio**i
            set_flat_params(params, old + frac * full_step)
            improvement = float(surrogate_fn()) - base
            kl = float(mean_kl_fn())
            if kl <= max_kl and improvement > 0 and torch.isfinite(torch.tensor(kl)):
                return LineSearchResult(True, frac, improvement, kl, i)
        set_flat_params(params, old)
    return LineSearchResult(False, 0.0, 0.0, 0.0, max_backtracks)


def natural_gradient_step(
    params: Sequence[torch.Tensor],
    surrogate_fn: Callable[[], torch.Tensor],
    mean_kl_fn: Callable[[], torch.Tensor],
    max_kl: float,
    cg_iters: int = 10,
    damping: float = 0.1,
    max_backtracks: int = 10,
    backtrack_ratio: float = 0.8,
) -> LineSearchResult:
    """One TRPO policy update: g = grad surrogate, x = F^-1 g by CG, step sqrt(2 delta / x^T F x) x,
    then the backtracking line search."""
    params = list(params)
    surrogate = surrogate_fn()
    g = flat_grad(surrogate, params)
    if not torch.isfinite(g).all() or g.abs().max() == 0:
        return LineSearchResult(False, 0.0, 0.0, 0.0, 0)
    fvp = fisher_vector_product(mean_kl_fn, params, damping)
    x = conjugate_gradient(fvp, g, cg_iters)
    shs = x @ fvp(x)
    step_size = torch.sqrt(2.0 * max_kl / shs.clamp_min(1e-12))
    return backtracking_line_search(params, step_size * x, surrogate_fn, mean_kl_fn, max_kl,
                                    max_backtracks, backtrack_ratio)
