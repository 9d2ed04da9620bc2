"""``palate lm ppo | pipeline | eval | bon``: the RL half of the language-model commands.

Registered by :func:`palate.lm.cli.add_parser` on the same ``lm`` sub-parser. Config classes come
from :mod:`palate.lm.rl_configs` (no torch import), so ``palate --help`` stays instant; the
trainers are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from palate.config import add_config_arguments, config_from_args
from palate.lm.rl_configs import BestOfNConfig, EvalConfig, LMPPOConfig, PipelineConfig


def _run_ppo(args: argparse.Namespace) -> int:
    from palate.lm.ppo import train_ppo
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
    return 0


def _run_bon(args: argparse.Namespace) -> int:
    from palate.lm.best_of_n import best_of_n

    summary = best_of_n(config_from_args(BestOfNConfig, args, args.config))
    for c in summary["curve"]:
        print(f"best-of-{int(c['n'])}: KL {c['kl']:.2f} nats, RM score {c['proxy']:.3f}, held-out utility "
              f"{c['gold']:.3f}, expected win rate vs SFT {c['win_rate']:.3f}")
    return 0


def add_rl_parsers(lm_sub: Any) -> None:
    """Add ``ppo``, ``pipeline``, ``eval`` and ``bon`` to the ``palate lm`` sub-parser."""
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

    ev = lm_sub.add_parser("eval", help="win rate vs SFT by the held-out labeller, KL, reward, alignment tax",
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


