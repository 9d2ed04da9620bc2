"""Training the LM reward model on comparisons (Ziegler 2019, Ouyang 2022).

The model itself (backbone + scalar head, normalised scores) is :mod:`palate.lm.reward_model`.
Training uses the losses of :mod:`palate.core.preference`:

* rankings of K completions (InstructGPT): all C(K, 2) pairs of a prompt in one batch element,
  ``-1/C(K,2) E[log sigmoid(r(x, y_w) - r(x, y_l))]``, so the K forward passes are shared;
* best-of-K (Ziegler et al.): a softmax over the K rewards, cross-entropy against the choice;
* pairs (the TRL format): the K = 2 ranking, i.e. ``-log sigmoid(r_chosen - r_rejected)``.

After training the scores are normalised on reference samples (mean 0, standard deviation 1).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from palate.errors import ConfigError
from palate.lm.config import RMConfig
from palate.lm.formatting import encode_prompt_completion, pad_batch
from palate.lm.models import LoraSettings
from palate.lm.reward_model import RewardModel, load_reward_model, truncate_backbone

__all__ = ["RMConfig", "RewardModel", "load_reward_model", "train_reward_model", "truncate_backbone"]

log = logging.getLogger(__name__)


# =========================================================================== training


def _comparison_tensors(comps: Sequence[Any], tokenizer: Any, chat: bool, max_length: int) -> dict[str, Any]:
    """Pre-tokenise comparisons: per comparison, K encoded sequences plus ranks/best."""
    items = []
    for c in comps:
        seqs = [encode_prompt_completion(tokenizer, c.prompt, y, chat, max_length) for y in c.completions]
        items.append({"seqs": [{"input_ids": s["input_ids"], "attention_mask": s["attention_mask"]} for s in seqs],
                      "ranks": list(c.ranks), "kind": c.kind, "best": c.best if c.best is not None else -1,
                      "labeller": c.labeller or ""})
    return {"items": items}


def collate_comparisons(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Batch comparisons of up to K completions: B*K padded sequences plus ``[B, K]`` ranks/valid."""
    k = max(len(it["seqs"]) for it in items)
    flat, valid, ranks, best, kinds = [], [], [], [], []
    for it in items:
        n = len(it["seqs"])
        flat.extend(it["seqs"] + [it["seqs"][0]] * (k - n))  # filler rows, masked by `valid`
        valid.append([True] * n + [False] * (k - n))
        ranks.append(list(it["ranks"]) + [k] * (k - n))
        best.append(it["best"])
        kinds.append(it["kind"])
    batch = pad_batch(flat, pad_token_id, padding_side="right")
    return {
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
        "valid": torch.tensor(valid), "ranks": torch.tensor(ranks), "best": torch.tensor(best),
        "is_best_of_k": torch.tensor([kd == "best_of_k" for kd in kinds]), "k": k,
        "labeller": [it["labeller"] for it in items],
    }


