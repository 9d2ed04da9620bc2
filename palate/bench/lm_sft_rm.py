"""Benchmark: palate SFT and reward model vs TRL's ``SFTTrainer`` and ``RewardTrainer``.

Same model (SmolLM2-135M-Instruct, the shipped GGUF converted to float32), same data, same batch,
one epoch each by default (``--epochs``), every arm in its own process so peak RSS is its own:

1. Data (palate, not timed against anything): ``sentiment`` prompts, K = 4 samples per prompt from
   the base model, ranked by the panel (one training labeller per training prompt; every labeller,
   the held-out one included, on validation prompts). Demonstrations for SFT are the completions
   ranked first in the training rankings (best-of-4 by one labeller).
2. SFT: palate ``train_sft`` vs TRL ``SFTTrainer`` (prompt-completion data, loss on completions).
3. RM: palate ``train_reward_model`` on the K = 4 rankings (InstructGPT: all 6 pairs of a prompt
   in one batch element, 4 forward passes) vs TRL ``RewardTrainer`` on the same rankings expanded
   into their pairs (TRL's format: 2 forward passes per pair). Batch = 8 comparisons for both
   (8 rankings for palate, 8 pairs for TRL). palate trains one epoch; TRL gets the same wall-clock
   time (a full epoch over the pairs would take it several times longer; its extrapolated epoch
   time is reported). Held-out accuracy is measured on the same validation pairs for both;
   palate's with its own evaluation, TRL's with ``trainer.evaluate``.

Both libraries run with the same settings where they have one: no gradient checkpointing (TRL
turns it on by default; palate does not), float32 on the CPU, bf16 autocast over float32 weights
on a GPU (``--device cuda``), where every arm trains the same number of epochs and the peak GPU
memory is read too. ``--model`` takes another model directory of the same kind, e.g. SmolLM2-135M's
architecture with random weights on a machine that cannot hold the real file (throughput does not
depend on the weights' values; accuracy does, and is then meaningless).

TRL is not a palate dependency: it is installed with ``pip install --no-deps --target
bench-venvs/trl trl==1.16.0`` (its dependencies are palate's own) and put on ``PYTHONPATH`` for
the TRL arms only (``--trl-path`` for another place). ``python -m palate.bench lm-sft-rm`` runs
everything (about half an hour on two CPU cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from palate.lm.training import peak_gpu_mb, peak_rss_mb
from palate.runs import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
TRL_PATH = ROOT / "bench-venvs" / "trl"
MODEL = "smollm2-135m-instruct"
# Run options shared by the driver and the arm processes it launches (set from the command line).
OPTS: dict[str, Any] = {"device": "cpu", "model": MODEL, "epochs": 1, "trl_path": str(TRL_PATH)}
THREADS = int(os.environ.get("PALATE_BENCH_THREADS", "1"))
SETTINGS = {
    "train_prompts": 128, "k": 4, "batch_size": 8, "max_length": 128,
    "sft_lr": 2e-5, "rm_lr": 3e-5, "seed": 0,
}


def _gpu() -> bool:
    return OPTS["device"] != "cpu"


def _pairs(path: Path) -> list[dict[str, str]]:
    """Every strictly ordered pair of every ranking, as TRL's {prompt, chosen, rejected}."""
    from palate.data.formats import read_comparisons

    out = []
    for c in read_comparisons(path):
        for i, j in itertools.combinations(range(len(c.completions)), 2):
            if c.ranks[i] == c.ranks[j]:
                continue
            w, lo = (i, j) if c.ranks[i] < c.ranks[j] else (j, i)
            out.append({"prompt": c.prompt, "chosen": c.completions[w], "rejected": c.completions[lo],
                        "labeller": c.labeller or ""})
    return out


