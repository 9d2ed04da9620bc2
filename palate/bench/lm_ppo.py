"""PPO for language models, palate vs TRL: ``python -m palate.bench lm-ppo`` (part of ``make bench``).

All arms start from the same SFT policy, score with the same reward model, see the same prompts
(the ``sentiment`` task's train split), generate the same number of completions per iteration
with the same completion length and temperature (1), and use the same minibatch, epochs, learning
rate and KL coefficient, training the same weights (``trainable_layers``: the last blocks of the
policy, and of the value model where there is one). The default budget is the ``make run``
preset's PPO stage (configs/lm/pipeline-sentiment.yaml: 24 iterations x 16 completions of 24
tokens, minibatch 8, 4 epochs, lr 2e-4, fixed beta 0.2, the last 6 blocks). Each arm runs in its
own process so its peak memory (max RSS) is its own. Afterwards every final policy is evaluated
the same way by :func:`palate.lm.evaluate.evaluate_models`: reward-model score and KL to the SFT
model on the test prompts, and the held-out labeller's win rate against SFT (by default the
pipeline's 38 test prompts x 4 samples = 152 comparisons).

Arms (``--arms``):

* ``palate``: :mod:`palate.lm.ppo`, one completion per prompt, ``batch_size`` prompts, its value
  model started from the reward model, as the pipeline's PPO stage.
* ``trl-ppo``: TRL 1.12.0's ``trl.experimental.ppo.PPOTrainer`` (TRL removed PPO in 1.13); the RM
  reaches it as a ``LlamaForSequenceClassification`` (:func:`export_reward_model_for_trl`), which
  reads one head at the last token. A reward model that mean-pools its features over the
  completion or averages several heads (the ``make run`` RM: 5 heads on block 20, mean-pooled)
  has no such form: the arm is then skipped and the table says why
  (:func:`trl_ppo_blocker`). It runs on a last-token, one-head RM (``palate lm rm`` without
  ``features_layer``).
* ``trl-rloo``: current TRL's (1.16.0) ``RLOOTrainer``. RLOO needs k >= 2 completions per prompt,
  so it sees ``batch_size / rloo_k`` prompts x ``rloo_k`` completions: the same number of
  completions per iteration. It has no value model; its reward is palate's RM called as a reward
  function (see :func:`arm_trl_rloo` for why).
* ``trl-grpo``: TRL 1.16.0's ``GRPOTrainer`` through the same reward function, ``batch_size /
  grpo_k`` prompts x ``grpo_k`` completions, TRL's default loss (``dapo``) and group-scaled
  rewards; its KL term is TRL's per-token k3 estimate in the loss with coefficient ``kl_coef``
  (RLOO and the PPO arms subtract the sequence's log-ratio from the reward instead).

The budget is set by flags (``--iterations``, ``--batch-size``, ``--mini-batch-size``,
``--ppo-epochs``, ``--learning-rate``, ``--kl-coef``, ``--eval-prompts``...; defaults in
``SETTINGS``), passed to every arm's process and recorded in ``lm_ppo.json`` / ``lm_ppo.md``
with the commit, the machine and the load average before and after each arm.

The peers are not palate dependencies. Each TRL is installed without dependencies into its own
directory, which shares palate's torch/transformers/accelerate (so pip never pulls another torch)
and goes on ``PYTHONPATH`` only in its own arm's process::

    .venv/bin/pip install --no-deps --target bench-venvs/trl-1.12 trl==1.12.0
    .venv/bin/pip install --no-deps --target bench-venvs/trl trl==1.16.0
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from palate.bench.lm_ppo_trl import (  # noqa: F401  (trl_ppo_blocker, export_...: importable from here too)
    arm_trl_grpo,
    arm_trl_ppo,
    arm_trl_rloo,
    export_reward_model_for_trl,
    trl_ppo_blocker,
)
from palate.runs import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]

# Where each TRL arm's TRL lives (``pip install --no-deps --target``) and the version it must be.
TRL_INSTALLS: dict[str, tuple[Path, str]] = {
    "trl-ppo": (ROOT / "bench-venvs" / "trl-1.12", "1.12.0"),
    "trl-rloo": (ROOT / "bench-venvs" / "trl", "1.16.0"),
    "trl-grpo": (ROOT / "bench-venvs" / "trl", "1.16.0"),
}
ARMS = ("palate", "trl-ppo", "trl-rloo", "trl-grpo")

# The default budget: the `make run` preset's PPO stage (configs/lm/pipeline-sentiment.yaml) and its
# evaluation (38 test prompts x 4 samples); every entry is also a flag (``--iterations 3``...).
SETTINGS: dict[str, Any] = {
    "iterations": 24,           # rollout batches
    "batch_size": 16,           # completions per rollout batch (palate, trl-ppo: one per prompt)
    "mini_batch_size": 8,       # completions per optimiser step
    "ppo_epochs": 4,
    "max_new_tokens": 24,
    "learning_rate": 2e-4,
    "kl_coef": 0.2,
    "trainable_layers": 6,      # every arm trains the last 6 blocks of policy (and value) (CPU budget)
    "value_trainable_layers": -1,  # palate: its value model's trained blocks (-1: as trainable_layers)
    "eval_prompts": 38,         # test prompts for the common evaluation
    "eval_samples": 4,          # samples per test prompt and model (38 x 4 = 152 comparisons)
    "seed": 0,
    "rloo_k": 2,                # trl-rloo: completions per prompt (batch_size / rloo_k prompts per batch)
    "grpo_k": 4,                # trl-grpo: completions per prompt (batch_size / grpo_k prompts per batch)
}
_FLAG_HELP = {
    "iterations": "rollout batches (generate, score, update)",
    "batch_size": "completions generated per rollout batch (trl-rloo/grpo: batch_size / k prompts x k)",
    "mini_batch_size": "completions per optimiser step",
    "ppo_epochs": "passes over each rollout batch (trl-rloo/grpo: num_iterations, mu)",
    "max_new_tokens": "completion length limit",
    "learning_rate": "AdamW learning rate, constant",
    "kl_coef": "fixed KL coefficient beta",
    "trainable_layers": "train only the last N blocks of policy (and value); 0: all",
    "value_trainable_layers": "palate: the value model's trained blocks (-1: as --trainable-layers; 0: its head "
                              "alone, on frozen features)",
    "eval_prompts": "test prompts in the common evaluation",
    "eval_samples": "samples per test prompt and model in the common evaluation",
    "seed": "seed of every arm",
    "rloo_k": "trl-rloo: completions per prompt",
    "grpo_k": "trl-grpo: completions per prompt",
}
# The arms that sample k completions per prompt, and the setting that holds their k.
GROUP_K = {"trl-rloo": "rloo_k", "trl-grpo": "grpo_k"}


def check_settings(settings: dict[str, Any], arms: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the flag if the budget cannot be run by these arms."""
    s = settings
    for key in ("iterations", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "eval_prompts",
                "eval_samples"):
        if s[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    if s["batch_size"] % s["mini_batch_size"]:
        raise ValueError(f"--batch-size ({s['batch_size']}) must be a multiple of --mini-batch-size "
                         f"({s['mini_batch_size']})")
    for arm, key in GROUP_K.items():
        if arm not in arms:
            continue
        if s[key] < 2:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 2 ({arm} compares completions of one prompt), "
                             f"got {s[key]}")
        if s["batch_size"] % s[key]:
            raise ValueError(f"{arm} samples {s[key]} completions per prompt: --batch-size ({s['batch_size']}) "
                             f"must be a multiple of --{key.replace('_', '-')} ({s[key]})")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------- arms


