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


class KLBudget:
    """A whole run's KL budget: stop before the update that would take the policy past it.

    The mean of the last two batches' KL, not one batch's small-sample estimate, decides, so that a
    single noisy batch does not end a run; the trainer keeps the policy that drew the previous batch,
    the last within the budget (:class:`palate.lm.ppo.LMPPOTrainer`). A fixed
    beta leaves the final KL to the seed; a budget bounds it without changing runs that stay below.
    """

    def __init__(self, budget: float | None) -> None:
        if budget is not None and budget <= 0:
            raise ValueError(f"KLBudget: budget ({budget}) must be > 0 nats, or None for no budget")
        self.budget = budget
        self.history: list[float] = []
        self.stopped: dict[str, float | int | str] | None = None

    def check(self, kl: float, iteration: int) -> bool:
        """Record a batch's mean KL; True (and ``stopped`` set) when it takes the 2-batch mean past the budget."""
        recent = self.history[-1:] + [kl]
        mean = sum(recent) / len(recent)
        if self.budget is not None and mean > self.budget:
            self.stopped = {"reason": "kl_budget", "iteration": iteration, "kl": kl,
                            "mean_kl_last_2": mean, "kl_budget": self.budget}
            return True
        self.history.append(kl)
        return False

    def state_dict(self) -> dict[str, object]:
        return {"history": list(self.history), "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.history = [float(k) for k in state.get("history", [])]  # type: ignore[union-attr]
        self.stopped = state.get("stopped")  # type: ignore[assignment]
