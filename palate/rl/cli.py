"""``palate rl train | eval | resume``.

Config precedence: dataclass defaults < preset YAML (top-level keys, then the ``ppo:`` or
``trpo:`` section for the chosen algorithm) < explicit flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from palate.config import add_config_arguments, config_from_args, config_from_dict, config_to_dict, load_yaml
from palate.errors import CheckpointError, ConfigError
from palate.runs import (
    atomic_write_json,
    atomic_write_text,
    prepare_run_dir,
    read_run_config,
    truncate_metrics,
)

log = logging.getLogger(__name__)

ALGOS = ("ppo", "trpo")


def _classes() -> dict[str, Any]:
    from palate.rl.ppo import PPO
    from palate.rl.trpo import TRPO

    return {"ppo": PPO, "trpo": TRPO}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``palate rl`` and its sub-commands."""
    from palate.rl.config import OnPolicyConfig, PPOConfig, TRPOConfig

    rl = subparsers.add_parser("rl", help="control: train, evaluate and resume PPO/TRPO agents on gymnasium envs",
                               description="Control: PPO (Schulman et al. 2017) and TRPO (Schulman et al. 2015).")
    sub = rl.add_subparsers(dest="rl_command", metavar="RL_COMMAND", required=True)

    train = sub.add_parser("train", help="train an agent; writes runs/<name>/",
                           description="Train PPO or TRPO. Every config field is a flag; --batch-size is PPO's "
                                       "minibatch and TRPO's critic minibatch.")
    train.add_argument("--algo", choices=ALGOS, default=None, help="algorithm (default: the preset's `algo`, else ppo)")
    train.add_argument("--config", metavar="YAML", help="preset, e.g. configs/rl/hopper.yaml")
    train.add_argument("--run-name", help="run directory name (default: <env>__<algo>__<seed>__<time>)")
    train.add_argument("--runs-dir", default="runs", help="parent directory of runs (default: runs)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    shared = {f.name for f in dataclasses.fields(OnPolicyConfig)}
    ppo_only = {f.name for f in dataclasses.fields(PPOConfig)} - shared
    add_config_arguments(train, OnPolicyConfig)
    add_config_arguments(train, PPOConfig, skip=tuple(shared))
    add_config_arguments(train, TRPOConfig, skip=tuple(shared | ppo_only))
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a trained run for N episodes")
    ev.add_argument("run", help="run directory (runs/<name>; a preference run's policy/ is found) or checkpoint file")
    ev.add_argument("--episodes", type=int, default=10, help="episodes to run")
    ev.add_argument("--stochastic", action="store_true",
                    help="sample actions instead of taking the mode (writes eval-stochastic.json, not eval.json)")
    ev.add_argument("--video", action="store_true", help="film the first episode to <run>/videos/")
    ev.add_argument("--seed", type=int, default=10_000, help="episode i is reset with seed + i")
    ev.set_defaults(func=cmd_eval)

    res = sub.add_parser("resume", help="continue a run from its checkpoint")
    res.add_argument("run", help="run directory (runs/<name>)")
    res.add_argument("--total-steps", type=int, default=None,
                     help="new overall step target (default: the run's total_steps)")
    res.add_argument("--no-progress", action="store_true", help="no progress bar")
    res.set_defaults(func=cmd_resume)


def preset_values(data: dict[str, Any], algo: str) -> dict[str, Any]:
    """Flatten a preset: top-level fields, then the chosen algorithm's section over them."""
    values = {k: v for k, v in data.items() if k not in ALGOS and k != "algo"}
    section = data.get(algo) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"preset section '{algo}' must be a mapping of field: value")
    values.update(section)
    return values


def build_config(args: argparse.Namespace) -> tuple[str, Any]:
    """The algorithm name and its config from defaults, ``--config`` and flags."""
    from palate.rl.config import PPOConfig, TRPOConfig

    data = load_yaml(args.config) if args.config else {}
    algo = args.algo or data.get("algo", "ppo")
    if algo not in ALGOS:
        raise ConfigError(f"algo must be one of {list(ALGOS)}, got {algo!r}")
    cls = PPOConfig if algo == "ppo" else TRPOConfig
    other = TRPOConfig if algo == "ppo" else PPOConfig
    other_only = {f.name for f in dataclasses.fields(other)} - {f.name for f in dataclasses.fields(cls)}
    foreign = sorted(other_only & set(vars(args)))
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        raise ConfigError(f"{flags}: only for --algo {'trpo' if algo == 'ppo' else 'ppo'}, not {algo}")
    base = preset_values(data, algo)
    if args.config:
        config_from_dict(cls, base, source=f"{args.config} ({algo})")  # errors that name the file
    return algo, config_from_args(cls, args, base=base)