def arm_palate(work: Path, sft: str, rm_dir: str, s: dict[str, Any]) -> dict[str, Any]:
    from palate.lm.ppo import LMPPOConfig, read_metrics
    from palate.lm.ppo_build import build_trainer
    from palate.runs import prepare_run_dir

    cfg = LMPPOConfig(policy=sft, reference=sft, reward_model=rm_dir, task="sentiment", iterations=s["iterations"],
                      batch_size=s["batch_size"], mini_batch_size=s["mini_batch_size"], ppo_epochs=s["ppo_epochs"],
                      max_new_tokens=s["max_new_tokens"], learning_rate=s["learning_rate"], kl_coef=s["kl_coef"],
                      adaptive_kl=False, forward_batch_size=s["batch_size"], device="cpu", seed=s["seed"],
                      trainable_layers=s["trainable_layers"],
                      value_trainable_layers=None if s.get("value_trainable_layers", -1) < 0 else s["value_trainable_layers"],
                      runs_dir=str(work), run_name="palate", save_every=10**6, whiten_advantages=True)
    run_dir = prepare_run_dir(cfg.run_dir, {"bench": "lm-ppo"}, overwrite=True)
    trainer = build_trainer(cfg)
    start = time.perf_counter()
    trainer.train(run_dir)
    wall = time.perf_counter() - start
    metrics = read_metrics(run_dir)
    tokens = sum(m["response/length"] * s["batch_size"] for m in metrics)
    return {"train_wall_s": wall, "generated_tokens": tokens, "model": str(run_dir / "model"),
            "final_train_reward": metrics[-1]["objective/reward"], "final_train_kl": metrics[-1]["objective/kl"]}




