"""Config dataclasses of the control trainers: one per algorithm, shared fields in a base.

Each field is a CLI flag (``--clip-range 0.1``), a key of a preset YAML (``configs/rl/*.yaml``)
and a line of the ``config.yaml`` saved in every run directory. Names follow the papers and
Stable-Baselines3 so presets from rl-baselines3-zoo translate one to one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from palate.config import coerce_fields, doc_field
from palate.errors import ConfigError


@dataclass
class OnPolicyConfig:
    """Fields shared by PPO and TRPO: environment, rollout, normalisation, network, bookkeeping."""

    env: str = doc_field(
        "CartPole-v1", "gymnasium environment id, or module:attr for your own env class or factory "
                       "(e.g. mypkg.envs:MyEnv)")
    env_module: str | None = doc_field(
        None, "module(s) to import before making the env, e.g. one whose gymnasium.register calls "
              "define the --env id (comma-separated; saved with the run, so eval and resume import it too)")
    total_steps: int = doc_field(100_000, "environment steps to train for; also the learning-rate annealing horizon")
    seed: int = doc_field(0, "seeds torch, the environments and action sampling; same seed, same run")
    n_envs: int = doc_field(1, "N, environments stepped in parallel (actors)")
    n_steps: int = doc_field(2048, "T, steps per environment per rollout (batch = N * T)")
    vec_env: Literal["sync", "subprocess", "envpool"] = doc_field(
        "sync", "sync: all envs in this process; subprocess: one process per env (for slow envs); "
        "envpool: Atari in envpool's C++ threads (pip install envpool)")
    gamma: float = doc_field(0.99, "discount factor gamma")
    gae_lambda: float = doc_field(0.95, "GAE lambda (bias/variance trade-off of the advantage)")
    normalize_advantage: bool = doc_field(True, "whiten advantages per (mini)batch")
    norm_obs: bool = doc_field(False, "normalise observations by running mean/std (saved in the checkpoint)")
    norm_reward: bool = doc_field(False, "scale rewards by the running std of the discounted return")
    clip_obs: float = doc_field(10.0, "clip normalised observations to [-clip_obs, clip_obs]")
    clip_reward: float = doc_field(10.0, "clip normalised rewards to [-clip_reward, clip_reward]")
    hidden_sizes: list[int] = doc_field([64, 64], "hidden layer widths of the actor and of the critic MLPs")
    activation: Literal["tanh", "relu"] = doc_field("tanh", "hidden activation")
    ortho_init: bool = doc_field(True, "orthogonal init (gain sqrt 2, actor head 0.01, critic head 1)")
    log_std_init: float = doc_field(0.0, "initial log-std of the Gaussian policy (continuous actions)")
    cnn: Literal["nature", "small"] = doc_field(
        "nature", "CNN of image observations: nature (Mnih et al. 2015, images of 36x36 and up) or small "
                  "(16 3x3/1, 32 3x3/2, for images from 5x5)")
    cnn_features: int = doc_field(512, "output width of each image's CNN (SB3's features_dim)")
    atari: bool | None = doc_field(
        None, "Atari preprocessing (frame skip 4, 84x84 grey, frame stack 4, episodic life, reward sign for "
              "training; the unclipped game score is reported); None: on for ALE ids, e.g. ALE/Pong-v5")
    torch_threads: int = doc_field(1, "torch intra-op threads (1 is fastest for small MLPs; 0 leaves torch's)")
    log_interval: int = doc_field(1, "log metrics every this many rollouts")
    checkpoint_every: int = doc_field(50_000, "write checkpoint.pt every this many env steps (and at the end)")
    eval_every: int = doc_field(
        0, "evaluate the deterministic policy on a separate env every this many env steps; the best is "
           "saved to best/checkpoint.pt, each evaluation to evaluations.jsonl (0: off)")
    eval_episodes: int = doc_field(5, "episodes per periodic evaluation (eval_every)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Convert each field to its type, then raise ConfigError naming the first bad value."""
        coerce_fields(self)
        positive = ["total_steps", "n_envs", "n_steps", "log_interval", "eval_episodes", "cnn_features"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field '{name}' must be > 0, got {getattr(self, name)}")
        for name in ["gamma", "gae_lambda"]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"config field '{name}' must be in [0, 1], got {getattr(self, name)}")
        if not self.hidden_sizes or any(h <= 0 for h in self.hidden_sizes):
            raise ConfigError(f"config field 'hidden_sizes' must be positive widths, got {self.hidden_sizes}")
        for name in ["checkpoint_every", "eval_every", "torch_threads"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"config field '{name}' must be >= 0, got {getattr(self, name)}")
        if self.n_envs * self.n_steps < 2:
            raise ConfigError("n_envs * n_steps must be at least 2 (one rollout is the batch)")

    @property
    def rollout_size(self) -> int:
        """Samples per rollout, N * T."""
        return self.n_envs * self.n_steps

    def replace(self, **changes: Any) -> OnPolicyConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass
