"""``make run``: the InstructGPT pipeline on the shipped SmolLM2-135M-Instruct, CPU preset.

Demonstrations -> SFT -> comparisons by the labeller panel -> reward model -> PPO with a KL
penalty -> evaluation by a held-out labeller -> ``report.md`` with plots. Stages already done are
skipped, so a second ``make run`` only rebuilds the report. Pass another pipeline YAML as the
first argument (e.g. ``configs/lm/pipeline-sentiment-gpu.yaml``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "lm" / "pipeline-sentiment.yaml"
WIN_RATE_TARGET = 0.65
KL_LIMIT = 10.0


def main(argv: list[str] | None = None) -> int:
    from palate.config import config_from_dict, load_yaml
    from palate.errors import PalateError
    from palate.lm.pipeline import PipelineConfig, run_pipeline

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path = Path(argv[0]) if argv else DEFAULT_CONFIG
    start = time.perf_counter()
    try:
        cfg = config_from_dict(PipelineConfig, load_yaml(config_path), source=str(config_path))
        root = run_pipeline(cfg)
    except PalateError as err:
        print(f"palate: error: {err}", file=sys.stderr)
        return 2
    ev = json.loads((root / "eval" / "summary.json").read_text())
    met = ev["win_rate"] >= WIN_RATE_TARGET and ev["kl"] <= KL_LIMIT
    print()
    print(f"report: {root / 'report.md'}")
    print(f"win rate of PPO vs SFT, judged by the held-out labeller: {ev['win_rate']:.1%} "
          f"± {ev['win_rate_stderr']:.1%} over {ev['n_comparisons']} test comparisons")
    print(f"task reward {ev['reward']:.3f} (SFT {ev['reward_reference']:.3f}); KL to SFT {ev['kl']:.2f} nats; "
          f"perplexity on held-out Python docs {ev['perplexity']:.2f} (SFT {ev['perplexity_reference']:.2f})")
    print(f"target (win rate >= {WIN_RATE_TARGET:.0%} at KL <= {KL_LIMIT:g} nats): {'met' if met else 'NOT met'}; "
          f"this run took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
