"""PPO losses (Schulman et al. 2017), as pure functions of log-probabilities and advantages.

Every loss is returned as a quantity to *minimise*; the matching statistic dictionaries use
CleanRL's names so trainers can log them unchanged.
"""

from __future__ import annotations

import torch

from palate.core.stats import masked_mean


def clipped_surrogate_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L^CLIP: -E[min(rho A, clip(rho, 1-eps, 1+eps) A)] with rho = pi/pi_old (epsilon = clip_range).

    Returns the loss and ``{"clipfrac", "approx_kl"}`` (approx_kl is the k3 estimator of
    KL[pi_old || pi], which is unbiased and always non-negative).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1.0).abs() > clip_range).to(logp.dtype), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def kl_penalty_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    kl: torch.Tensor,
    kl_coef: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L^KLPEN: -E[rho A - beta KL[pi_old, pi]] (beta = kl_coef), PPO paper section 4.

    ``kl`` is the per-sample KL[pi_old(.|s) || pi(.|s)], exact where the distribution allows it.
    """
    ratio = torch.exp(logp - old_logp)
    surrogate = masked_mean(ratio * advantages, mask)
    mean_kl = masked_mean(kl, mask)
    loss = -(surrogate - kl_coef * mean_kl)
    return loss, {"approx_kl": mean_kl.detach(), "surrogate": surrogate.detach()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_range_vf: float | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * E[(V - R)^2], optionally the pessimistic max with a value clipped around V_old."""
    unclipped = (values - returns) ** 2
    if clip_range_vf is None:
        return 0.5 * masked_mean(unclipped, mask), {}
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_vf, clip_range_vf)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return loss, {"vf_clipfrac": vf_clipfrac}


class AdaptiveKLPenalty:
    """PPO section 4: after each update, halve beta if KL < d_targ/1.5, double it if KL > 1.5 d_targ.

    Attributes:
        kl_coef: the current beta.
        target: d_targ, the KL the penalty aims at.
    """

    def __init__(self, init_kl_coef: float = 1.0, target: float = 0.01, factor: float = 2.0,
                 tolerance: float = 1.5, min_coef: float = 1e-6, max_coef: float = 1e6) -> None:
        if target <= 0 or init_kl_coef <= 0:
            raise ValueError(f"AdaptiveKLPenalty: target ({target}) and init_kl_coef ({init_kl_coef}) must be > 0")
        self.kl_coef = init_kl_coef
        self.target = target
        self.factor = factor
        self.tolerance = tolerance
        self.min_coef, self.max_coef = min_coef, max_coef

    def update(self, kl: float) -> float:
        """Adapt beta to the KL measured over the last update and return the new beta."""
        if kl < self.target / self.tolerance:
            self.kl_coef /= self.factor
        elif kl > self.target * self.tolerance:
            self.kl_coef *= self.factor
        self.kl_coef = min(max(self.kl_coef, self.min_coef), self.max_coef)
        return self.kl_coef

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.kl_coef = float(state["kl_coef"])