def comparison_loss(rewards: torch.Tensor, batch: dict[str, Any], loss: str = "auto") -> dict[str, torch.Tensor]:
    """Loss sum and counts of one batch of comparisons (sums, so processes can be combined exactly).

    ``loss``: ``auto`` (best-of-K softmax for best-of-K records, InstructGPT's per-prompt mean over
    pairs for rankings and pairs), ``ranking``, ``best_of_k``, or ``pairwise`` (every pair of the batch
    weighs the same). Returns ``loss_sum`` (sum over loss units), ``n`` (number of units: comparisons,
    or pairs for ``pairwise``), ``correct``/``pairs`` (pairwise accuracy counts).
    """
    from palate.core.preference import best_of_k_loss, pairwise_loss, ranking_loss

    valid, ranks = batch["valid"], batch["ranks"]
    use_best = batch["is_best_of_k"] if loss in ("auto", "best_of_k") else torch.zeros_like(batch["is_best_of_k"])
    if loss == "best_of_k" and not bool(use_best.all()):
        raise ConfigError("rm: loss 'best_of_k' needs comparisons with a 'best' field; use loss: auto")
    total = rewards.sum() * 0.0
    n = torch.zeros((), device=rewards.device)
    rank_rows = ~use_best
    better = (ranks.unsqueeze(2) < ranks.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    diff = rewards.unsqueeze(2) - rewards.unsqueeze(1)
    if loss == "pairwise":
        # Every pair weighs the same (as if the pairs were separate examples), not every prompt.
        count = better.sum().to(rewards.dtype)
        if count > 0:
            total = total + pairwise_loss(diff[better], torch.zeros_like(diff[better])) * count
            n = n + count
    elif rank_rows.any():
        has_pairs = better[rank_rows].flatten(1).any(1)
        if has_pairs.any():
            mean_loss, _ = ranking_loss(rewards[rank_rows], ranks[rank_rows], valid[rank_rows])
            count = has_pairs.sum().to(rewards.dtype)
            total = total + mean_loss * count
            n = n + count
    if use_best.any():
        count = use_best.sum().to(rewards.dtype)
        total = total + best_of_k_loss(rewards[use_best], batch["best"][use_best], valid[use_best]) * count
        n = n + count
    correct = ((diff > 0) & better).sum().to(rewards.dtype)
    pairs = better.sum().to(rewards.dtype)
    return {"loss_sum": total, "n": n, "correct": correct, "pairs": pairs}


def _row(batch: dict[str, Any], i: int) -> dict[str, Any]:
    return {k: v[i:i + 1] for k, v in batch.items() if k in ("valid", "ranks", "best", "is_best_of_k")}


def _expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE: the |accuracy - confidence| gap averaged over equal-width confidence bins."""
    if p.size == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(y[sel].mean() - p[sel].mean())
    return float(ece)


@torch.no_grad()
def evaluate_comparisons(model: RewardModel, loader: Any, accelerator: Any, labeller_names: Sequence[str] = (),
                         held_out: str = "", prefix: str = "rm/val_") -> dict[str, float]:
    """Held-out pair accuracy (overall, per labeller, on the held-out labeller) and calibration.

    Calibration looks at every ranked pair (i < j): the Bradley-Terry prediction
    sigmoid(r_i - r_j) of "i preferred" against what the labeller said; ECE over 10 bins and the
    Brier score. Computed on raw scores, the scale the loss trains.
    """
    model.eval()
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    probs, labels = [], []
    loss_sum = n_sum = 0.0
    for batch in loader:
        b, k = batch["valid"].shape
        # Validation sets ranked by several labellers repeat the same completions: score each
        # distinct sequence once.
        rows, inverse = torch.unique(torch.cat([batch["input_ids"], batch["attention_mask"]], 1), dim=0,
                                     return_inverse=True)
        width = batch["input_ids"].shape[1]
        raw = model.raw_scores(rows[:, :width], rows[:, width:]).float()[inverse].view(b, k)
        # Per-comparison losses, so gather_for_metrics can drop the rows repeated to even out batches.
        row_loss = torch.stack([comparison_loss(raw[i:i + 1], _row(batch, i))["loss_sum"] for i in range(b)])
        row_n = torch.stack([comparison_loss(raw[i:i + 1], _row(batch, i))["n"] for i in range(b)])
        rows = accelerator.gather_for_metrics(torch.stack([row_loss, row_n], 1))
        loss_sum += float(rows[:, 0].sum())
        n_sum += float(rows[:, 1].sum())
        ranks, valid = batch["ranks"], batch["valid"]
        iu = torch.triu_indices(k, k, offset=1, device=raw.device)
        ri, rj = ranks[:, iu[0]], ranks[:, iu[1]]
        pair_ok = valid[:, iu[0]] & valid[:, iu[1]] & (ri != rj)
        p = torch.sigmoid(raw[:, iu[0]] - raw[:, iu[1]])
        y = (ri < rj).float()
        correct = ((p > 0.5).float() == y) & pair_ok
        gathered = accelerator.gather_for_metrics({"p": p, "y": y, "ok": pair_ok.float(), "correct": correct.float(),
                                                   "labeller": batch["labeller_id"]})
        ok = gathered["ok"].bool()
        probs.append(gathered["p"][ok].cpu().numpy())
        labels.append(gathered["y"][ok].cpu().numpy())
        for row in range(gathered["ok"].shape[0]):
            lid = int(gathered["labeller"][row])
            name = labeller_names[lid] if 0 <= lid < len(labeller_names) else ""
            per[name][0] += float(gathered["correct"][row].sum())
            per[name][1] += float(gathered["ok"][row].sum())
    model.train()
    p_all = np.concatenate(probs) if probs else np.zeros(0)
    y_all = np.concatenate(labels) if labels else np.zeros(0)
    metrics: dict[str, float] = {
        f"{prefix}loss": loss_sum / max(n_sum, 1.0),
        f"{prefix}accuracy": float(((p_all > 0.5) == (y_all > 0.5)).mean()) if p_all.size else float("nan"),
        f"{prefix}pairs": float(p_all.size),
        f"{prefix}ece": _expected_calibration_error(p_all, y_all),
        f"{prefix}brier": float(((p_all - y_all) ** 2).mean()) if p_all.size else float("nan"),
    }
    for name, (c, t) in sorted(per.items()):
        if name and t > 0:
            metrics[f"{prefix}accuracy/{name}"] = c / t
    if held_out and per.get(held_out, [0, 0])[1] > 0:
        c, t = per[held_out]
        metrics["rm/held_out_accuracy"] = c / t
    return metrics


def train_reward_model(cfg: RMConfig) -> Path:
    """Train a reward model on comparisons; returns the run directory (model under ``<run>/model``).

    Writes ``config.yaml``, ``metrics.jsonl`` (``rm/loss``, ``rm/accuracy``, ``rm/val_accuracy``,
    per-labeller accuracy, ``rm/held_out_accuracy``, ``rm/val_ece``, ``rm/val_brier``), the model
    and ``summary.json``.
    """
    from tqdm.auto import tqdm

    from palate.data.formats import read_comparisons, read_sft
    from palate.lm.models import load_model
    from palate.lm.training import (
        TrainLoop,
        make_loader,
        make_optimizer_and_scheduler,
        peak_rss_mb,
        start_run,
        task_settings,
    )
    from palate.runs import MetricsLogger, atomic_write_json

    cfg.validate()
    # Read and validate the data before creating the run directory: a bad line leaves no half-made run.
    task, chat, held_out = task_settings(cfg, chat_default=False)

    train, val, accelerator, run_dir = start_run(cfg, read_comparisons)
    if held_out and any(c.labeller == held_out for c in train):
        log.warning("training data contains comparisons by the held-out labeller '%s'; its accuracy "
                    "is then not a held-out measurement", held_out)
    if cfg.features_layer:
        from palate.lm.reward_features import train_feature_reward_model

        if not accelerator.is_main_process:
            return run_dir  # the head fit takes seconds on one process; there is nothing to share
        summary = train_feature_reward_model(cfg, train, val, run_dir, held_out, chat)
        atomic_write_json(run_dir / "summary.json", summary)
        return run_dir

    lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.use_lora else None
    base, tokenizer = load_model(cfg.model, dtype=cfg.dtype, cache_dir=cfg.cache_dir or None)
    model = RewardModel.from_causal_lm(base, chat=chat, max_length=cfg.max_length)
    del base
    if cfg.gradient_checkpointing:
        from palate.lm.models import enable_checkpointing

        enable_checkpointing(model.backbone)
    if lora is not None:
        from palate.lm.models import apply_lora

        model.backbone = apply_lora(model.backbone, lora, task_type="FEATURE_EXTRACTION",
                                    gradient_checkpointing=cfg.gradient_checkpointing)

    names = sorted({c.labeller or "" for c in train + val})
    name_id = {n: i for i, n in enumerate(names)}

    def tokenize(comps: Sequence[Any]) -> list[dict[str, Any]]:
        items = _comparison_tensors(comps, tokenizer, chat, cfg.max_length)["items"]
        for it in items:
            it["labeller_id"] = name_id[it["labeller"]]
        return items

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        out = collate_comparisons(items, tokenizer.pad_token_id)
        out["labeller_id"] = torch.tensor([it["labeller_id"] for it in items])
        del out["labeller"], out["k"]
        return out

    train_loader = make_loader(tokenize(train), cfg.batch_size, collate, shuffle=True, seed=cfg.seed)
    val_loader = make_loader(tokenize(val), cfg.batch_size, collate, shuffle=False, seed=cfg.seed) if val else None
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_loader) / cfg.gradient_accumulation_steps))
    optimizer, scheduler = make_optimizer_and_scheduler(model, cfg.lr, cfg.weight_decay, cfg.warmup_ratio, steps)
    model, optimizer, scheduler, train_loader = accelerator.prepare(model, optimizer, scheduler, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    logger = MetricsLogger(run_dir, tensorboard=cfg.tensorboard) if accelerator.is_main_process else None
    unwrapped: RewardModel = accelerator.unwrap_model(model)

    def micro_step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        b, k = batch["valid"].shape
        raw = model(batch["input_ids"], batch["attention_mask"], raw=True)
        out = comparison_loss(raw.float().view(b, k), batch, cfg.loss)
        # Normalise by the *global* number of comparisons: DDP averages gradients over processes,
        # so local_sum * P / global_n gives exactly the gradient of the one-process mean.
        n_global = accelerator.reduce(out["n"].detach().clone(), "sum").clamp_min(1.0)
        out["loss"] = out["loss_sum"] * accelerator.num_processes / n_global
        out["tokens"] = batch["attention_mask"].sum()
        return out

    loop = TrainLoop(accelerator, model, optimizer, scheduler, cfg.max_grad_norm)
    best_val = -1.0
    last_val: dict[str, float] = {}
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="rm", disable=not accelerator.is_local_main_process)
    for step, stats in loop.run(train_loader, micro_step, steps):
        bar.update(1)
        if logger and (step % cfg.log_every == 0 or step == steps):
            logger.log(step, {"rm/loss": stats["loss"], "rm/accuracy": stats["accuracy"],
                              "rm/lr": stats["lr"], "rm/grad_norm": stats["grad_norm"],
                              "charts/tokens_per_s": stats["tokens_per_s"]})
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.2f}")
        if val_loader is not None and (step % cfg.eval_every == 0 or step == steps):
            last_val = evaluate_comparisons(unwrapped, val_loader, accelerator, names, held_out)
            if logger:
                logger.log(step, last_val)
            best_val = max(best_val, last_val.get("rm/val_accuracy", -1.0))
    bar.close()
    train_seconds = time.perf_counter() - start

    # Normalisation (bias: mean 0, gain: std 1 on reference samples), on the main process.
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        if cfg.norm_data:
            ref = [(ex.prompt, ex.completion) for ex in read_sft(cfg.norm_data) if ex.prompt is not None]
        else:
            # Unique samples: a validation set ranked by every labeller repeats each completion.
            ref = list(dict.fromkeys((c.prompt, y) for c in (val or train) for y in c.completions))
        if ref:
            raw = unwrapped.score_texts([p for p, _ in ref], [y for _, y in ref], tokenizer,
                                        batch_size=16, normalized=False)
            unwrapped.set_normalization(raw)
        unwrapped.save_pretrained(run_dir / "model", tokenizer=tokenizer)
        summary = {
            "steps": steps, "num_processes": accelerator.num_processes, "train_comparisons": len(train), "val_comparisons": len(val),
            "train_seconds": round(train_seconds, 2), "tokens": loop.tokens, "tokens_per_s": loop.tokens_per_s(), "train_loop_seconds": round(loop.seconds, 2),
            "peak_rss_mb": peak_rss_mb(), "gain": float(unwrapped.gain), "bias": float(unwrapped.bias),
            "normalized_on": len(ref), "chat": chat, "held_out_labeller": held_out,
            "final_train_loss": loop.last.get("loss"), **last_val, "best_val_accuracy": best_val,
        }
        atomic_write_json(run_dir / "summary.json", summary)
        logger.close()
        log.info("reward model written to %s (val accuracy %.3f)", run_dir / "model",
                 last_val.get("rm/val_accuracy", float("nan")))
    accelerator.wait_for_everyone()
    return run_dir
