"""Direct preference optimisation (Rafailov et al. 2023): the policy fitted to comparisons directly.

The KL-regularised objective PPO maximises, E[r(x, y)] - beta KL(pi || pi_ref), has the closed-form
optimum pi*(y|x) proportional to pi_ref(y|x) exp(r(x, y) / beta). Read backwards, every policy
defines an implicit reward r(x, y) = beta (log pi(y|x) - log pi_ref(y|x)) (up to a term of x
alone, which cancels in a comparison), and the Bradley-Terry loss of the reward model can train
the policy through it: :func:`palate.core.preference.dpo_loss`. No reward model, no sampling.

What this trainer does, top to bottom:

* It reads the same comparisons JSONL as ``palate lm rm``. A ranking of K completions gives every
  strictly ordered pair of its C(K, 2), a best-of-K record the best against each other one, a pair
  itself; ties form no pair and a record with no ordered pair is skipped. All pairs of a prompt
  stay in one step, so its K completions go through the policy once; each pair weighs the same.
* Every distinct (prompt, completion) is encoded once with
  :func:`palate.lm.formatting.encode_prompt_completion`, the tokens the policy generates and the
  reward model scores; its log-probability is the sum over the completion's tokens only.
* The reference pi_ref is frozen, so its log-probabilities are computed once, up front, without
  gradients, and cached; each step runs only the policy. When pi_ref is the starting model (the
  default), the policy itself computes them before its first update and no second model is loaded.
* ``trainable_layers: N`` trains only the last N blocks (:func:`palate.lm.trainable.freeze_all_but_last_layers`).
  The lower blocks are then a fixed function of the tokens, so the same up-front pass also keeps
  the hidden state entering the first trained block (:mod:`palate.lm.prefix`), and every step
  and validation runs only the top N blocks from it.
* Validation: the DPO loss and the implicit-reward pair accuracy on the validation comparisons,
  overall, per labeller, and for the task's held-out labeller (``dpo/held_out_accuracy``, the
  counterpart of ``rm/held_out_accuracy``). Before the first step the loss is log 2 exactly.

The policy is written to ``<run>/model/`` as an SFT run's model is, and ``config.yaml`` records
the reference used, so ``palate lm eval runs/NAME`` compares the policy with it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from palate.errors import ConfigError
from palate.lm.config import DPOConfig
from palate.lm.formatting import encode_prompt_completion, pad_batch, position_ids_from_mask

log = logging.getLogger(__name__)

__all__ = ["DPOConfig", "comparison_pairs", "completion_logprobs", "train_dpo"]


def comparison_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """``(winner, loser)`` indices of every strictly ordered pair of a ranking (0 = best); ties form none.

    A best-of-K record's ranks (0 for the best, 1 for the rest) give the best against each other one.
    """
    pairs = []
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            if ranks[i] < ranks[j]:
                pairs.append((i, j))
            elif ranks[j] < ranks[i]:
                pairs.append((j, i))
    return pairs


def completion_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor, *, hidden: torch.Tensor | None = None,
                        start: int = 0) -> torch.Tensor:
    """``[B]`` sum over each row's completion tokens of log pi(y_t | x, y_<t).

    The unembedding runs only at the positions that predict a completion token where the model
    supports a boolean ``logits_to_keep`` (as in SFT's loss). With ``hidden``, the hidden state
    entering block ``start`` of each row, only blocks ``start..`` run.
    """
    from palate.lm.generation import keep_response_logits
    from palate.lm.prefix import forward_suffix

    keep = torch.zeros_like(completion_mask, dtype=torch.bool)
    keep[:, :-1] = completion_mask[:, 1:].bool()
    inputs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    partial = bool(keep_response_logits(getattr(model, "module", model), 1))
    if partial:
        inputs["logits_to_keep"] = keep
    out = model(**inputs) if hidden is None else forward_suffix(model, hidden, start, **inputs)
    logits = out.logits if partial else out.logits[keep]
    targets = input_ids[:, 1:][keep[:, :-1]]
    token_logp = -F.cross_entropy(logits.float(), targets, reduction="none")
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(keep)[keep]
    return token_logp.new_zeros(input_ids.shape[0]).index_add(0, rows, token_logp)


class _Sequences:
    """The distinct encoded (prompt, completion) sequences of a run, and what is cached per sequence."""

    def __init__(self, tokenizer: Any, chat: bool, max_length: int, add_eos: bool) -> None:
        self.tokenizer, self.chat, self.max_length, self.add_eos = tokenizer, chat, max_length, add_eos
        self.encoded: list[dict[str, list[int]]] = []
        self.index: dict[tuple[str, str], int] = {}
        self.ref_logps: torch.Tensor = torch.zeros(0)
        self.hidden: list[torch.Tensor] | None = None  # entering the first trained block, per sequence

    def add(self, prompt: str, completion: str) -> int:
        key = (prompt, completion)
        if key not in self.index:
            enc = encode_prompt_completion(self.tokenizer, prompt, completion, self.chat, self.max_length,
                                           add_eos=self.add_eos)
            self.index[key] = len(self.encoded)
            self.encoded.append({k: enc[k] for k in ("input_ids", "attention_mask", "completion_mask")})
        return self.index[key]

    def comparisons(self, comps: Sequence[Any], labeller_id: dict[str, int]) -> list[dict[str, Any]]:
        """One item per comparison: its pairs as ``(winner, loser)`` sequence ids, and its labeller."""
        items = []
        for c in comps:
            ids = [self.add(c.prompt, y) for y in c.completions]
            items.append({"pairs": [(ids[w], ids[lo]) for w, lo in comparison_pairs(c.ranks)],
                          "labeller_id": labeller_id[c.labeller or ""]})
        return items

    def batch(self, ids: Sequence[int], with_hidden: bool) -> dict[str, torch.Tensor]:
        """Right-padded tokens of these sequences (and their cached hidden states, zero-padded)."""
        out = pad_batch([self.encoded[i] for i in ids], self.tokenizer.pad_token_id, padding_side="right")
        if with_hidden and self.hidden is not None:
            width = out["input_ids"].shape[1]
            out["hidden"] = torch.stack([F.pad(self.hidden[i], (0, 0, 0, width - self.hidden[i].shape[0]))
                                         for i in ids])
        return out

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A step's comparisons: each distinct sequence once, the pairs as row indices into it."""
        local: dict[int, int] = {}
        for it in items:
            for w, lo in it["pairs"]:
                local.setdefault(w, len(local))
                local.setdefault(lo, len(local))
        ids = list(local)
        out = self.batch(ids, with_hidden=True)
        out["ref_logps"] = self.ref_logps[ids]
        out["chosen"] = torch.tensor([local[w] for it in items for w, _ in it["pairs"]])
        out["rejected"] = torch.tensor([local[lo] for it in items for _, lo in it["pairs"]])
        return out


@torch.no_grad()
def _sequence_pass(model: Any, seqs: _Sequences, ids: Sequence[int], batch_size: int, device: Any, *,
                   start: int = 0, capture: bool = False, desc: str = "") -> torch.Tensor:
    """``[len(ids)]`` completion log-probabilities under ``model``, in batches of sequences of like length.

    ``start > 0``: only blocks ``start..`` run, from ``seqs.hidden``; ``capture`` first fills
    ``seqs.hidden`` for these sequences with a full pass. The log-probabilities always come from
    the path the training steps and validation take, on batches made the same way, so that before
    the first update validation reproduces the reference's numbers bit for bit.
    """
    from tqdm.auto import tqdm

    from palate.lm.generation import keep_response_logits
    from palate.lm.prefix import forward_capture

    was_training = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(seqs.encoded[ids[i]]["input_ids"]))
    logps = torch.zeros(len(ids))
    for lo in tqdm(range(0, len(order), batch_size), desc=desc, disable=not desc, leave=False):
        rows = order[lo:lo + batch_size]
        sel = [ids[i] for i in rows]
        if capture and start:
            b = {k: v.to(device) for k, v in seqs.batch(sel, with_hidden=False).items()}
            _, h = forward_capture(model, start, input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                   position_ids=position_ids_from_mask(b["attention_mask"]), use_cache=False,
                                   **keep_response_logits(model, 0))
            assert seqs.hidden is not None
            for r, i in enumerate(sel):
                seqs.hidden[i] = h[r, :int(b["attention_mask"][r].sum())].cpu().clone()
        b = {k: v.to(device) for k, v in seqs.batch(sel, with_hidden=start > 0).items()}
        lp = completion_logprobs(model, b["input_ids"], b["attention_mask"], b["completion_mask"],
                                 hidden=b.get("hidden"), start=start)
        logps[torch.tensor(rows)] = lp.float().cpu()
    model.train(was_training)
    return logps