ARM_FUNCS: dict[str, Callable[[Path, str, str, dict[str, Any]], dict[str, Any]]] = {
    "palate": arm_palate, "trl-ppo": arm_trl_ppo, "trl-rloo": arm_trl_rloo, "trl-grpo": arm_trl_grpo}


def evaluate_arm(model_dir: str, sft: str, rm_dir: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The common evaluation: RM score, KL to SFT and held-out win rate on test prompts."""
    from palate.data.tasks import load_task
    from palate.lm.evaluate import evaluate_models
    from palate.lm.formatting import encode_prompt_completion
    from palate.lm.models import load_model
    from palate.lm.reward_model import RewardModel

    s = settings or SETTINGS
    task = load_task("sentiment")
    policy, tok = load_model(model_dir)
    reference, _ = load_model(sft)
    rm = RewardModel.from_pretrained(rm_dir)
    prompts = task.prompts("test")[: s["eval_prompts"]]
    metrics, _ = evaluate_models(
        policy, reference, tok, prompts,
        lambda p: encode_prompt_completion(tok, p, "", task.chat, 128, add_eos=False)["input_ids"],
        task.panel.held_out, lambda p, c: rm.score_texts(list(p), list(c), tok, batch_size=16).tolist(),
        max_new_tokens=s["max_new_tokens"], samples_per_prompt=s["eval_samples"], batch_size=38, seed=99)
    keep = ("reward", "reward_reference", "kl", "kl_stderr", "win_rate", "win_rate_stderr", "n_comparisons",
            "judge_score", "judge_score_reference", "policy/length_tokens", "policy/eos_frac", "policy/distinct_2",
            "reference/length_tokens")
    return {k: metrics[k] for k in keep if k in metrics}


def _utc() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _child(arm: str, work: Path, sft: str, rm_dir: str, threads: int, settings: dict[str, Any]) -> int:
    import torch

    torch.set_num_threads(threads)
    started, commit = _utc(), _commit()  # the commit whose code this process runs
    result = ARM_FUNCS[arm](work, sft, rm_dir, settings)
    result["peak_rss_mb"] = _peak_rss_mb()  # training's peak: the evaluation below loads SFT and RM again
    if arm in TRL_INSTALLS:
        import trl

        result["trl_version"] = trl.__version__
    start = time.perf_counter()
    result["eval"] = evaluate_arm(result["model"], sft, rm_dir, settings)
    result.update(eval_wall_s=time.perf_counter() - start, started_utc=started, finished_utc=_utc(),
                  settings=settings, sft=sft, reward_model=rm_dir, threads=threads, commit=commit)
    atomic_write_text(work / f"{arm}.json", json.dumps(result, indent=2))
    return 0


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (uncommitted changes)" if dirty else "")


def _machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}"


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _settings_flags(settings: dict[str, Any]) -> list[str]:
    return [x for k in _FLAG_HELP for x in (f"--{k.replace('_', '-')}", repr(settings[k]))]


def run(out_dir: str | Path, sft: str | None = None, rm_dir: str | None = None, arms: tuple[str, ...] = ARMS,
        threads: int = 1, parallel: bool = False, settings: dict[str, Any] | None = None,
        reuse: bool = False) -> dict[str, Any]:
    """Run each arm in its own process and write ``lm_ppo.md`` / ``lm_ppo.json`` under ``out_dir``.

    ``reuse``: an arm whose result file (``out_dir/ARM.json``) holds the same budget, SFT model and RM
    is read, not run again (to add an arm to a finished run, or finish one that was cut off).

    ``parallel`` runs the arms at the same time (one thread each): on a shared, busy machine that
    puts all under the same load, which sequential runs cannot promise.

    ``sft`` and ``rm_dir`` default to the models of the ``make run`` pipeline
    (``runs/sentiment-cpu/sft/model`` and ``runs/sentiment-cpu/rm/model``); ``settings`` (the
    budget) to ``SETTINGS``, entries given overriding it.
    """
    settings = {**SETTINGS, **(settings or {})}
    unknown = [a for a in arms if a not in ARM_FUNCS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {list(ARM_FUNCS)}")
    check_settings(settings, arms)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sft = sft or str(ROOT / "runs" / "sentiment-cpu" / "sft" / "model")
    rm_dir = rm_dir or str(ROOT / "runs" / "sentiment-cpu" / "rm" / "model")
    for path in (sft, rm_dir):
        if not Path(path).is_dir():
            raise RuntimeError(f"{path} does not exist; run `make run` (the pipeline) first, or pass --sft/--rm")
    results: dict[str, Any] = {"settings": settings, "sft": sft, "reward_model": rm_dir, "threads": threads,
                               "parallel": parallel, "date": _utc(), "commit": _commit(), "machine": _machine()}
    procs: dict[str, tuple[subprocess.Popen, float, float]] = {}
    load_after: dict[str, float] = {}
    ended: dict[str, float] = {}
    for arm in arms:
        previous = out / f"{arm}.json"
        if reuse and previous.is_file():
            kept = json.loads(previous.read_text())
            if kept.get("settings") == settings and kept.get("sft") == sft and kept.get("reward_model") == rm_dir:
                results[arm] = {**kept, "reused": True}
                continue
        env = dict(os.environ)
        if arm == "trl-ppo":
            blocker = trl_ppo_blocker(rm_dir)
            if blocker:
                results[arm] = {"skipped": blocker}
                continue
        if arm in TRL_INSTALLS:
            # Each TRL on the path of its own arm's process only: the two versions never meet.
            path, version = TRL_INSTALLS[arm]
            if not (path / "trl").is_dir():
                results[arm] = {"skipped": f"TRL {version} not installed; run: "
                                           f".venv/bin/pip install --no-deps --target {path} trl=={version}"}
                continue
            env["PYTHONPATH"] = os.pathsep.join(x for x in (str(path), env.get("PYTHONPATH")) if x)
        previous.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "palate.bench.lm_ppo", "--arm", arm, "--work", str(out), "--sft", sft,
               "--rm", rm_dir, "--threads", str(threads), *_settings_flags(settings)]
        procs[arm] = (subprocess.Popen(cmd, env=env, cwd=ROOT), time.perf_counter(), _load())
        if not parallel:  # one at a time: each arm has the machine to itself
            procs[arm][0].wait()
            load_after[arm], ended[arm] = _load(), time.perf_counter()
    for arm, (proc, start, load_before) in procs.items():
        code = proc.wait()
        end = ended.get(arm, time.perf_counter())
        load = {"load_before": load_before, "load_after": load_after.get(arm, _load())}
        if code != 0:
            results[arm] = {"failed": f"exit code {code}", **load}
            continue
        results[arm] = {**json.loads((out / f"{arm}.json").read_text()), **load,
                        "process_wall_s": end - start}
        atomic_write_text(out / f"{arm}.json", json.dumps(results[arm], indent=2))  # keeps the load for reuse
    lines = report_lines(results, arms)
    atomic_write_text(out / "lm_ppo.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "lm_ppo.json", json.dumps(results, indent=2, default=str))
    print("\n".join(lines))
    return results


def _span(r: dict[str, Any]) -> str:
    """``"01:31-01:45, "``: when an arm's process ran (from its result file), or nothing."""
    if not (r.get("started_utc") and r.get("finished_utc")):
        return ""
    return f"{r['started_utc'][11:16]}-{r['finished_utc'][11:16]}, "


def _value_note(s: dict[str, Any]) -> str:
    n = s.get("value_trainable_layers", -1)
    if n < 0 or n == s["trainable_layers"]:
        return ""
    return " (palate's value model: its head alone)" if n == 0 else f" (palate's value model: its last {n})"


def report_lines(results: dict[str, Any], arms: tuple[str, ...]) -> list[str]:
    """The Markdown table of a run's results, and the issue's two targets against every TRL arm."""
    s, threads = results["settings"], results["threads"]
    groups = ", ".join(f"{a}: {s['batch_size'] // s[k]} prompts x {s[k]}" for a, k in GROUP_K.items() if a in arms)
    lines = [f"Budget: {s['iterations']} iterations x {s['batch_size']} completions"
             f"{f' ({groups})' if groups else ''}, minibatch {s['mini_batch_size']}, "
             f"{s['ppo_epochs']} epochs, {s['max_new_tokens']} new tokens, lr {s['learning_rate']:g}, "
             f"KL coef {s['kl_coef']:g}, last {s['trainable_layers']} blocks trained{_value_note(s)}, seed {s['seed']}; "
             f"evaluation: {s['eval_prompts']} test prompts x {s['eval_samples']} samples; {threads} thread(s) "
             f"per arm{', arms in parallel' if results['parallel'] else ', one arm at a time'}. "
             f"Table written {results['date']}, commit {results['commit']}, {results['machine']}.", "",
             "| arm | train wall (s) | generated tokens/s | peak RSS (MB) | RM score, test (SFT) | KL to SFT (nats) | "
             "held-out win rate vs SFT | ran (UTC), 1-min load avg before/after |", "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        r = results.get(arm, {})
        if "eval" not in r:
            lines.append(f"| {arm} | {r.get('skipped') or r.get('failed')} | | | | | | |")
            continue
        e = r["eval"]
        note = " (upper bound)" if r.get("generated_tokens_note") else ""
        lines.append(f"| {arm} | {r['train_wall_s']:.0f} | {r['generated_tokens'] / r['train_wall_s']:.2f}{note} | "
                     f"{r['peak_rss_mb']:.0f} | {e['reward']:.3f} ({e['reward_reference']:.3f}) | "
                     f"{e['kl']:.2f} ± {e['kl_stderr']:.2f} | {e['win_rate']:.3f} ± {e['win_rate_stderr']:.3f} "
                     f"(n={e['n_comparisons']}) | {_span(r)}{r.get('load_before', '?')} / {r.get('load_after', '?')} |")
    ours = results.get("palate", {})
    if "eval" in ours:
        lines.append("")
        speed = ours["generated_tokens"] / ours["train_wall_s"]
        for arm in arms:
            r = results.get(arm, {})
            if arm == "palate" or "eval" not in r:
                continue
            ratio = speed / (r["generated_tokens"] / r["train_wall_s"])
            ahead = ours["eval"]["win_rate"] - r["eval"]["win_rate"]
            se = (ours["eval"]["win_rate_stderr"] ** 2 + r["eval"]["win_rate_stderr"] ** 2) ** 0.5
            lines.append(f"* vs {arm}: generated tokens/s {ratio:.2f}x (target >= 2x: "
                         f"{'met' if ratio >= 2 else 'not met'}); held-out win rate {ahead:+.3f} ± {se:.3f} "
                         f"(target higher: {'met' if ahead > 0 else 'not met'}"
                         f"{'' if abs(ahead) > 2 * se else ', within 2 standard errors'})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m palate.bench.lm_ppo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=list(ARM_FUNCS), help="run one arm (internal)")
    parser.add_argument("--work", default="bench-results/lm-ppo", help="directory for runs, tables and JSON")
    parser.add_argument("--sft", default=None, help="SFT policy (default: runs/sentiment-cpu/sft/model)")
    parser.add_argument("--rm", default=None, help="palate reward model (default: runs/sentiment-cpu/rm/model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--parallel", action="store_true", help="run the arms at the same time")
    parser.add_argument("--reuse", action="store_true",
                        help="read, not rerun, an arm whose result in --work has the same budget and models")
    for key, help_ in _FLAG_HELP.items():
        default = SETTINGS[key]
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=type(default), default=default,
                            help=f"{help_} (default {default})")
    args = parser.parse_args(argv)
    settings = {**SETTINGS, **{k: getattr(args, k) for k in _FLAG_HELP}}
    if args.arm:
        return _child(args.arm, Path(args.work), args.sft, args.rm, args.threads, settings)
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    try:
        run(args.work, args.sft, args.rm, arms, args.threads, args.parallel, settings, args.reuse)
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