class PPOConfig(OnPolicyConfig):
    """PPO (Schulman et al. 2017). Defaults are Stable-Baselines3's, so runs compare like for like."""

    loss: Literal["clip", "kl_penalty"] = doc_field(
        "clip", "clip: L^CLIP (sec. 3); kl_penalty: L^KLPEN with adaptive beta (sec. 4)")
    learning_rate: float = doc_field(3e-4, "Adam step size (actor and critic share one optimiser)")
    anneal_lr: bool = doc_field(False, "anneal the learning rate linearly to 0 over total_steps")
    n_epochs: int = doc_field(10, "K, passes over each rollout")
    batch_size: int = doc_field(64, "minibatch size (SB3's name; CleanRL's minibatch_size)")
    clip_range: float = doc_field(0.2, "epsilon of the clipped ratio (loss=clip)")
    anneal_clip_range: bool = doc_field(False, "anneal clip_range linearly to 0 like the learning rate")
    clip_range_vf: float | None = doc_field(None, "clip the value change around V_old by this much (None: off)")
    ent_coef: float = doc_field(0.0, "c2, weight of the entropy bonus")
    vf_coef: float = doc_field(0.5, "c1, weight of the value loss")
    max_grad_norm: float = doc_field(0.5, "clip the global gradient norm to this")
    target_kl: float | None = doc_field(
        None, "stop the epochs early when approx KL > 1.5 * target_kl (SB3's rule; None: off)")
    kl_coef: float = doc_field(1.0, "initial beta of the KL penalty (loss=kl_penalty)")
    kl_target: float = doc_field(0.01, "d_targ: beta halves below d_targ/1.5, doubles above 1.5 d_targ")
    fused_update: bool = doc_field(
        True, "loss=clip without value clipping: hand-derived gradients instead of autograd (same numbers, "
              "far fewer ops per minibatch on small MLPs; palate.rl.fused)")

    def validate(self) -> None:
        super().validate()
        if self.batch_size <= 1 or self.batch_size > self.rollout_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be in [2, n_envs * n_steps = {self.rollout_size}]")
        for name in ["learning_rate", "n_epochs", "clip_range", "kl_coef", "kl_target", "max_grad_norm"]:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field '{name}' must be > 0, got {getattr(self, name)}")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ConfigError(f"target_kl must be > 0 or None, got {self.target_kl}")


@dataclass
class TRPOConfig(OnPolicyConfig):
    """TRPO (Schulman et al. 2015). Defaults are sb3-contrib's TRPO numbers; for a Gaussian policy
    sb3-contrib's KL is per action dimension, so its defaults are ``max_kl`` and ``cg_damping``
    times the action dimension here (docs/rl.md)."""

    update: Literal["trust_region", "kl_penalty"] = doc_field(
        "trust_region", "trust_region: max surrogate s.t. KL <= max_kl; kl_penalty: max surrogate - beta KL")
    max_kl: float = doc_field(
        0.01, "delta, the trust-region bound on the mean KL of the joint action distribution (summed over "
        "a Gaussian's action dims; sb3-contrib's target_kl averages over them: its target_kl = max_kl / act_dim)")
    kl_coef: float = doc_field(1.0, "beta of the fixed KL penalty (update=kl_penalty)")
    cg_iters: int = doc_field(15, "conjugate-gradient iterations for F^-1 g")
    cg_damping: float = doc_field(
        0.1, "damping added to the Fisher matrix, F + damping I (sb3-contrib's cg_damping = cg_damping / act_dim, "
        "as for max_kl)")
    line_search_steps: int = doc_field(10, "backtracking line-search trials before giving up")
    line_search_shrink: float = doc_field(0.8, "step shrink factor between line-search trials")
    vf_lr: float = doc_field(1e-3, "Adam step size of the critic, trained by its own optimiser")
    vf_iters: int = doc_field(10, "critic epochs per rollout (sb3's n_critic_updates)")
    batch_size: int = doc_field(128, "critic minibatch size")
    anneal_lr: bool = doc_field(False, "anneal vf_lr linearly to 0 over total_steps")

    def validate(self) -> None:
        super().validate()
        if self.batch_size <= 1 or self.batch_size > self.rollout_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be in [2, n_envs * n_steps = {self.rollout_size}]")
        for name in ["max_kl", "kl_coef", "cg_iters", "cg_damping", "line_search_steps", "vf_lr", "vf_iters"]:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field '{name}' must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.line_search_shrink < 1.0:
            raise ConfigError(f"line_search_shrink must be in (0, 1), got {self.line_search_shrink}")
