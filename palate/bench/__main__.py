"""``python -m palate.bench SUITE``: side-by-side benchmarks against the peers (``make bench``).

Each suite lives in its own module with a ``run(out_dir) -> dict`` function that trains palate and
the peer on the same budget and writes a Markdown table and JSON under ``out_dir``. The figures
quoted in docs/benchmarks.md come from these runs, each with its exact command there.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from palate.runs import atomic_write_text

SUITES = {
    "rl": "palate.bench.rl",  # PPO/TRPO vs SB3 / sb3-contrib
    "prefs": "palate.bench.prefs",  # preference learning vs imitation
    "lm-sft-rm": "palate.bench.lm_sft_rm",  # SFT / reward model vs TRL
    "lm-ppo": "palate.bench.lm_ppo",  # LM PPO vs TRL
    "feedback": "palate.bench.feedback_load",  # feedback service load test
    "atari": "palate.bench.atari",  # PPO on Breakout vs SB3 CnnPolicy (steps/s)
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m palate.bench", description=__doc__)
    parser.add_argument("suite", choices=[*SUITES, "all"], help="which benchmark to run")
    parser.add_argument("--out", default="bench-results", help="directory for tables and JSON")
    args = parser.parse_args(argv)
    names = list(SUITES) if args.suite == "all" else [args.suite]
    results: dict[str, object] = {}
    for name in names:
        try:
            module = importlib.import_module(SUITES[name])
        except ModuleNotFoundError as err:
            print(f"[{name}] skipped: {err}", file=sys.stderr)
            continue
        out_dir = Path(args.out) / name
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        print(f"[{name}] running; results in {out_dir}", flush=True)
        results[name] = module.run(out_dir)
        print(f"[{name}] done in {time.perf_counter() - start:.0f} s", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out) / "all.json", json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
