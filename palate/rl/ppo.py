"""Proximal Policy Optimization (Schulman et al. 2017), for control.

    for each rollout of N envs x T steps (collected by the shared loop, with GAE):
        for K epochs, for each minibatch:
            loss = L^CLIP (or L^KLPEN) - c2 * entropy + c1 * value loss
            one Adam step with the gradient norm clipped
    if loss = kl_penalty: adapt beta from the KL the update actually moved (section 4)

Everything else (rollouts, normalisation, checkpoints, predict) lives in
:mod:`palate.rl.on_policy`, shared with TRPO.
"""

from __future__ import annotations

from typing import Any

import torch

from palate.core.ppo import AdaptiveKLPenalty, clipped_surrogate_loss, kl_penalty_loss, value_loss
from palate.core.stats import clip_grad_norm, explained_variance, whiten
from palate.rl.buffer import Batch
from palate.rl.config import PPOConfig
from palate.rl.fused import FlatBuffer, FlatParameters, FusedClipStep, adam_step, load_flat_optimizer_state
from palate.rl.on_policy import OnPolicyAlgorithm
from palate.rl.policies import EncoderActorCritic


class PPO(OnPolicyAlgorithm):
    """PPO with the clipped surrogate (``loss="clip"``) or the adaptive KL penalty (``"kl_penalty"``).

    Example::

        from palate.rl import PPO, PPOConfig
        model = PPO(PPOConfig(env="CartPole-v1", n_envs=8, n_steps=32)).learn(total_steps=100_000)
        action = model.predict(obs)
    """

    algo = "ppo"
    config_class = PPOConfig
    config: PPOConfig

    def __init__(self, config: PPOConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.kl_penalty = AdaptiveKLPenalty(self.config.kl_coef, self.config.kl_target)

    def _build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        # One flat buffer for all parameters (palate.rl.fused): Adam is then seven ops on one tensor
        # and gradient clipping two; the hand-derived step writes its gradient there.
        self.fused_step = None
        if isinstance(self.policy, EncoderActorCritic):  # a CNN / parts encoder: autograd, still one flat Adam
            self.flat: FlatBuffer = FlatBuffer(list(self.policy.parameters()))
        else:
            self.flat = FlatParameters(self.policy)
        cfg = self.config
        if isinstance(self.flat, FlatParameters) and cfg.fused_update and cfg.loss == "clip" \
                and cfg.clip_range_vf is None and FusedClipStep.supports(self.policy):
            self.fused_step = FusedClipStep(self.flat)
        # eps=1e-5 as in CleanRL and SB3 (the PyTorch default 1e-8 is less stable here).
        # Its state is stepped by palate.rl.fused.adam_step (the same update, less overhead).
        return {"policy": torch.optim.Adam([self.flat.param], lr=self.config.learning_rate, eps=1e-5)}

    def _load_optimizer_state(self, name: str, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        load_flat_optimizer_state(optimizer, state, self.flat)

    def update(self, batch: Batch, progress_remaining: float) -> dict[str, Any]:
        cfg, policy, optimizer = self.config, self.policy, self.optimizers["policy"]
        lr = cfg.learning_rate * (progress_remaining if cfg.anneal_lr else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        clip_range = cfg.clip_range * (progress_remaining if cfg.anneal_clip_range else 1.0)
        old_dist = None
        if cfg.loss == "kl_penalty":
            # The policy has not moved since the rollout, so this is exactly pi_old.
            with torch.no_grad():
                old_dist = policy.distribution(batch.obs).detach()  # a copy: Adam moves theta in place

        flat, fused = self.flat, self.fused_step
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("policy", "value", "entropy", "kl", "clipfrac")}
        # One minibatch per epoch (e.g. the CartPole preset): whiten once and skip the shuffle,
        # which changes nothing but the cost.
        full_batch = cfg.batch_size >= len(batch)
        if full_batch and cfg.normalize_advantage:
            batch.advantages = whiten(batch.advantages)
        stopped_early = False
        for _epoch in range(cfg.n_epochs):
            order = None if full_batch else torch.randperm(len(batch), generator=self.generator)
            # Shuffle the rollout once per epoch; minibatches are then slices (views, no copies).
            shuffled = batch if order is None else batch.rows(order)
            shuffled_old = None if old_dist is None or order is None else old_dist.rows(order)
            for start in range(0, len(batch), cfg.batch_size):
                end = start + cfg.batch_size
                mb = shuffled if order is None else shuffled.slice(start, end)
                advantages = mb.advantages
                if cfg.normalize_advantage and order is not None and len(mb) > 1:
                    advantages = whiten(advantages)
                if fused is not None:
                    pg_loss, v_loss, entropy, approx_kl, clipfrac = fused(
                        mb.obs, mb.actions, mb.logp, advantages, mb.returns, clip_range, cfg.vf_coef,
                        cfg.ent_coef)
                    if cfg.ent_coef != 0.0:
                        stats["entropy"].append(entropy)
                else:
                    dist, values = policy.distribution_and_value(mb.obs)
                    logp = dist.log_prob(mb.actions)
                    if old_dist is None:
                        pg_loss, pg_stats = clipped_surrogate_loss(logp, mb.logp, advantages, clip_range)
                    else:
                        kl = (old_dist if shuffled_old is None else shuffled_old.slice(start, end)).kl(dist)
                        pg_loss, pg_stats = kl_penalty_loss(logp, mb.logp, advantages, kl,
                                                            self.kl_penalty.kl_coef)
                    approx_kl, clipfrac = pg_stats["approx_kl"], pg_stats.get("clipfrac", torch.zeros(()))
                    v_loss, _ = value_loss(values, mb.values, mb.returns, cfg.clip_range_vf)
                    loss = pg_loss + cfg.vf_coef * v_loss
                    if cfg.ent_coef != 0.0:  # with no bonus the entropy is only logged, once, below
                        entropy = dist.entropy().mean()
                        loss = loss - cfg.ent_coef * entropy
                        stats["entropy"].append(entropy.detach())
                # SB3's early stop: skip the step that would carry the policy past 1.5 target_kl.
                if cfg.target_kl is not None and approx_kl.item() > 1.5 * cfg.target_kl:
                    stopped_early = True
                    break
                if fused is None:
                    flat.zero_grad()  # the module's .grad are views of flat.grad; backward adds into them
                    loss.backward()
                clip_grad_norm([flat.grad], cfg.max_grad_norm)
                adam_step(optimizer, flat)
                stats["policy"].append(pg_loss.detach())
                stats["value"].append(v_loss.detach())
                stats["kl"].append(approx_kl)
                stats["clipfrac"].append(clipfrac)
            if stopped_early:
                break
        if not stats["entropy"]:
            with torch.no_grad():
                stats["entropy"].append(policy.distribution(batch.obs).entropy().mean())

        metrics: dict[str, Any] = {
            "charts/learning_rate": lr,
            "losses/explained_variance": explained_variance(batch.values, batch.returns),
            "losses/early_stop": float(stopped_early),
        }
        if stats["policy"]:
            metrics.update({
                "losses/policy_loss": torch.stack(stats["policy"]).mean().item(),
                "losses/value_loss": torch.stack(stats["value"]).mean().item(),
                "losses/entropy": torch.stack(stats["entropy"]).mean().item(),
                "losses/approx_kl": torch.stack(stats["kl"]).mean().item(),
                "losses/clipfrac": torch.stack(stats["clipfrac"]).mean().item(),
            })
        if old_dist is not None:
            # Section 4: d = E[KL[pi_old, pi]] after the epochs; beta halves below d_targ/1.5 and
            # doubles above 1.5 d_targ, so the next update moves about d_targ.
            with torch.no_grad():
                d = old_dist.kl(policy.distribution(batch.obs)).mean().item()
            metrics["losses/kl"] = d
            metrics["losses/kl_coef"] = self.kl_penalty.update(d)
        if cfg.anneal_clip_range:
            metrics["charts/clip_range"] = clip_range
        return metrics

    def _algo_state(self) -> dict[str, Any]:
        return {"kl_penalty": self.kl_penalty.state_dict()}

    def _load_algo_state(self, state: dict[str, Any]) -> None:
        self.kl_penalty.load_state_dict(state["kl_penalty"])
