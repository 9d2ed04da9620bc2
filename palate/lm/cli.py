"""``palate lm ...``: the language-model commands, one handler each.

``sft``, ``rm``, ``dpo``, ``demos``, ``label`` (data and supervised stages) and ``ppo``,
``pipeline``, ``eval``, ``bon`` (RL and evaluation). Each training command takes its config
dataclass as flags and/or ``--config file.yaml`` (precedence: defaults < YAML < flags). Config
classes come from :mod:`palate.lm.config` and :mod:`palate.lm.demos` without importing torch, so
``palate --help`` stays instant; the trainers are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path
from typing import Any

from palate.config import add_config_arguments, config_from_args
from palate.lm.config import BestOfNConfig, EvalConfig, LMPPOConfig, PipelineConfig


def _config(cls: type, args: argparse.Namespace) -> Any:
    return config_from_args(cls, args, getattr(args, "config", None))


def _run_sft(args: argparse.Namespace) -> int:
    from palate.lm.sft import SFTConfig, train_sft

    run_dir = train_sft(_config(SFTConfig, args))
    print(f"SFT run written to {run_dir} (model: {run_dir / 'model'})")
    return 0


def _run_rm(args: argparse.Namespace) -> int:
    from palate.lm.reward import RMConfig, train_reward_model

    run_dir = train_reward_model(_config(RMConfig, args))
    print(f"reward model run written to {run_dir} (model: {run_dir / 'model'})")
    return 0


def _run_dpo(args: argparse.Namespace) -> int:
    from palate.lm.dpo import DPOConfig, train_dpo

    run_dir = train_dpo(_config(DPOConfig, args))
    print(f"DPO run written to {run_dir} (policy: {run_dir / 'model'}; evaluate: palate lm eval {run_dir})")
    return 0


def _run_demos(args: argparse.Namespace) -> int:
    from palate.lm.demos import DemosConfig, build_demonstrations

    print(f"demonstrations written to {build_demonstrations(_config(DemosConfig, args))}")
    return 0


def _run_label(args: argparse.Namespace) -> int:
    from palate.lm.demos import LabelConfig, label_comparisons

    print(f"comparisons written to {label_comparisons(_config(LabelConfig, args))}")
    return 0


def _run_ppo(args: argparse.Namespace) -> int:
    from palate.lm.ppo_build import train_ppo
    from palate.runs import read_run_config

    if args.resume:
        # The saved config.yaml is the run's truth; flags may only extend it (e.g. more iterations).
        base = read_run_config(args.resume)
        cfg = config_from_args(LMPPOConfig, args, None, base=base)
        cfg.runs_dir, cfg.run_name = str(Path(args.resume).parent), Path(args.resume).name
        run_dir = train_ppo(cfg, resume=True)
    else:
        cfg = config_from_args(LMPPOConfig, args, args.config)
        run_dir = train_ppo(cfg, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`, one line for the whole run
        return 0
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary.get("final", {})
    print(f"PPO run written to {run_dir} (policy: {run_dir / 'model'}); final reward "
          f"{final.get('objective/reward', float('nan')):.3f}, KL {final.get('objective/kl', float('nan')):.2f} nats")
    return 0


def _run_pipeline(args: argparse.Namespace) -> int:
    from palate.lm.pipeline import run_pipeline

    cfg = config_from_args(PipelineConfig, args, args.config)
    root = run_pipeline(cfg)
    print(f"pipeline written to {root}; report: {root / 'report.md'}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from palate.lm.evaluate import evaluate

    cfg = config_from_args(EvalConfig, args, args.config, base={"run": args.run_dir})
    m = evaluate(cfg)
    print(f"win rate vs SFT (held-out labeller): {m['win_rate']:.3f} ± {m['win_rate_stderr']:.3f}; "
          f"reward {m['reward']:.3f} (SFT {m['reward_reference']:.3f}); KL {m['kl']:.2f} nats; "
          f"perplexity {m['perplexity']:.2f} (SFT {m['perplexity_reference']:.2f})")
    if "human" in m:
        h = m["human"]
        print(f"win rate vs SFT (people): {h['win_rate']:.3f} ± {h['win_rate_stderr']:.3f} over {h['n_answers']} "
              f"answers from {h['n_judges']} judges ({h['ties']} ties, {h['cant_tell']} can't tell)")
        if not h["complete"]:
            print(f"{h['pairs_open']} of {h['n_pairs']} pairs still wait for people in project {h['project']!r}; "
                  "run the same command again to pick up their answers")
    return 0


def _run_bon(args: argparse.Namespace) -> int:
    from palate.lm.best_of_n import best_of_n

    summary = best_of_n(config_from_args(BestOfNConfig, args, args.config))
    for c in summary["curve"]:
        print(f"best-of-{int(c['n'])}: KL {c['kl']:.2f} nats, RM score {c['proxy']:.3f}, held-out utility "
              f"{c['gold']:.3f}, expected win rate vs SFT {c['win_rate']:.3f}")
    return 0


def _add(lm_sub: Any, name: str, help_text: str, config_cls_path: str, func: Any) -> argparse.ArgumentParser:
    module, _, cls_name = config_cls_path.rpartition(".")
    # Config modules import neither torch nor transformers, so `palate --help` stays instant.
    cls = getattr(importlib.import_module(module), cls_name)
    parser = lm_sub.add_parser(name, help=help_text, description=(cls.__doc__ or help_text))
    parser.add_argument("--config", help="YAML file of config fields (flags override it)")
    add_config_arguments(parser, cls)
    parser.set_defaults(func=func)
    return parser


def add_parser(subparsers: Any) -> None:
    """Register ``palate lm`` and its sub-commands."""
    lm = subparsers.add_parser("lm", help="language models: SFT, reward models, PPO (RLHF)",
                               description="Language models: SFT, reward models, RLHF with PPO.")
    lm_sub = lm.add_subparsers(dest="lm_command", metavar="LM_COMMAND")
    lm.set_defaults(func=lambda _args: (lm.print_help(), 2)[1])
    _add(lm_sub, "sft", "supervised fine-tuning on demonstrations", "palate.lm.config.SFTConfig", _run_sft)
    _add(lm_sub, "rm", "train a reward model on comparisons", "palate.lm.config.RMConfig", _run_rm)
    _add(lm_sub, "dpo", "direct preference optimisation of a policy on comparisons (no reward model)",
         "palate.lm.config.DPOConfig", _run_dpo)
    _add(lm_sub, "demos", "build demonstrations by best-of-N sampling judged by the panel",
         "palate.lm.demos.DemosConfig", _run_demos)
    _add(lm_sub, "label", "sample K completions per prompt and have the panel (or people) rank them",
         "palate.lm.demos.LabelConfig", _run_label)


    ppo = lm_sub.add_parser("ppo", help="PPO(-ptx) with a KL penalty on a language model",
                            description=LMPPOConfig.__doc__)
    ppo.add_argument("--config", help="YAML file of config fields (flags override it)")
    ppo.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    ppo.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    add_config_arguments(ppo, LMPPOConfig)
    ppo.set_defaults(func=_run_ppo)

    pipe = lm_sub.add_parser("pipeline", help="SFT -> reward model -> PPO -> eval -> report",
                             description=PipelineConfig.__doc__)
    pipe.add_argument("--config", help="YAML file (e.g. configs/lm/pipeline-sentiment.yaml)")
    add_config_arguments(pipe, PipelineConfig)
    pipe.set_defaults(func=_run_pipeline)

    ev = lm_sub.add_parser("eval", help="win rate vs SFT by the held-out labeller (or people), KL, reward, "
                           "alignment tax",
                           description=EvalConfig.__doc__)
    ev.add_argument("run_dir", help="PPO run directory (runs/NAME) or a model directory")
    ev.add_argument("--config", help="YAML file of EvalConfig fields")
    add_config_arguments(ev, EvalConfig, skip=("run",))
    ev.set_defaults(func=_run_eval)

    bon = lm_sub.add_parser("bon", help="best-of-N with the reward model: gold and proxy scores against KL",
                            description=BestOfNConfig.__doc__)
    bon.add_argument("--config", help="YAML file of BestOfNConfig fields")
    add_config_arguments(bon, BestOfNConfig)
    bon.set_defaults(func=_run_bon)