def _frozen_prefix_start(policy: Any, trainable_layers: int, vocab_size: int, device: Any) -> int:
    """The first trained block when the cached-prefix forward reproduces the full one here (0: off)."""
    from palate.lm.prefix import decoder_base, prefix_frozen, suffix_matches

    base = decoder_base(policy)
    start = len(base.layers) - trainable_layers if base is not None else 0
    if base is not None and prefix_frozen(policy, start) and suffix_matches(policy, start, vocab_size, device):
        return start
    return 0


def _validate(model: Any, seqs: _Sequences, items: Sequence[dict[str, Any]], cfg: DPOConfig, device: Any,
              start: int, labeller_names: Sequence[str], held_out: str) -> dict[str, float]:
    """DPO loss, implicit-reward accuracy (overall, per labeller, held-out) and rewards on ``items``."""
    from palate.core.preference import dpo_loss

    ids = sorted({i for it in items for pair in it["pairs"] for i in pair})
    logps = _sequence_pass(model, seqs, ids, cfg.forward_batch_size, device, start=start)
    policy = torch.full((len(seqs.encoded),), float("nan"))
    policy[torch.tensor(ids)] = logps
    w = torch.tensor([p[0] for it in items for p in it["pairs"]])
    lo = torch.tensor([p[1] for it in items for p in it["pairs"]])
    who = [it["labeller_id"] for it in items for _ in it["pairs"]]
    out = dpo_loss(policy[w], policy[lo], seqs.ref_logps[w], seqs.ref_logps[lo], cfg.beta, cfg.label_smoothing)
    margin = out.chosen_rewards - out.rejected_rewards
    credit = (margin > 0).float() + 0.5 * (margin == 0).float()  # ties count one half, as in dpo_loss
    metrics = {"dpo/val_loss": float(out.loss), "dpo/val_accuracy": float(out.accuracy),
               "dpo/val_pairs": float(len(w)), "dpo/val_chosen_reward": float(out.chosen_rewards.mean()),
               "dpo/val_rejected_reward": float(out.rejected_rewards.mean()),
               "dpo/val_margin": float(margin.mean())}
    per: dict[str, list[float]] = defaultdict(list)
    for lid, c in zip(who, credit.tolist()):
        per[labeller_names[lid]].append(c)
    for name, credits in sorted(per.items()):
        if name:
            metrics[f"dpo/val_accuracy/{name}"] = sum(credits) / len(credits)
    if held_out and per.get(held_out):
        metrics["dpo/held_out_accuracy"] = sum(per[held_out]) / len(per[held_out])
    return metrics


