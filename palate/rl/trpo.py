"""Trust Region Policy Optimization (Schulman et al. 2015), for control.

    for each rollout of N envs x T steps (collected by the shared loop, with GAE):
        g   = grad of the surrogate E[pi/pi_old * A] at theta_old
        x   = F^-1 g by conjugate gradient on Fisher-vector products (F + damping I)
        update=trust_region: step sqrt(2 delta / x^T F x) * x, backtracked until the mean KL
                             <= delta AND the surrogate improves, else theta is restored
        update=kl_penalty:   step x / beta (the maximiser of the quadratic model of
                             surrogate - beta * KL), backtracked until that objective improves
        critic: vf_iters epochs of Adam minibatches on (V - R)^2, its own optimiser

Only the actor (and the Gaussian log-std) sits inside the trust region; the critic is fitted
separately, as in the paper's experiments and sb3-contrib.
"""

from __future__ import annotations

from typing import Any

import torch

from palate.core.stats import explained_variance, whiten
from palate.core.trust_region import (
    LineSearchResult,
    backtracking_line_search,
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    natural_gradient_step,
)
from palate.rl.buffer import Batch
from palate.rl.config import TRPOConfig
from palate.rl.fused import FlatBuffer, FusedValueStep, adam_step, load_flat_optimizer_state
from palate.rl.on_policy import OnPolicyAlgorithm
from palate.rl.policies import EncoderActorCritic
from palate.rl.spaces import tree_map


