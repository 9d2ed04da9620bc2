"""The configuration of a preference run: :class:`PreferenceConfig`, its parsing, and the parts it names.

One dataclass is the CLI (``palate prefs train`` flags), the YAML file and the ``config.yaml`` saved
in the run directory. :func:`algo_classes`, :func:`policy_config` and :func:`reward_model` build
what a config names without building the trainer, so presets can be checked and finished runs
read back cheaply. Importing this module is light (no torch, no gymnasium).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from palate.config import config_from_dict, doc_field
from palate.errors import ConfigError, PreferenceError


@dataclass
class PreferenceConfig:
    """Deep RL from human preferences: the reward is learned from segment comparisons."""

    env: str = doc_field("Hopper-v5", "gymnasium environment id (ALE ids such as PongNoFrameskip-v4: from pixels)")
    algo: Literal["ppo", "trpo"] = doc_field("ppo", "policy optimiser for the learned reward")
    labels: int = doc_field(700, "label budget: comparisons asked over the whole run")
    steps: int = doc_field(1_000_000, "policy environment steps (the random-policy warm-up is extra)")
    segment_length: int = doc_field(25, "k, steps per clip (25 MuJoCo steps is about 1.5 s of play, 25 Atari steps 1.7 s)")
    ensemble_size: int = doc_field(3, "reward predictors in the ensemble, each on a bootstrap sample")
    initial_label_fraction: float = doc_field(0.25, "share of the budget labelled on random-policy clips first")
    label_schedule_t0: float = doc_field(2e6, "T0 of the labelling rate 1/(1 + T/T0) (paper: 2e6 on MuJoCo)")
    error_rate: float = doc_field(0.1, "epsilon of the reward model's error model (answers at random)")
    labeller: Literal["synthetic", "human"] = doc_field("synthetic", "who answers the comparisons")
    temperature: float = doc_field(0.1, "synthetic oracle: Boltzmann temperature on normalised segment returns")
    oracle_error_rate: float = doc_field(0.1, "synthetic oracle: chance of a uniformly random answer")
    oracle_equal_margin: float = doc_field(
        0.0, "synthetic oracle: answer 'equal' when the normalised return gap is below this")
    selector: Literal["random", "disagreement"] = doc_field("disagreement", "query selection")
    oversample: int = doc_field(10, "disagreement selector: candidate pairs drawn per pair kept")
    random_steps: int = doc_field(0, "random-policy warm-up steps (0: 4 x segment_length x initial pairs)")
    chunk_steps: int = doc_field(10_000, "policy steps between labelling/fitting rounds (whole rollouts)")
    pool_steps: int = doc_field(100_000, "recent steps kept in the trajectory pool that clips are cut from")
    fixed_length_episodes: bool = doc_field(
        True, "switch off early termination where the env allows it, so episode ends leak no reward "
        "(Atari: no lost life or game over ends an episode; the next game starts at once)")
    fall_penalty: float = doc_field(
        10.0, "fixed-length MuJoCo episodes: reward subtracted per step spent fallen (replaces termination)")
    reward_offset: float = doc_field(
        0.0, "added to the normalised r_hat the policy optimises; > 0 makes staying alive worth something when "
        "episodes can end early (zero-mean rewards make ending an episode free); "
        "python -m palate.bench.prefs_offset RUN says what it is worth in true-reward units")
    rm_hidden_sizes: list[int] = doc_field([64, 64], "hidden widths of each reward predictor")
    rm_dropout: float = doc_field(0.2, "dropout in the reward predictors")
    rm_lr: float = doc_field(1e-3, "reward-model Adam step size")
    rm_batch_size: int = doc_field(32, "comparisons per reward-model gradient step")
    rm_l2_coef: float = doc_field(1e-4, "initial L2 coefficient, adapted to keep val/train loss in 1.1-1.5")
    rm_epochs: int = doc_field(5, "reward-model epochs per round")
    rm_initial_epochs: int = doc_field(50, "reward-model epochs after the random-policy labels")
    rm_stats_steps: int = doc_field(10_000, "recent states used to normalise r_hat and measure its correlation")
    rm_device: str = doc_field("cpu", "where the reward model trains: cpu, cuda or auto (cuda when available)")
    rl: dict[str, Any] = doc_field({}, "PPO/TRPO config fields (YAML mapping), e.g. {n_envs: 4, n_steps: 512}")
    labels_from: str | None = doc_field(None, "reuse the labels of an earlier run (run dir or labels.jsonl)")
    max_pending: int = doc_field(64, "async labelling: most clip pairs waiting for a human; more are dropped")
    label_wait_s: float = doc_field(0.0, "human labeller: seconds to wait for outstanding answers at the end")
    initial_wait_s: float = doc_field(
        3600.0, "human labeller: longest wait for the random-policy labels before the policy starts")
    feedback_url: str = doc_field("http://127.0.0.1:8000", "human labeller: the feedback service")
    feedback_token_env: str = doc_field("PALATE_FEEDBACK_TOKEN", "human labeller: env var holding the admin token")
    feedback_project: str | None = doc_field(None, "human labeller: feedback project (default: the run name)")
    eval_episodes: int = doc_field(5, "episodes of the final deterministic evaluation on the true reward")
    seed: int = doc_field(0, "seeds numpy, torch, environments, oracle and query sampling")
    run_name: str | None = doc_field(None, "run directory name under runs_dir (default: prefs-<env>-<algo>-<seed>)")
    runs_dir: str = doc_field("runs", "parent directory of run directories")
    overwrite: bool = doc_field(False, "replace an existing run directory of the same name")
    torch_threads: int = doc_field(1, "torch threads (1 is fastest for these small MLPs)")
    progress: bool = doc_field(True, "show a progress bar")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
        for name in ("labels", "steps", "segment_length", "ensemble_size", "oversample", "chunk_steps",
                     "pool_steps", "rm_batch_size", "rm_stats_steps", "max_pending"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field '{name}' must be > 0, got {getattr(self, name)}")
        for name in ("random_steps", "rm_epochs", "rm_initial_epochs", "eval_episodes", "label_wait_s",
                     "initial_wait_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config field '{name}' must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.initial_label_fraction <= 1.0:
            raise ConfigError(f"initial_label_fraction must be in [0, 1], got {self.initial_label_fraction}")
        if not 0.0 <= self.error_rate < 1.0 or not 0.0 <= self.oracle_error_rate <= 1.0:
            raise ConfigError("error_rate must be in [0, 1) and oracle_error_rate in [0, 1]")
        if self.label_schedule_t0 <= 0 or self.temperature < 0:
            raise ConfigError("label_schedule_t0 must be > 0 and temperature >= 0")

    @property
    def name(self) -> str:
        return self.run_name or f"prefs-{self.env}-{self.algo}-{self.seed}"


def config_from_mapping(data: dict[str, Any]) -> PreferenceConfig:
    """A validated :class:`PreferenceConfig` from a plain mapping (YAML)."""
    return config_from_dict(PreferenceConfig, data, source="preference config")


def algo_classes(algo: str) -> tuple[Any, Any]:
    """The policy optimiser class and its config class for ``algo`` ("ppo" or "trpo")."""
    from palate import rl

    if algo == "trpo":
        if not hasattr(rl, "TRPO"):
            raise PreferenceError("algo 'trpo' needs palate.rl.TRPO, which this install lacks; use --algo ppo")
        return rl.TRPO, rl.TRPOConfig
    return rl.PPO, rl.PPOConfig


def policy_config(cfg: PreferenceConfig) -> Any:
    """The PPO/TRPO config the run's policy trains with: ``cfg.rl`` over the run's env, seed and steps.

    A module function, not only part of building the policy, so that a preset's ``rl`` block can be
    checked without making environments (tests/preferences/test_presets.py).
    """
    _, config_cls = algo_classes(cfg.algo)
    fields = {"env": cfg.env, "seed": cfg.seed, "torch_threads": cfg.torch_threads, **cfg.rl,
              "total_steps": cfg.steps}
    return config_from_dict(config_cls, fields, source="PreferenceConfig.rl")


def reward_model(cfg: PreferenceConfig, observation_space: Any, action_space: Any) -> Any:
    """The run's (untrained) r_hat ensemble, built from ``cfg``.

    A module function so that whatever loads a finished run's ``reward_model.pt`` builds the same
    architecture (palate.bench.prefs_offset).
    """
    from palate.preferences.reward_model import RewardEnsemble

    return RewardEnsemble(
        observation_space, action_space, n_members=cfg.ensemble_size,
        hidden_sizes=cfg.rm_hidden_sizes, dropout=cfg.rm_dropout, lr=cfg.rm_lr,
        batch_size=cfg.rm_batch_size, l2_coef=cfg.rm_l2_coef, error_rate=cfg.error_rate, seed=cfg.seed,
        device=cfg.rm_device,
    )