def _count_tokens(work: Path, kind: str) -> int:
    """Real tokens one epoch processes, counted with palate's encoding (the same text for both)."""
    from palate.data.formats import read_comparisons, read_sft
    from palate.lm.formatting import encode_prompt_completion
    from palate.lm.models import load_tokenizer

    tok = load_tokenizer(OPTS["model"])
    L = SETTINGS["max_length"]
    if kind == "sft":
        return sum(len(encode_prompt_completion(tok, e.prompt, e.completion, False, L)["input_ids"])
                   for e in read_sft(work / "demos.jsonl"))
    if kind == "rm-palate":
        return sum(len(encode_prompt_completion(tok, c.prompt, y, False, L)["input_ids"])
                   for c in read_comparisons(work / "train.jsonl") for y in c.completions)
    return sum(len(encode_prompt_completion(tok, p["prompt"], p[k], False, L)["input_ids"])
               for p in _pairs(work / "train.jsonl") for k in ("chosen", "rejected"))


# --------------------------------------------------------------------------- arms (one process each)


def arm_data(work: Path) -> dict[str, Any]:
    from palate.data.formats import SFTExample, read_comparisons, write_sft
    from palate.lm.demos import LabelConfig, label_comparisons

    start = time.perf_counter()
    label_comparisons(LabelConfig(model=MODEL, task="sentiment", split="train", limit=SETTINGS["train_prompts"],
                                  k=SETTINGS["k"], labellers="train", out=str(work / "train.jsonl"),
                                  seed=SETTINGS["seed"]))
    label_comparisons(LabelConfig(model=MODEL, task="sentiment", split="validation", k=SETTINGS["k"],
                                  labellers="all", out=str(work / "val.jsonl"), seed=SETTINGS["seed"] + 1))
    demos = [SFTExample(c.prompt, c.completions[c.ranks.index(min(c.ranks))])
             for c in read_comparisons(work / "train.jsonl")]
    write_sft(work / "demos.jsonl", [d for d in demos if d.completion.strip()])
    for name, pairs in (("train_pairs", _pairs(work / "train.jsonl")), ("val_pairs", _pairs(work / "val.jsonl"))):
        atomic_write_text(work / f"{name}.jsonl", "".join(json.dumps(p) + "\n" for p in pairs))
    return {"seconds": round(time.perf_counter() - start, 1)}