class TRPO(OnPolicyAlgorithm):
    """TRPO with the KL constraint (``update="trust_region"``) or a fixed KL penalty (``"kl_penalty"``).

    Example::

        from palate.rl import TRPO, TRPOConfig
        model = TRPO(TRPOConfig(env="Pendulum-v1", n_envs=2, n_steps=1024)).learn(total_steps=100_000)
    """

    algo = "trpo"
    config_class = TRPOConfig
    config: TRPOConfig
    share_encoder = False  # the trust region constrains the actor alone; the critic fits its own encoder

    def __init__(self, config: TRPOConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.line_search_attempts = 0
        self.line_search_successes = 0

    def _build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        # The critic's parameters in one flat buffer with hand-derived gradients and a lean Adam
        # (palate.rl.fused): hundreds of small minibatch steps per rollout, same numbers.
        self.critic_flat = FlatBuffer(self.policy.critic_parameters())
        if isinstance(self.policy, EncoderActorCritic):
            self.value_step = self._autograd_value_step
        else:
            self.value_step = FusedValueStep(self.policy.critic, self.critic_flat)
        return {"critic": torch.optim.Adam([self.critic_flat.param], lr=self.config.vf_lr)}

    def _load_optimizer_state(self, name: str, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        load_flat_optimizer_state(optimizer, state, self.critic_flat)

    def update(self, batch: Batch, progress_remaining: float) -> dict[str, Any]:
        cfg, policy = self.config, self.policy
        params = policy.actor_parameters()
        obs, actions = batch.obs, batch.actions
        advantages = whiten(batch.advantages) if cfg.normalize_advantage else batch.advantages
        with torch.no_grad():
            old_dist = policy.distribution(obs).detach()  # a copy: set_flat_params moves theta in place
            # Recomputed rather than taken from the rollout so the ratio is exactly 1 at theta_old.
            old_logp = old_dist.log_prob(actions)

        def surrogate() -> torch.Tensor:
            """L(theta) = E[pi_theta(a|s) / pi_old(a|s) * A] (the paper's eq. 14, importance-sampled)."""
            return (torch.exp(policy.distribution(obs).log_prob(actions) - old_logp) * advantages).mean()

        def mean_kl() -> torch.Tensor:
            """Mean KL[pi_old || pi_theta] over the rollout's states (the paper's KL-bar)."""
            return old_dist.kl(policy.distribution(obs)).mean()

        if cfg.update == "trust_region":
            result = natural_gradient_step(params, surrogate, mean_kl, cfg.max_kl, cfg.cg_iters, cfg.cg_damping,
                                           cfg.line_search_steps, cfg.line_search_shrink)
        else:
            result = self._penalty_step(params, surrogate, mean_kl)
        self.line_search_attempts += 1
        self.line_search_successes += int(result.accepted)

        v_loss = self._fit_critic(batch, cfg.vf_lr * (progress_remaining if cfg.anneal_lr else 1.0))
        with torch.no_grad():
            new_dist = policy.distribution(obs)
            kl = old_dist.kl(new_dist).mean().item()
            entropy = new_dist.entropy().mean().item()
            objective = surrogate().item()
        return {
            "losses/policy_loss": -objective,
            "losses/value_loss": v_loss,
            "losses/entropy": entropy,
            "losses/approx_kl": kl,
            "losses/explained_variance": explained_variance(batch.values, batch.returns),
            "charts/learning_rate": self.optimizers["critic"].param_groups[0]["lr"],
            "trpo/line_search_success_rate": self.line_search_successes / self.line_search_attempts,
            "trpo/line_search_accepted": float(result.accepted),
            "trpo/step_fraction": result.step_fraction,
            "trpo/backtracks": result.backtracks,
        }

    def _penalty_step(self, params: list[torch.nn.Parameter], surrogate: Any, mean_kl: Any) -> LineSearchResult:
        """The KL-penalty form, max L(theta) - beta * KL-bar(theta_old, theta), with a fixed beta.

        Its quadratic model g^T s - beta/2 s^T F s peaks at s = F^-1 g / beta; the line search
        then backtracks until the penalised objective itself improves (no KL bound). The paper
        (sec. 4) notes that a fixed beta is hard to choose, which is why the constraint is the default.
        """
        beta = self.config.kl_coef
        g = flat_grad(surrogate(), params)
        if not torch.isfinite(g).all() or g.abs().max() == 0:
            return LineSearchResult(False, 0.0, 0.0, 0.0, 0)
        fvp = fisher_vector_product(mean_kl, params, self.config.cg_damping)
        x = conjugate_gradient(fvp, g, self.config.cg_iters)
        return backtracking_line_search(params, x / beta, lambda: surrogate() - beta * mean_kl(), mean_kl,
                                        float("inf"), self.config.line_search_steps, self.config.line_search_shrink)

    def _fit_critic(self, batch: Batch, lr: float) -> float:
        """vf_iters epochs of Adam minibatches on the value loss; returns its mean."""
        cfg, optimizer = self.config, self.optimizers["critic"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = []
        for _epoch in range(cfg.vf_iters):
            order = torch.randperm(len(batch), generator=self.generator)
            # Shuffled once; minibatches are views.
            obs, returns = tree_map(lambda x, o=order: x[o], batch.obs), batch.returns[order]
            for start in range(0, len(batch), cfg.batch_size):
                end = start + cfg.batch_size
                losses.append(self.value_step(tree_map(lambda x, s=start, e=end: x[s:e], obs), returns[start:end]))
                adam_step(optimizer, self.critic_flat)
        return torch.stack(losses).mean().item()

    def _autograd_value_step(self, obs: dict[str, torch.Tensor], returns: torch.Tensor) -> torch.Tensor:
        """:class:`FusedValueStep`'s job for a critic with an encoder (no hand-derived CNN gradient)."""
        loss = 0.5 * (self.policy.value(obs) - returns).pow(2).mean()
        self.critic_flat.zero_grad()
        loss.backward()
        return loss.detach()

    def _algo_state(self) -> dict[str, Any]:
        return {"line_search_attempts": self.line_search_attempts,
                "line_search_successes": self.line_search_successes}

    def _load_algo_state(self, state: dict[str, Any]) -> None:
        self.line_search_attempts = int(state["line_search_attempts"])
        self.line_search_successes = int(state["line_search_successes"])