def train_dpo(cfg: DPOConfig) -> Path:
    """Train a policy by DPO on comparisons; returns the run directory (policy under ``<run>/model``).

    Writes ``config.yaml`` (with the reference and the chat setting resolved), ``metrics.jsonl``
    (``dpo/loss``, ``dpo/accuracy``, ``dpo/val_loss``, ``dpo/val_accuracy``, per-labeller accuracy,
    ``dpo/held_out_accuracy``, implicit rewards), the model and ``summary.json``.
    """
    from tqdm.auto import tqdm

    from palate.core.preference import dpo_loss
    from palate.data.formats import read_comparisons
    from palate.lm.models import load_model
    from palate.lm.prefix import prefix_equal
    from palate.lm.sft import save_causal_lm
    from palate.lm.trainable import freeze_all_but_last_layers
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
    task, chat, held_out = task_settings(cfg, chat_default=False)
    # config.yaml records what was used, where `palate lm eval` looks for the reference and chat.
    cfg = dataclasses.replace(cfg, reference=cfg.reference or cfg.model, chat=chat)
    # The data is read and validated before the run directory exists (see start_run); the reader
    # already refuses a record that ties every completion, so each comparison gives a pair.
    train, val, accelerator, run_dir = start_run(cfg, read_comparisons)
    if held_out and any(c.labeller == held_out for c in train):
        log.warning("training data contains comparisons by the held-out labeller '%s'; its accuracy "
                    "is then not a held-out measurement", held_out)
    device = accelerator.device

    policy, tokenizer = load_model(cfg.model, dtype=cfg.dtype, cache_dir=cfg.cache_dir or None)
    policy.to(device)
    freeze_all_but_last_layers(policy, cfg.trainable_layers)
    if not any(p.requires_grad for p in policy.parameters()):
        raise ConfigError("dpo: nothing to train: every parameter is frozen (check trainable_layers)")
    start = 0
    if cfg.trainable_layers and cfg.cache_frozen_prefix and accelerator.num_processes == 1:
        vocab = int(getattr(policy.config, "vocab_size", 0) or len(tokenizer))
        start = _frozen_prefix_start(policy, cfg.trainable_layers, vocab, device)

    names = sorted({c.labeller or "" for c in train + val})
    labeller_id = {n: i for i, n in enumerate(names)}
    seqs = _Sequences(tokenizer, chat, cfg.max_length, cfg.add_eos)
    train_items = seqs.comparisons(train, labeller_id)
    val_items = seqs.comparisons(val, labeller_id)
    n_train_pairs = sum(len(it["pairs"]) for it in train_items)
    all_ids = list(range(len(seqs.encoded)))
    val_ids = sorted({i for it in val_items for pair in it["pairs"] for i in pair})
    # Validation's sequences first, batched as validation batches them (see _sequence_pass).
    groups = [val_ids, sorted(set(all_ids) - set(val_ids))]
    seqs.hidden = [torch.zeros(0)] * len(all_ids) if start else None

    # pi_ref's log-probabilities, once: the policy itself before its first update when pi_ref is
    # the starting model, and the same pass keeps the frozen prefix's output for every step.
    t_ref = time.perf_counter()
    ref_logps = torch.zeros(len(all_ids))
    reference = policy
    if cfg.reference != cfg.model:
        reference, _ = load_model(cfg.reference, dtype=cfg.dtype, cache_dir=cfg.cache_dir or None, device=str(device))
    shares = reference is policy or (bool(start) and prefix_equal(reference, policy, start))
    for ids in groups:
        ref_logps[ids] = _sequence_pass(reference, seqs, ids, cfg.forward_batch_size, device,
                                        start=start if shares else 0, capture=shares, desc="reference log-probs")
        if start and not shares:
            _sequence_pass(policy, seqs, ids, cfg.forward_batch_size, device, start=start, capture=True,
                           desc="frozen prefix")
    seqs.ref_logps = ref_logps
    del reference
    reference_seconds = time.perf_counter() - t_ref
    log.info("reference log-probs of %d sequences in %.1f s; frozen-prefix cache from block %d (0 = off)",
             len(all_ids), reference_seconds, start)

    train_loader = make_loader(train_items, cfg.batch_size, seqs.collate, shuffle=True, seed=cfg.seed)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_loader) / cfg.gradient_accumulation_steps))
    optimizer, scheduler = make_optimizer_and_scheduler(policy, cfg.lr, cfg.weight_decay, cfg.warmup_ratio, steps)
    model, optimizer, scheduler, train_loader = accelerator.prepare(policy, optimizer, scheduler, train_loader)
    unwrapped = accelerator.unwrap_model(model)
    logger = MetricsLogger(run_dir, tensorboard=cfg.tensorboard) if accelerator.is_main_process else None

    def validate(step: int) -> dict[str, float]:
        if not val_items or not accelerator.is_main_process:
            return {}
        metrics = _validate(unwrapped, seqs, val_items, cfg, device, start, names, held_out)
        if logger:
            logger.log(step, metrics)
        return metrics

    def micro_step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logp = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                   hidden=batch.get("hidden"), start=start)
        w, lo, ref = batch["chosen"], batch["rejected"], batch["ref_logps"]
        out = dpo_loss(logp[w], logp[lo], ref[w], ref[lo], cfg.beta, cfg.label_smoothing)
        n = torch.tensor(float(w.numel()), device=logp.device)
        # Mean over the *global* number of pairs (see palate.lm.training).
        n_global = accelerator.reduce(n.clone(), "sum").clamp_min(1.0)
        return {"loss": out.loss * n * accelerator.num_processes / n_global, "loss_sum": out.loss.detach() * n,
                "n": n, "correct": out.accuracy * n, "pairs": n, "tokens": batch["attention_mask"].sum()}

    initial_val = validate(0)
    last_val = initial_val
    loop = TrainLoop(accelerator, model, optimizer, scheduler, cfg.max_grad_norm)
    t_train = time.perf_counter()
    bar = tqdm(total=steps, desc="dpo", disable=not accelerator.is_local_main_process)
    for step, stats in loop.run(train_loader, micro_step, steps):
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.2f}")
        if logger and (step % cfg.log_every == 0 or step == steps):
            logger.log(step, {"dpo/loss": stats["loss"], "dpo/accuracy": stats["accuracy"], "dpo/lr": stats["lr"],
                              "dpo/grad_norm": stats["grad_norm"], "charts/tokens_per_s": stats["tokens_per_s"]})
        if step % cfg.eval_every == 0 or step == steps:
            last_val = validate(step) or last_val
    bar.close()
    train_seconds = time.perf_counter() - t_train

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_causal_lm(unwrapped, tokenizer, run_dir / "model")
        summary = {
            "steps": steps, "num_processes": accelerator.num_processes, "reference": cfg.reference,
            "beta": cfg.beta, "label_smoothing": cfg.label_smoothing, "chat": chat, "held_out_labeller": held_out,
            "train_comparisons": len(train), "train_pairs": n_train_pairs, "val_comparisons": len(val),
            "val_pairs": sum(len(it["pairs"]) for it in val_items), "sequences": len(all_ids),
            "trainable_layers": cfg.trainable_layers, "frozen_prefix_from_block": start,
            "reference_seconds": round(reference_seconds, 2), "train_seconds": round(train_seconds, 2),
            "tokens": loop.tokens, "tokens_per_s": loop.tokens_per_s(), "train_loop_seconds": round(loop.seconds, 2),
            "peak_rss_mb": peak_rss_mb(), "final_train_loss": loop.last.get("loss"),
            "initial_val_loss": initial_val.get("dpo/val_loss"), **last_val,
        }
        atomic_write_json(run_dir / "summary.json", summary)
        logger.close()
        log.info("DPO policy written to %s (val accuracy %.3f)", run_dir / "model",
                 last_val.get("dpo/val_accuracy", float("nan")))
    accelerator.wait_for_everyone()
    return run_dir
