"""The ``palate`` command: one entry point, a sub-command per layer.

Each layer contributes ``add_parser(subparsers)``; heavy imports (torch, transformers) happen
inside the handlers so ``palate --help`` stays instant. A :class:`palate.errors.PalateError`
becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from palate import __version__
from palate.errors import PalateError

# (sub-command, module providing add_parser)
_LAYERS = [
    ("rl", "palate.rl.cli"),
    ("prefs", "palate.preferences.cli"),
    ("lm", "palate.lm.cli"),
    ("feedback", "palate.feedback.cli"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="palate",
        description="Teach agents and language models what people prefer: TRPO, PPO, "
        "preference learning for control, RLHF for language models, a human-feedback service.",
    )
    parser.add_argument("--version", action="version", version=f"palate {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module in _LAYERS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):
                continue  # layer not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except PalateError as err:
        print(f"palate: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("palate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
