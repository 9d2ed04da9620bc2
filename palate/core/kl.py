"""KL estimators, per-token KL reward shaping and KL-coefficient controllers for LM RLHF."""

from __future__ import annotations

import torch


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-sample estimate log pi - log rho of KL[pi || rho] for samples from pi (unbiased, noisy)."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(r - 1) - log r with r = rho/pi: unbiased, non-negative, lower variance than k1."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


def kl_shaped_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ziegler et al. / InstructGPT reward per token.

    r_t = -beta * (log pi(y_t|.) - log rho(y_t|.)) at every generated token, plus the
    sequence score at the last generated token (beta = kl_coef).

    Args:
        scores: ``[B]`` reward-model (or reward-function) score of each completion.
        logp, ref_logp: ``[B, L]`` log-probabilities of the sampled tokens under the policy and
            the frozen reference.
        mask: ``[B, L]`` 1 on generated tokens (contiguous).

    Returns:
        ``(rewards [B, L], kl [B, L])`` with both zero outside the mask.
    """
    mask_f = mask.to(logp.dtype)
    kl = (logp - ref_logp) * mask_f
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    has_token = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_token]
    rewards = rewards.clone()
    rewards[rows, last[has_token]] += scores[has_token].to(rewards.dtype)
    return rewards, kl


class FixedKLController:
    """A constant beta."""

    def __init__(self, kl_coef: float) -> None:
        self.kl_coef = kl_coef

    def update(self, kl: float, n_steps: int) -> float:
        return self.kl_coef

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.kl_coef = float(state["kl_coef"])


class AdaptiveKLController:
    """Ziegler et al. 2019, eq. 2: a proportional controller that steers KL to a target.

    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2);  beta <- beta * (1 + K_beta * e_t * n / horizon)
    where n is the number of samples in the batch just used.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int, k_beta: float = 0.1) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target ({target}) and horizon ({horizon}) must be > 0")
        self.kl_coef = init_kl_coef
        self.target = target
        self.horizon = horizon
        self.k_beta = k_beta

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.kl_coef *= 1.0 + self.k_beta * error * n_steps / self.horizon
        return self.kl_coef

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.kl_coef = float(state["kl_coef"])