def arm_palate_sft(work: Path) -> dict[str, Any]:
    from palate.lm.sft import SFTConfig, train_sft

    run = train_sft(SFTConfig(model=OPTS["model"], train_data=str(work / "demos.jsonl"), val_fraction=0.0,
                              chat=False, epochs=float(OPTS["epochs"]), batch_size=SETTINGS["batch_size"],
                              max_length=SETTINGS["max_length"], lr=SETTINGS["sft_lr"], eval_every=10**6,
                              runs_dir=str(work / "runs"), run_name="palate-sft", overwrite=True,
                              seed=SETTINGS["seed"], tensorboard=False, cpu=not _gpu(),
                              mixed_precision="bf16" if _gpu() else "no", gradient_checkpointing=False))
    summary = json.loads((run / "summary.json").read_text())
    return {"train_seconds": summary["train_seconds"], "steps": summary["steps"], "tokens": summary.get("tokens"),
            "final_loss": summary["final_train_loss"], "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb()}


def arm_trl_sft(work: Path) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from palate.data.formats import read_sft
    from palate.lm.models import load_model

    model, tok = load_model(OPTS["model"], device=OPTS["device"])
    tok.padding_side = "right"
    data = Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in read_sft(work / "demos.jsonl")])
    args = SFTConfig(output_dir=str(work / "runs" / "trl-sft"), per_device_train_batch_size=SETTINGS["batch_size"],
                     num_train_epochs=OPTS["epochs"], max_length=SETTINGS["max_length"],
                     learning_rate=SETTINGS["sft_lr"], lr_scheduler_type="cosine", warmup_steps=0.05,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=not _gpu(),
                     dataloader_num_workers=0, seed=SETTINGS["seed"], completion_only_loss=True, packing=False,
                     bf16=_gpu(), gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    start = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - start
    logs = trainer.state.log_history
    return {"train_seconds": round(seconds, 2), "steps": out.global_step, "final_loss":
            [h["loss"] for h in logs if "loss" in h][-1], "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(),
            "tokens": max((h.get("num_tokens", 0) for h in logs), default=None)}


def arm_palate_rm(work: Path) -> dict[str, Any]:
    from palate.lm.reward import RMConfig, train_reward_model

    run = train_reward_model(RMConfig(
        model=OPTS["model"], train_data=str(work / "train.jsonl"), val_data=str(work / "val.jsonl"),
        task="sentiment", epochs=float(OPTS["epochs"]), batch_size=SETTINGS["batch_size"],
        max_length=SETTINGS["max_length"], lr=SETTINGS["rm_lr"], eval_every=10**6, runs_dir=str(work / "runs"),
        run_name="palate-rm", overwrite=True, seed=SETTINGS["seed"], tensorboard=False, cpu=not _gpu(),
        mixed_precision="bf16" if _gpu() else "no", gradient_checkpointing=False))
    s = json.loads((run / "summary.json").read_text())
    return {"train_seconds": s["train_seconds"], "steps": s["steps"], "tokens": s.get("tokens"),
            "val_accuracy": s.get("rm/val_accuracy"),
            "held_out_accuracy": s.get("rm/held_out_accuracy"), "val_ece": s.get("rm/val_ece"),
            "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb()}


def arm_trl_rm(work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from palate.lm.models import load_tokenizer, resolve_model_path

    torch.manual_seed(SETTINGS["seed"])
    tok = load_tokenizer(OPTS["model"])
    tok.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(str(resolve_model_path(OPTS["model"])), num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.to(OPTS["device"])

    def load(name: str, labeller: str | None = None) -> Dataset:
        rows = [json.loads(x) for x in (work / f"{name}.jsonl").read_text().splitlines()]
        rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows
                if labeller is None or r["labeller"] == labeller]
        return Dataset.from_list(rows)

    args = RewardConfig(output_dir=str(work / "runs" / "trl-rm"), per_device_train_batch_size=SETTINGS["batch_size"],
                        per_device_eval_batch_size=16, num_train_epochs=OPTS["epochs"],
                        max_length=SETTINGS["max_length"], learning_rate=SETTINGS["rm_lr"],
                        lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=10, save_strategy="no",
                        report_to="none", use_cpu=not _gpu(), dataloader_num_workers=0, seed=SETTINGS["seed"],
                        bf16=_gpu(), gradient_checkpointing=False)
    # Equal wall-clock budget on the CPU: one epoch over the expanded pairs costs TRL several times
    # palate's time (2 forward passes per pair instead of K per ranking), more than a CPU run can
    # afford, so TRL trains for as long as palate's reward model took and its accuracy is read
    # there. On a GPU both train every epoch.
    budget = json.loads((work / "palate-rm.json").read_text())["train_seconds"] if not _gpu() else float("inf")

    class WallClockBudget(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if time.perf_counter() - start >= budget:
                control.should_training_stop = True
            return control

    train_pairs = load("train_pairs")
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_pairs, processing_class=tok,
                            callbacks=[WallClockBudget()])
    epoch_steps = len(trainer.get_train_dataloader())
    start = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - start
    tokens = max((h.get("num_tokens", 0) for h in trainer.state.log_history), default=None)
    val, held = _trl_pair_accuracy(trainer.model, tok, work)
    return {"train_seconds": round(seconds, 2), "steps": out.global_step, "tokens": tokens,
            "epoch_steps": epoch_steps, "budget_seconds": budget,
            "epoch_seconds_extrapolated": round(seconds / max(out.global_step, 1) * epoch_steps, 1),
            "val_accuracy": val, "held_out_accuracy": held, "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": peak_gpu_mb()}


def _trl_pair_accuracy(model: Any, tok: Any, work: Path) -> tuple[float, float]:
    """Pair accuracy of a TRL reward model on the validation pairs (all, and the held-out labeller's).

    Each distinct text is scored once, encoded as TRL encodes it (prompt + completion + EOS); the
    pairs are the same as palate's validation pairs. ``trainer.evaluate`` would give the same
    accuracy but runs two forward passes per pair, 15 times the work on this validation set.
    """
    import torch

    pairs = [json.loads(x) for x in (work / "val_pairs.jsonl").read_text().splitlines()]
    texts = sorted({p["prompt"] + p[k] + tok.eos_token for p in pairs for k in ("chosen", "rejected")})
    scores: dict[str, float] = {}
    model.eval()
    for start in range(0, len(texts), 16):
        chunk = texts[start:start + 16]
        enc = tok(chunk, return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.squeeze(-1)
        scores.update(zip(chunk, out.tolist()))

    def accuracy(rows: list[dict[str, str]]) -> float:
        right = [scores[r["prompt"] + r["chosen"] + tok.eos_token] > scores[r["prompt"] + r["rejected"] + tok.eos_token]
                 for r in rows]
        return round(sum(right) / max(len(right), 1), 4)

    return accuracy(pairs), accuracy([p for p in pairs if p["labeller"] == "held_out"])


ARMS = {"data": arm_data, "palate-sft": arm_palate_sft, "trl-sft": arm_trl_sft,
        "palate-rm": arm_palate_rm, "trl-rm": arm_trl_rm}


def _launch(arm: str, work: Path) -> dict[str, Any]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # Same thread count for every arm. On a shared machine, more OpenMP threads than free cores
    # spin against each other (we saw a 10x slowdown with 2 threads under a load average of 8).
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(THREADS)
    if arm.startswith("trl"):
        trl_path = Path(OPTS["trl_path"])
        if not (trl_path / "trl").is_dir():
            raise RuntimeError(f"TRL is not installed for the benchmark; run: pip install --no-deps --target "
                               f"{trl_path} trl==1.16.0")
        env["PYTHONPATH"] = os.pathsep.join([str(trl_path), str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "palate.bench.lm_sft_rm", "--arm", arm, "--work", str(work),
           "--device", OPTS["device"], "--model", OPTS["model"], "--epochs", str(OPTS["epochs"]),
           "--batch-size", str(SETTINGS["batch_size"])]
    print(f"[lm-sft-rm] {arm} ...", flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    return json.loads((work / f"{arm}.json").read_text())


def run(out_dir: str | Path, reuse: bool | None = None) -> dict[str, Any]:
    """Run every arm once and write ``results.json`` and ``table.md`` under ``out_dir``.

    ``reuse`` (or ``PALATE_BENCH_REUSE=1``) keeps arms whose result file already exists, to
    rebuild the table without re-training.
    """
    if reuse is None:
        reuse = os.environ.get("PALATE_BENCH_REUSE") == "1"
    out = Path(out_dir)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"settings": SETTINGS, "model": OPTS["model"], "device": OPTS["device"],
                               "epochs": OPTS["epochs"], "gradient_checkpointing": False,
                               "precision": "bf16 autocast" if _gpu() else "float32", "torch_threads": THREADS,
                               "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    for arm in ARMS:
        if arm == "data" and (work / "val_pairs.jsonl").is_file():
            results[arm] = {"reused": True}
            continue
        if reuse and (work / f"{arm}.json").is_file():
            results[arm] = json.loads((work / f"{arm}.json").read_text())
            continue
        results[arm] = _launch(arm, work)
    tokens = {"sft": _count_tokens(work, "sft"), "rm-palate": _count_tokens(work, "rm-palate"),
              "rm-trl": _count_tokens(work, "rm-trl")}
    n_pairs = sum(1 for _ in (work / "train_pairs.jsonl").open())
    for arm in ("palate-sft", "palate-rm"):
        # train_seconds of a palate run includes its end-of-run validation; the training loop's
        # own time (what TRL's train() time measures) is in its summary.
        s = json.loads((work / "runs" / arm / "summary.json").read_text())
        loop_seconds = s.get("train_loop_seconds") or round(s["tokens"] / s["tokens_per_s"], 2)
        results[arm]["train_seconds_incl_validation"] = results[arm]["train_seconds"]
        results[arm]["train_seconds"] = loop_seconds
    for arm, key in (("palate-sft", "sft"), ("trl-sft", "sft"), ("palate-rm", "rm-palate"), ("trl-rm", "rm-trl")):
        r = results[arm]
        # Each trainer counts the real (non-padding) tokens it processed; the harness's count of
        # one epoch with palate's encoding is kept beside it as a cross-check.
        r["epoch_tokens_counted_by_harness"] = tokens[key]
        r["tokens"] = r.get("tokens") or tokens[key] * OPTS["epochs"]
        r["tokens_per_s"] = round(r["tokens"] / r["train_seconds"], 1)
        if arm == "palate-rm":  # every pair of every ranking, once per epoch
            r["pairs_per_s"] = round(n_pairs * OPTS["epochs"] / r["train_seconds"], 2)
        elif arm == "trl-rm":
            r["pairs_per_s"] = round(r["steps"] * SETTINGS["batch_size"] / r["train_seconds"], 2)
    results["speedup_sft"] = round(results["trl-sft"]["train_seconds"] / results["palate-sft"]["train_seconds"], 2)
    # TRL's reward model ran on a time budget (CPU), so compare the time of one epoch over the same data.
    results["speedup_rm_epoch"] = round(results["trl-rm"]["epoch_seconds_extrapolated"]
                                        / (results["palate-rm"]["train_seconds"] / OPTS["epochs"]), 2)
    results["speedup_rm_tokens_per_s"] = round(results["palate-rm"]["tokens_per_s"]
                                               / results["trl-rm"]["tokens_per_s"], 2)
    results["load_average_at_end"] = os.getloadavg()
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    rows = ["| arm | steps | train s | tokens/s | pairs/s | peak RSS MiB | peak GPU MiB | val acc | held-out acc |",
            "|---|---|---|---|---|---|---|---|---|"]
    for arm in ("palate-sft", "trl-sft", "palate-rm", "trl-rm"):
        r = results[arm]
        rows.append(f"| {arm} | {r['steps']} | {r['train_seconds']} | {r['tokens_per_s']} | {r.get('pairs_per_s', '')} "
                    f"| {r['peak_rss_mb']} | {r.get('peak_gpu_mb') or ''} | {r.get('val_accuracy', '')} "
                    f"| {r.get('held_out_accuracy', '')} |")
    rows.append(f"\nspeed-ups: SFT {results['speedup_sft']}x, RM epoch {results['speedup_rm_epoch']}x, "
                f"RM tokens/s {results['speedup_rm_tokens_per_s']}x ({results['device']}, {results['precision']})")
    atomic_write_text(out / "table.md", "\n".join(rows) + "\n")
    print("\n".join(rows))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", choices=list(ARMS))
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", default="bench-results/lm-sft-rm")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: bf16 autocast, every arm trains all epochs")
    parser.add_argument("--model", default=MODEL, help="model alias or directory (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every arm (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=SETTINGS["batch_size"],
                        help="SFT demonstrations, RM rankings (palate) and RM pairs (TRL) per step (default: %(default)s)")
    parser.add_argument("--trl-path", default=str(TRL_PATH), help="directory holding the trl package")
    args = parser.parse_args()
    SETTINGS["batch_size"] = args.batch_size
    OPTS.update(device=args.device, model=args.model, epochs=args.epochs, trl_path=args.trl_path)
    if args.arm:
        result = ARMS[args.arm](args.work)
        atomic_write_text(args.work / f"{args.arm}.json", json.dumps(result, indent=2) + "\n")
    else:
        run(args.out)


if __name__ == "__main__":
    main()
