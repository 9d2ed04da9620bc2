"""``palate lm ...``: language-model sub-commands.

Part 1 (this file): ``sft``, ``rm``, ``dpo``, ``demos``, ``label``. Part 2 (``ppo``, ``pipeline``, ``eval``)
lives in :mod:`palate.lm.cli_rl`, which registers itself on the same sub-parser when present.
Each training command takes its config dataclass as flags and/or ``--config file.yaml``
(precedence: defaults < YAML < flags). Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any


def _config(cls: type, args: argparse.Namespace) -> Any:
    from palate.config import config_from_args

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


def _add(lm_sub: Any, name: str, help_text: str, config_cls_path: str, func: Any) -> argparse.ArgumentParser:
    from palate.config import add_config_arguments

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
    _add(lm_sub, "sft", "supervised fine-tuning on demonstrations", "palate.lm.configs.SFTConfig", _run_sft)
    _add(lm_sub, "rm", "train a reward model on comparisons", "palate.lm.configs.RMConfig", _run_rm)
    _add(lm_sub, "dpo", "direct preference optimisation of a policy on comparisons (no reward model)",
         "palate.lm.configs.DPOConfig", _run_dpo)
    _add(lm_sub, "demos", "build demonstrations by best-of-N sampling judged by the panel",
         "palate.lm.demos.DemosConfig", _run_demos)
    _add(lm_sub, "label", "sample K completions per prompt and have the panel rank them",
         "palate.lm.demos.LabelConfig", _run_label)

    # ---- Part 2 (ppo, pipeline, eval) registers here; it is optional until it exists. ----
    try:
        cli_rl = importlib.import_module("palate.lm.cli_rl")
    except ModuleNotFoundError as err:
        if err.name != "palate.lm.cli_rl":
            raise
    else:
        cli_rl.add_rl_parsers(lm_sub)
