"""Benchmark: preference learning for control (Christiano et al. 2017) against its baselines.

For each environment and seed:

* **true reward**: the same algorithm and settings trained on the environment's reward (the
  ceiling the paper compares against);
* **palate** with 350, 700 and 1,400 synthetic labels, nothing else changed;
* **imitation** (the peer): ``PreferenceComparisons`` with the same label budget, fragment
  length and steps, run side by side in its own venv (``bench-venvs/imitation``, see
  :func:`ensure_imitation_venv`) on the v4 MuJoCo task that imitation's gymnasium 0.29 provides;
  palate runs the same v4 task for that comparison.

Every return is the mean true return of the deterministic policy over ``eval_episodes``
episodes of the unmodified environment. Results go to ``out_dir/prefs.json``, a Markdown table
``out_dir/prefs.md`` and a plot ``out_dir/prefs_return_vs_labels.png``.

The full benchmark (1M steps x 2 envs x 3 seeds x 5 runs) takes many hours on a CPU: palate's
preference rows took 6-26 minutes each on one core, imitation's 48-109 (docs/benchmarks.md);
``steps``, ``envs``, ``seeds`` and ``label_counts`` scale it down, and the report says what ran.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from palate.runs import atomic_write_text

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
IMITATION_VENV = REPO / "bench-venvs" / "imitation"
CONFIGS = {"Hopper": REPO / "configs/prefs/hopper.yaml", "HalfCheetah": REPO / "configs/prefs/halfcheetah.yaml"}


def ensure_imitation_venv(venv: Path = IMITATION_VENV) -> Path:
    """Create the peer's venv if missing: torch 2.13.0 first (so pip keeps the CPU build), then imitation."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "imitation==1.0.1", "gymnasium[mujoco]==0.29.1"], check=True)
    return python


def _base_config(env: str, algo: str | None) -> dict[str, Any]:
    from palate.config import load_yaml

    family = env.split("-")[0]
    data = load_yaml(CONFIGS[family]) if family in CONFIGS else {}
    data["env"] = env
    if algo is not None and algo != data.get("algo"):
        data["algo"] = algo
        # The YAML's rl block is tuned for its algorithm; the other one starts from its defaults.
        data["rl"] = {k: v for k, v in data.get("rl", {}).items() if k in ("n_envs", "norm_obs", "gamma", "gae_lambda")}
        if algo == "ppo":
            data["rl"].update(n_steps=2048, batch_size=64, n_epochs=10, learning_rate=3e-4)
    return data


def run_true_reward(env: str, steps: int, seed: int, algo: str | None, eval_episodes: int) -> dict[str, Any]:
    """The same algorithm on the environment's own reward."""
    from palate import rl
    from palate.config import config_from_dict
    from palate.rl.evaluate import evaluate

    base = _base_config(env, algo)
    algo_name = base.get("algo", "ppo")
    cls, cfg_cls = (rl.TRPO, rl.TRPOConfig) if algo_name == "trpo" else (rl.PPO, rl.PPOConfig)
    cfg = config_from_dict(cfg_cls, {**base.get("rl", {}), "env": env, "seed": seed, "total_steps": steps})
    start = time.perf_counter()
    model = cls(cfg).learn(total_steps=steps, progress=False)
    wall = time.perf_counter() - start
    result = evaluate(model, env_id=env, episodes=eval_episodes, seed=seed + 10_000)
    # The steps it ran (whole rollouts: up to one rollout past ``steps``), as the palate rows report.
    return {"method": "true reward", "algo": algo_name, "env": env, "seed": seed, "labels": 0,
            "steps": int(model.global_step),
            "eval_true_return_mean": result.mean_return, "eval_true_returns": result.returns, "wall_time_s": wall}


