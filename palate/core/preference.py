"""Preference losses: one Bradley-Terry model behind every paper of the lineage.

* Christiano et al. 2017: P[s1 > s2] = exp(sum r(s1)) / (exp(sum r(s1)) + exp(sum r(s2))),
  cross-entropy against the label (1, 0 or 0.5 for "equal"), with a uniform error model: the
  labeller answers at random with probability epsilon.
* Ziegler et al. 2019: best-of-K, a softmax over the K completions' rewards.
* Ouyang et al. 2022: all C(K, 2) pairs of one ranking in one batch element, averaged.
* Rafailov et al. 2023 (DPO): the same pair loss on the policy's implicit reward
  r(x, y) = beta (log pi(y|x) - log pi_ref(y|x)), so the policy is fitted to the comparisons
  directly, without a separate reward model or RL.
"""

from __future__ import annotations

from typing import NamedTuple

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


class DPOLoss(NamedTuple):
    """What :func:`dpo_loss` returns: the loss and the implicit rewards behind it."""

    loss: torch.Tensor
    """Mean over pairs of the (label-smoothed) Bradley-Terry loss on the implicit rewards."""
    chosen_rewards: torch.Tensor
    """``[P]`` beta (log pi(y_w|x) - log pi_ref(y_w|x)), detached."""
    rejected_rewards: torch.Tensor
    """``[P]`` beta (log pi(y_l|x) - log pi_ref(y_l|x)), detached."""
    accuracy: torch.Tensor
    """Fraction of pairs whose chosen completion has the higher implicit reward (ties count 1/2)."""


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> DPOLoss:
    """Rafailov et al. 2023: -E[log sigma(beta ((log pi_w - log ref_w) - (log pi_l - log ref_l)))].

    The Bradley-Terry loss of :func:`bradley_terry_loss` with the implicit rewards
    r = beta (log pi - log pi_ref) in place of a reward model's. ``label_smoothing`` epsilon is
    conservative DPO (cDPO, Mitchell 2023): each label is taken to be flipped with probability
    epsilon, so the target is 1 - epsilon and the loss stops pushing once the margin is large.
    At a zero margin (the policy equal to its reference) the loss is log 2 for any epsilon.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[P]`` summed log-probabilities of the
            completion tokens under the policy, for the preferred and the other completion.
        ref_chosen_logps, ref_rejected_logps: ``[P]`` the same under the frozen reference.
        beta: the KL-penalty coefficient beta of the objective DPO solves.
        label_smoothing: epsilon in [0, 0.5).
    """
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    target = torch.full_like(chosen, 1.0 - label_smoothing)
    loss = bradley_terry_loss(chosen, rejected, target)
    margin = (chosen - rejected).detach()
    accuracy = ((margin > 0).to(margin.dtype) + 0.5 * (margin == 0).to(margin.dtype)).mean()
    return DPOLoss(loss, chosen.detach(), rejected.detach(), accuracy)


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
