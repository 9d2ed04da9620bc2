"""Masked reductions and whitening shared by the control and language-model trainers."""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all positions when ``mask`` is None)."""
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased variance of the masked entries of ``x``."""
    mean = masked_mean(x, mask)
    if mask is None:
        return x.var()
    n = mask.to(x.dtype).sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp_min(1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to unit variance (and zero mean unless ``shift_mean`` is False) over the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask.to(x.dtype)


def explained_variance(y_pred: torch.Tensor, y_true: torch.Tensor) -> float:
    """1 - Var[y - y_pred] / Var[y]: 1 is a perfect critic, 0 no better than a constant."""
    var_y = torch.var(y_true)
    if var_y.item() == 0:
        return float("nan")
    return float(1 - torch.var(y_true - y_pred) / var_y)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``params`` so their global L2 norm is at most ``max_norm``; returns
    the norm before clipping.

    The arithmetic of ``torch.nn.utils.clip_grad_norm_`` (one fused norm per tensor list, one
    fused multiply by ``min(1, max_norm / (norm + 1e-6))``) without its per-call grouping of
    tensors by device and dtype: control policies take thousands of small steps, and on their
    ~10 parameter tensors that bookkeeping costs as much as the arithmetic.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef)
    return total