def run_palate(env: str, labels: int, steps: int, seed: int, algo: str | None, eval_episodes: int,
               runs_dir: Path) -> dict[str, Any]:
    """palate's preference loop with ``labels`` synthetic labels."""
    from palate.preferences.config import config_from_mapping
    from palate.preferences.trainer import train_preferences

    base = _base_config(env, algo)
    base.update(labels=labels, steps=steps, seed=seed, eval_episodes=eval_episodes, progress=False,
                runs_dir=str(runs_dir), run_name=f"{env}-{base.get('algo', 'ppo')}-{labels}-{seed}", overwrite=True)
    # Keep the paper's rate shape on a shortened run: T0 scales with the step budget.
    base["label_schedule_t0"] = 2.0 * steps
    base["chunk_steps"] = min(int(base.get("chunk_steps", 10_240)), max(steps // 10, 2048))
    summary = train_preferences(config_from_mapping(base))
    return {"method": "palate prefs", "algo": base.get("algo", "ppo"), "env": env, "seed": seed, "labels": labels,
            "steps": summary["policy_steps"], "random_steps": summary["random_steps"],
            "eval_true_return_mean": summary["eval_true_return_mean"],
            "eval_true_returns": summary["eval_true_returns"], "wall_time_s": summary["wall_time_s"]}


def run_imitation(env: str, labels: int, steps: int, seed: int, eval_episodes: int, segment_length: int = 25,
                  fixed_length: bool | None = None, timeout_s: float = 6 * 3600) -> dict[str, Any]:
    """The peer, in its own venv; returns its JSON result (or the error it died with).

    ``fixed_length`` (default: as palate's preset for ``env``) gives it the same episode rules.
    """
    if fixed_length is None:
        fixed_length = bool(_base_config(env, None).get("fixed_length_episodes", True))
    python = ensure_imitation_venv()
    script = Path(__file__).with_name("imitation_prefs.py")
    cmd = [str(python), str(script), "--env", env, "--labels", str(labels), "--steps", str(steps), "--seed",
           str(seed), "--segment-length", str(segment_length), "--eval-episodes", str(eval_episodes)]
    if fixed_length:
        cmd.append("--fixed-length")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    if proc.returncode != 0:
        return {"method": "imitation", "env": env, "seed": seed, "labels": labels, "steps": steps,
                "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(method="imitation PreferenceComparisons", algo="ppo (SB3)")
    return result


def run(out_dir: str | Path, envs: Sequence[str] = ("Hopper-v5", "HalfCheetah-v5"),
        label_counts: Sequence[int] = (350, 700, 1400), seeds: Sequence[int] = (0, 1, 2), steps: int = 1_000_000,
        algo: str | None = None, eval_episodes: int = 10, peer: bool = True, peer_labels: int = 700) -> dict[str, Any]:
    """Run the benchmark and write prefs.json, prefs.md and the plot under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = out_dir / "runs"
    rows: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")

    def save() -> None:
        report = {"started": started, "machine": f"{platform.machine()}, {_cpus()} CPU cores, no GPU",
                  "steps": steps, "seeds": list(seeds), "label_counts": list(label_counts), "rows": rows}
        atomic_write_text(out_dir / "prefs.json", json.dumps(report, indent=2, default=str))
        atomic_write_text(out_dir / "prefs.md", markdown_table(rows))

    for env in envs:
        for seed in seeds:
            rows.append(run_true_reward(env, steps, seed, algo, eval_episodes))
            save()
            for n in label_counts:
                rows.append(run_palate(env, n, steps, seed, algo, eval_episodes, runs_dir))
                save()
            if peer:
                v4 = env.replace("-v5", "-v4")
                rows.append(run_palate(v4, peer_labels, steps, seed, "ppo", eval_episodes, runs_dir))
                save()
                rows.append(run_imitation(v4, peer_labels, steps, seed, eval_episodes))
                save()
    plot_return_vs_labels(rows, out_dir / "prefs_return_vs_labels.png")
    save()
    return {"rows": rows, "table": str(out_dir / "prefs.md")}


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _group(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if "eval_true_return_mean" not in r:
            continue
        key = (r["env"], r["method"], str(r.get("algo", "")), int(r.get("labels", 0)))
        groups.setdefault(key, []).append(r)
    return groups


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per (env, method, labels): mean +- std over seeds of the true return, and % of the true-reward run."""
    groups = _group(rows)
    ceiling = {k[0]: np.mean([r["eval_true_return_mean"] for r in v]) for k, v in groups.items()
               if k[1] == "true reward"}
    lines = ["| env | method | algo | labels | steps | seeds | true return (mean +- std) | % of true-reward | wall time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (env, method, algo, labels), group in sorted(groups.items()):
        rets = [r["eval_true_return_mean"] for r in group]
        pct = f"{100 * np.mean(rets) / ceiling[env]:.0f}%" if env in ceiling and ceiling[env] > 0 else "-"
        lines.append(f"| {env} | {method} | {algo} | {labels or '-'} | {group[0]['steps']} | {len(group)} | "
                     f"{np.mean(rets):.0f} +- {np.std(rets):.0f} | {pct} | "
                     f"{np.mean([r['wall_time_s'] for r in group]):.0f} |")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        lines.append(f"\n{r['method']} on {r['env']} (seed {r['seed']}) failed: {r['error']}")
    return "\n".join(lines) + "\n"


def plot_return_vs_labels(rows: list[dict[str, Any]], path: Path) -> None:
    """True return against the number of labels, one line per env, the true-reward run dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(rows)
    envs = sorted({k[0] for k in groups if k[1] == "palate prefs"})
    if not envs:
        return
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        pts = sorted((k[3], [r["eval_true_return_mean"] for r in v]) for k, v in groups.items()
                     if k[0] == env and k[1] == "palate prefs")
        xs = [p[0] for p in pts]
        ax.errorbar(xs, [np.mean(p[1]) for p in pts], yerr=[np.std(p[1]) for p in pts], marker="o", label="palate")
        for k, v in groups.items():
            if k[0] == env and k[1].startswith("imitation"):
                ax.errorbar([k[3]], [np.mean([r["eval_true_return_mean"] for r in v])],
                            yerr=[np.std([r["eval_true_return_mean"] for r in v])], marker="s", ls="", label="imitation")
            if k[0] == env and k[1] == "true reward":
                ax.axhline(np.mean([r["eval_true_return_mean"] for r in v]), ls="--", c="k", label="true reward")
        ax.set_xscale("log")
        ax.set_xlabel("synthetic labels")
        ax.set_ylabel("true episodic return")
        ax.set_title(env)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_rows(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Rows from result files: a ``prefs.json`` report (its ``rows``) or one row per JSON file.

    A 1M-step grid is hours of CPU per row, so rows are often run as separate processes, on
    several machines or over several days; this gathers them into one table and plot.
    """
    rows: list[dict[str, Any]] = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{p}: not a readable JSON result file ({exc}); pass prefs.json or row files") from exc
        found = data.get("rows", [data]) if isinstance(data, dict) else data
        for r in found:
            if not isinstance(r, dict) or "env" not in r or "method" not in r:
                raise ValueError(f"{p}: a row needs 'env' and 'method' (as run_palate/run_true_reward write them)")
            rows.append(r)
    return rows


def report(paths: Sequence[str | Path], out_dir: str | Path) -> str:
    """Write ``prefs.md`` and ``prefs_return_vs_labels.png`` for the rows of ``paths``; returns the table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = load_rows(paths)
    table = markdown_table(rows)
    atomic_write_text(out_dir / "prefs.md", table)
    plot_return_vs_labels(rows, out_dir / "prefs_return_vs_labels.png")
    return table


def main(argv: list[str] | None = None) -> int:
    """``python -m palate.bench.prefs --steps 100000 --seeds 0 --envs Hopper-v5``: a scaled-down run."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench-results/prefs")
    parser.add_argument("--envs", default="Hopper-v5,HalfCheetah-v5")
    parser.add_argument("--labels", default="350,700,1400")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=float, default=1e6)
    parser.add_argument("--algo", choices=["ppo", "trpo"], default=None, help="default: each YAML's algo")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--no-peer", action="store_true", help="skip imitation")
    parser.add_argument("--report", nargs="+", metavar="JSON", default=None,
                        help="run nothing: gather rows from these result files into --out's table and plot")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report, args.out))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = run(args.out, envs=args.envs.split(","), label_counts=[int(x) for x in args.labels.split(",")],
              seeds=[int(x) for x in args.seeds.split(",")], steps=int(args.steps), algo=args.algo,
              eval_episodes=args.eval_episodes, peer=not args.no_peer)
    print(Path(out["table"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
