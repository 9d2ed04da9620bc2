"""``palate prefs``: deep RL from human preferences for control.

    palate prefs train --env Hopper-v5 --algo trpo --labeller synthetic --labels 700 --steps 1e6
    palate prefs train --config configs/prefs/pendulum.yaml --labels-from runs/prefs-a
    palate prefs resume runs/prefs-Hopper-v5-trpo-0 [--steps 2e6]

Flags are the fields of :class:`palate.preferences.config.PreferenceConfig`; ``--config`` reads the
same fields from YAML (flags win). Heavy imports happen inside the handler.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register ``prefs`` and its sub-commands on the top-level parser."""
    from palate.config import add_config_arguments
    from palate.preferences.config import PreferenceConfig

    prefs = subparsers.add_parser(
        "prefs", help="learn a reward from comparisons of clips and optimise it (Christiano et al. 2017)",
        description="Deep RL from human preferences: the agent never sees the environment's reward.",
    )
    sub = prefs.add_subparsers(dest="prefs_command", metavar="COMMAND")
    prefs.set_defaults(func=lambda args: (prefs.print_help(), 2)[1])

    train = sub.add_parser(
        "train", help="train a policy on a reward learned from synthetic or human comparisons",
        description="Interleave PPO/TRPO on r_hat, labelling of clip pairs and reward-model fitting. "
        "Writes runs/<name>/: config.yaml, metrics.jsonl, labels.jsonl + segments/, prefs_state.pt (the "
        "checkpoint `palate prefs resume` continues from, rewritten every round), reward_model.pt, "
        "policy/checkpoint.pt, summary.json.",
    )
    train.add_argument("--config", metavar="YAML", help="a YAML file of PreferenceConfig fields (flags override it)")
    add_config_arguments(train, PreferenceConfig, skip=("rl",))
    train.add_argument("--rl", dest="rl_yaml", metavar="YAML_MAPPING",
                       help="PPO/TRPO fields as an inline YAML mapping, e.g. '{n_envs: 4, n_steps: 512}'")
    train.set_defaults(func=_train)

    resume = sub.add_parser(
        "resume", help="continue a run stopped by a crash or Ctrl-C from its last round",
        description="Continue runs/<name> from prefs_state.pt (written after every round) to its `steps`, or to "
        "--steps. Settings come from the run's config.yaml. Labels already in labels.jsonl are kept and "
        "learned from, never asked again; metrics.jsonl records after the checkpoint are logged again. "
        "Clip pairs still waiting for a human when the run stopped are dropped (see docs/preferences.md).",
    )
    resume.add_argument("run", metavar="RUN_DIR", help="the run directory (runs/<name>)")
    resume.add_argument("--steps", type=_step_count, default=None,
                        help="new policy-step target, above the checkpoint's (default: the run's `steps`)")
    resume.add_argument("--no-progress", action="store_true", help="no progress bar")
    resume.set_defaults(func=_resume)


def _train(args: argparse.Namespace) -> int:
    import yaml

    from palate.config import config_from_args, load_yaml
    from palate.errors import ConfigError
    from palate.preferences.config import PreferenceConfig
    from palate.preferences.trainer import train_preferences

    base: dict[str, Any] = {}
    if args.config:
        base = load_yaml(args.config)
    if args.rl_yaml:
        try:
            rl = yaml.safe_load(args.rl_yaml)
        except yaml.YAMLError as err:
            raise ConfigError(f"--rl must be a YAML mapping like '{{n_envs: 4}}': {err}") from err
        if not isinstance(rl, dict):
            raise ConfigError(f"--rl must be a YAML mapping like '{{n_envs: 4}}', got {args.rl_yaml!r}")
        base["rl"] = {**base.get("rl", {}), **rl}
    cfg = config_from_args(PreferenceConfig, args, base=base)
    summary = train_preferences(cfg)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _step_count(text: str) -> int:
    """``--steps`` accepts 2000000, 2e6 or 2_000_000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps like 2e6, got {text!r}") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole number of steps, got {text!r}")
    return int(value)


def _resume(args: argparse.Namespace) -> int:
    from palate.preferences.trainer import PreferenceTrainer

    trainer = PreferenceTrainer.resume(args.run, steps=args.steps)
    if args.no_progress:
        trainer.cfg.progress = False
    summary = trainer.train()
    print(json.dumps(summary, indent=2, default=str))
    return 0