def cmd_train(args: argparse.Namespace) -> int:
    from palate.rl.envs import check_env_id

    algo, cfg = build_config(args)
    check_env_id(cfg.env, cfg.env_module)  # before a run directory exists
    name = args.run_name or f"{cfg.env}__{algo}__{cfg.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(args.runs_dir) / name
    if args.overwrite:
        for stale in ("checkpoint.pt", "summary.json", "eval.json", "eval-stochastic.json", "evaluations.jsonl"):
            (run_dir / stale).unlink(missing_ok=True)
        for stale in ("tb", "best"):
            shutil.rmtree(run_dir / stale, ignore_errors=True)
    prepare_run_dir(run_dir, {"algo": algo, **config_to_dict(cfg)}, overwrite=args.overwrite)
    log.info("training %s on %s for %d steps -> %s", algo, cfg.env, cfg.total_steps, run_dir)
    model = _classes()[algo](cfg)
    model.learn(run_dir=run_dir, progress=not args.no_progress)
    _print_summary(model.summary(), run_dir)
    return 0


def _run_algo(run_dir: Path) -> str:
    algo = read_run_config(run_dir).get("algo")
    if algo not in ALGOS:
        raise CheckpointError(f"{run_dir}/config.yaml names no known algo (got {algo!r})")
    return algo


def cmd_resume(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    algo = _run_algo(run_dir)
    model = _classes()[algo].load(run_dir)
    target = args.total_steps if args.total_steps is not None else model.config.total_steps
    if target <= model.global_step:
        raise ConfigError(f"{run_dir} is already at step {model.global_step}; pass --total-steps above it to go on")
    model.config.total_steps = target
    atomic_write_text(run_dir / "config.yaml",
                      yaml.safe_dump({"algo": algo, **config_to_dict(model.config)}, sort_keys=False))
    truncate_metrics(run_dir, model.global_step)  # records after the checkpoint are logged again
    log.info("resuming %s at step %d of %d", run_dir, model.global_step, target)
    model.learn(total_steps=target - model.global_step, run_dir=run_dir, progress=not args.no_progress)
    _print_summary(model.summary(), run_dir)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from palate.rl.checkpoint import checkpoint_path, load_checkpoint
    from palate.rl.evaluate import evaluate

    path = Path(args.run)
    algo = load_checkpoint(path)["algo"]
    model = _classes()[algo].load(path)
    run_dir = checkpoint_path(path).parent
    video = run_dir / "videos" / f"eval-{'stochastic' if args.stochastic else 'deterministic'}.mp4" \
        if args.video else None
    result = evaluate(model, episodes=args.episodes, deterministic=not args.stochastic, seed=args.seed,
                      video_path=video)
    record = {**result.to_dict(), "global_step": model.global_step, "env": model.config.env}
    # One file per mode: a stochastic evaluation never overwrites the deterministic one.
    out = run_dir / ("eval-stochastic.json" if args.stochastic else "eval.json")
    atomic_write_json(out, record)
    mode = "stochastic" if args.stochastic else "deterministic"
    print(f"{model.config.env} {algo} step {model.global_step}: {mode} return "
          f"{result.mean_return:.1f} +- {result.std_return:.1f} over {args.episodes} episodes -> {out}")
    if video is not None:
        print(f"video: {video.parent}")
    return 0


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    ret = summary.get("mean_return_last_100")
    print(f"{summary['env']} {summary['algo']}: {summary['global_step']} steps"
          + (f", {summary['steps_per_s']:.0f} steps/s" if "steps_per_s" in summary else "")
          + (f", mean return (last 100 episodes) {ret:.1f}" if ret is not None else "")
          + f" -> {run_dir}")
