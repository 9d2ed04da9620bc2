"""Preference losses: one Bradley-Terry model behind every paper of the lineage.

* Christiano et al. 2017: P[s1 > s2] = exp(sum r(s1)) / (exp(sum r(s1)) + exp(sum r(s2))),
  cross-entropy against the label (1, 0 or 0.5 for "equal"), with a uniform error model: the
  labeller answers at random with probability epsilon.
* Ziegler et al. 2019: best-of-K, a softmax over the K completions' rewards.
* Ouyang et al. 2022: all C(K, 2) pairs of one ranking in one batch element, averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preference_logit(sum_r1: torch.Tensor, sum_r2: torch.Tensor) -> torch.Tensor:
    """log P[s1 > s2] - log P[s2 > s1] = sum r(s1) - sum r(s2)."""
    return sum_r1 - sum_r2


def preference_probability(sum_r1: torch.Tensor, sum_r2: torch.Tensor, error_rate: float = 0.0) -> torch.Tensor:
    """P[s1 preferred], including the uniform error model: (1 - eps) sigma(d) + eps / 2."""
    p = torch.sigmoid(sum_r1 - sum_r2)
    return (1.0 - error_rate) * p + 0.5 * error_rate


def bradley_terry_loss(
    sum_r1: torch.Tensor,
    sum_r2: torch.Tensor,
    label: torch.Tensor,
    error_rate: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy between the label and the Bradley-Terry prediction.

    Args:
        sum_r1, sum_r2: ``[B]`` summed predicted rewards of the two segments.
        label: ``[B]`` probability that segment 1 is preferred: 1 (left), 0 (right), 0.5 (equal).
        error_rate: epsilon of the error model (the paper uses 0.1).
    """
    d = sum_r1 - sum_r2
    label = label.to(d.dtype)
    if error_rate == 0.0:
        # The exact, numerically stable form: -[mu log sigma(d) + (1 - mu) log sigma(-d)].
        return -(label * F.logsigmoid(d) + (1 - label) * F.logsigmoid(-d)).mean()
    # log((1-eps) sigma(d) + eps/2) computed stably in log space.
    log_eps_half = torch.log(torch.tensor(0.5 * error_rate, dtype=d.dtype, device=d.device))
    log_keep = torch.log(torch.tensor(1.0 - error_rate, dtype=d.dtype, device=d.device))
    log_p1 = torch.logaddexp(log_keep + F.logsigmoid(d), log_eps_half)
    log_p2 = torch.logaddexp(log_keep + F.logsigmoid(-d), log_eps_half)
    return -(label * log_p1 + (1 - label) * log_p2).mean()


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-E[log sigma(r(x, y_w) - r(x, y_l))]: the plain pair loss."""
    return -F.logsigmoid(chosen - rejected).mean()


def best_of_k_loss(rewards: torch.Tensor, best: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Ziegler et al.: -E[log exp(r_best) / sum_i exp(r_i)] over the K completions of a prompt.

    Args:
        rewards: ``[B, K]`` rewards of the completions.
        best: ``[B]`` index of the chosen completion.
        valid: optional ``[B, K]`` mask when prompts have fewer than K completions.
    """
    if valid is not None:
        rewards = rewards.masked_fill(~valid.bool(), float("-inf"))
    return F.cross_entropy(rewards, best.long())


def ranking_loss(
    rewards: torch.Tensor,
    ranks: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT: -1/C(K,2) E[log sigma(r(x, y_w) - r(x, y_l))] over every ordered pair of a prompt.

    All pairs of one prompt stay in one batch element, so each prompt weighs the same whatever
    its K, and the K forward passes are shared by the C(K, 2) comparisons.

    Args:
        rewards: ``[B, K]`` rewards of the completions.
        ranks: ``[B, K]`` rank of each completion, 0 = best; equal ranks are ties and form no pair.
        valid: ``[B, K]`` mask of real completions (K may vary per prompt).

    Returns:
        ``(loss, pair_accuracy)``: the mean over prompts of the mean pair loss, and the fraction of
        pairs ordered correctly.
    """
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    valid = valid.bool()
    # better[b, i, j] = completion i ranked strictly above completion j.
    better = (ranks.unsqueeze(2) < ranks.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    diff = rewards.unsqueeze(2) - rewards.unsqueeze(1)
    pair_loss = -F.logsigmoid(diff)
    n_pairs = better.sum(dim=(1, 2))
    has_pairs = n_pairs > 0
    per_prompt = (pair_loss * better).sum(dim=(1, 2)) / n_pairs.clamp_min(1)
    loss = per_prompt[has_pairs].mean() if has_pairs.any() else rewards.sum() * 0.0
    correct = ((diff > 0) & better).sum()
    accuracy = correct.to(rewards.dtype) / n_pairs.sum().clamp_min(1)
    return loss, accuracy


def segment_returns(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t r_hat(o_t, a_t) over each segment: the quantity the Bradley-Terry model compares.

    Args:
        rewards: ``[..., L]`` per-step predicted rewards of segments of length ``L``.
        mask: optional ``[..., L]`` 1 for real steps, 0 for padding, so segments of different
            lengths can share one batch (a padded step must contribute nothing to the sum).
    """
    if mask is None:
        return rewards.sum(-1)
    return (rewards * mask.to(rewards.dtype)).sum(-1)


def ensemble_disagreement(sum_r1: torch.Tensor, sum_r2: torch.Tensor) -> torch.Tensor:
    """Variance across ensemble members of the predicted P[s1 > s2]: the query-selection score.

    Christiano et al. 2017 (section 2.2.4) ask the labeller about the pairs on which the
    ensemble's predictions vary most; the variance is taken on the preference probability, not
    on the reward difference, so pairs the whole ensemble finds obvious (all probabilities near
    0 or 1) score low however far apart their returns are.

    Args:
        sum_r1, sum_r2: ``[M, B]`` summed rewards that each of the ``M`` members gives to each
            side of ``B`` candidate pairs.

    Returns:
        ``[B]`` population variance (over members) of sigma(sum_r1 - sum_r2).
    """
    if sum_r1.dim() != 2 or sum_r1.shape != sum_r2.shape:
        raise ValueError(
            f"ensemble_disagreement expects two [members, pairs] tensors of one shape, "
            f"got {tuple(sum_r1.shape)} and {tuple(sum_r2.shape)}"
        )
    p = torch.sigmoid(sum_r1 - sum_r2)
    return p.var(dim=0, unbiased=False)
