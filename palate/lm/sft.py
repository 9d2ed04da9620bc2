"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

The loss is the next-token cross-entropy on *response tokens only*: prompt tokens are context, not
targets (``labels = -100`` there), so the model learns to answer rather than to write prompts.
Options: packing several examples into one ``max_length`` block (fewer padding tokens; attention
then crosses example boundaries inside a block, the usual cheap packing), LoRA adapters, gradient
checkpointing, validation loss and perplexity, and, when a reward model is given, checkpoint
selection by the mean reward of samples on validation prompts (InstructGPT's choice: validation
loss keeps falling long after the samples stop improving).

The model is written under ``<run>/model/`` with ``save_pretrained`` plus the tokenizer, so
``load_model("runs/NAME")`` loads it. With LoRA the adapters are merged into the weights there
(every later stage loads a plain model), and the adapter alone is also written to ``<run>/adapter/``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from palate.errors import ConfigError
from palate.lm.config import SFTConfig
from palate.lm.formatting import encode_prompt_completion, encode_text_pair, format_messages, pad_batch
from palate.runs import atomic_write_dir

log = logging.getLogger(__name__)

__all__ = ["SFTConfig", "encode_example", "sample_completions", "save_causal_lm", "train_sft"]


def encode_example(tokenizer: Any, example: Any, chat: bool, max_length: int) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt tokens) of one demonstration."""
    if example.messages is not None:
        prompt_text, completion = format_messages(tokenizer, example.messages)
        enc = encode_text_pair(tokenizer, prompt_text, completion, chat=True, max_length=max_length)
    else:
        enc = encode_prompt_completion(tokenizer, example.prompt, example.completion, chat, max_length)
    labels = [t if m else -100 for t, m in zip(enc["input_ids"], enc["completion_mask"])]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def pack_examples(encoded: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate examples and cut the stream into ``max_length`` blocks (the last one shorter).

    Labels keep their -100 prompt masks, so packing changes which tokens share a row, never which
    tokens are trained on (except the first label of each block, which has no left context in it).
    """
    ids: list[int] = []
    labels: list[int] = []
    for e in encoded:
        ids.extend(e["input_ids"])
        labels.extend(e["labels"])
    blocks = []
    for start in range(0, len(ids), max_length):
        chunk = ids[start:start + max_length]
        blocks.append({"input_ids": chunk, "attention_mask": [1] * len(chunk),
                       "labels": labels[start:start + max_length]})
    return blocks


def sft_forward_loss_sums(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sft_loss_sums` of ``model`` on ``batch``, with the unembedding run only where it is read.

    The loss reads the logits at positions whose next token is a target, not at prompt or padding
    positions; on short demonstrations that is about half the positions, and the LM head (576 x
    49,152 in SmolLM2, eight blocks' worth) with its backward is a large share of a step. A model
    whose forward takes a boolean ``logits_to_keep`` mask computes only those rows; the loss is
    the same sum over the same targets (``tests/lm/test_sft.py``). Other models take the full path.
    """
    from palate.lm.generation import keep_response_logits

    labels = batch["labels"]
    inner = getattr(model, "module", model)  # under DDP, ask the wrapped model
    if not keep_response_logits(inner, 1):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sft_loss_sums(logits, labels)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    targets = labels[:, 1:][keep[:, :-1]]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="sum")
    return loss_sum, targets.new_tensor(targets.numel())


def sft_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of token losses, number of target tokens)``: next-token CE where ``labels != -100``."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                               ignore_index=-100, reduction="sum")
    return loss_sum, (shift_labels != -100).sum()


def save_causal_lm(model: Any, tokenizer: Any, directory: str | os.PathLike[str]) -> Path:
    """``save_pretrained`` of model and tokenizer into a temporary directory, then a rename.

    A PEFT model is merged on a copy first, so training can continue with its adapters.
    """
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_write_dir(directory, write)


@torch.no_grad()
def sample_completions(model: Any, tokenizer: Any, prompts: Sequence[str], *, chat: bool, max_new_tokens: int,
                       batch_size: int = 16, temperature: float = 1.0, top_p: float = 1.0,
                       seed: int | None = None, max_prompt_length: int = 256) -> list[str]:
    """One sampled completion per prompt, formatted exactly as the reward model will see it.

    Prompts are padded on the left (generation appends on the right); special tokens are dropped
    from the decoded text because :func:`palate.lm.formatting.encode_prompt_completion` adds EOS back.
    """
    from palate.lm.formatting import format_prompt

    if seed is not None:
        # Fixed samples for checkpoint selection, without disturbing the training RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return sample_completions(model, tokenizer, prompts, chat=chat, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size, temperature=temperature, top_p=top_p, seed=None,
                                      max_prompt_length=max_prompt_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [format_prompt(tokenizer, p, chat) for p in prompts[start:start + batch_size]]
            add_special = not (chat and getattr(tokenizer, "chat_template", None))
            rows = [tokenizer(t, add_special_tokens=add_special)["input_ids"][-max_prompt_length:] for t in texts]
            batch = pad_batch([{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows],
                              tokenizer.pad_token_id, padding_side="left")
            gen = model.generate(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_p=top_p, top_k=0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = gen[:, batch["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


@torch.no_grad()
def _validation_loss(model: Any, loader: Any, accelerator: Any) -> dict[str, float]:
    """Token-mean validation loss over all processes.

    Per-row sums go through ``gather_for_metrics``, which drops the rows accelerate repeats to
    even out the last batch, so the figure is exact for any number of processes.
    """
    model.eval()
    loss_sum = count = 0.0
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        token_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                     reduction="none")
        rows = accelerator.gather_for_metrics(torch.stack([token_loss.sum(1), (labels[:, 1:] != -100).sum(1).float()], 1))
        loss_sum += float(rows[:, 0].sum())
        count += float(rows[:, 1].sum())
    model.train()
    loss = loss_sum / max(count, 1.0)
    return {"sft/val_loss": loss, "sft/val_ppl": math.exp(min(loss, 50.0))}


def train_sft(cfg: SFTConfig) -> Path:
    """Fine-tune on demonstrations; returns the run directory (model under ``<run>/model``).

    Metrics: ``sft/loss``, ``sft/val_loss``, ``sft/val_ppl``, ``sft/val_reward`` (with a reward
    model), ``charts/tokens_per_s``; ``summary.json`` records the selected step.
    """
    from tqdm.auto import tqdm

    from palate.data.formats import read_sft
    from palate.lm.models import LoraSettings, load_model
    from palate.lm.training import (
        TrainLoop,
        make_loader,
        make_optimizer_and_scheduler,
        peak_gpu_mb,
        peak_rss_mb,
        start_run,
        task_settings,
    )
    from palate.runs import MetricsLogger, atomic_write_json

    cfg.validate()
    # Read and validate the data before creating the run directory: a bad line leaves no half-made run.
    task, chat, _ = task_settings(cfg, chat_default=True)
    train, val, accelerator, run_dir = start_run(cfg, read_sft)

    lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.use_lora else None
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, cache_dir=cfg.cache_dir or None, lora=lora,
                                  gradient_checkpointing=cfg.gradient_checkpointing)

    def encode(examples: Sequence[Any], pack: bool) -> list[dict[str, list[int]]]:
        enc = [encode_example(tokenizer, e, chat, cfg.max_length) for e in examples]
        return pack_examples(enc, cfg.max_length) if pack else enc

    def collate(items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return pad_batch(items, tokenizer.pad_token_id, padding_side="right")

    train_items = encode(train, cfg.packing)
    train_loader = make_loader(train_items, cfg.batch_size, collate, shuffle=True, seed=cfg.seed)
    val_loader = make_loader(encode(val, False), cfg.batch_size, collate, shuffle=False, seed=cfg.seed) if val else None
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_loader) / cfg.gradient_accumulation_steps))
    optimizer, scheduler = make_optimizer_and_scheduler(model, cfg.lr, cfg.weight_decay, cfg.warmup_ratio, steps)
    model, optimizer, scheduler, train_loader = accelerator.prepare(model, optimizer, scheduler, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    reward_model = None
    select_prompts: list[str] = []
    max_new_tokens = cfg.max_new_tokens or (task.max_new_tokens if task else 48)
    if cfg.reward_model:
        from palate.lm.reward_model import load_reward_model

        reward_model, rm_tokenizer = load_reward_model(cfg.reward_model, device=str(accelerator.device))
        if task is not None:
            select_prompts = task.prompts("validation")[: cfg.select_prompts]
        else:
            select_prompts = [e.prompt for e in val if e.prompt is not None][: cfg.select_prompts]
        if not select_prompts:
            raise ConfigError("sft: reward_model is set but there are no validation prompts; set task or val_data")

    logger = MetricsLogger(run_dir, tensorboard=cfg.tensorboard) if accelerator.is_main_process else None

    def micro_step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss_sum, n = sft_forward_loss_sums(model, batch)
        # Mean over the *global* number of target tokens (see palate.lm.training).
        n_global = accelerator.reduce(n.detach().float().clone(), "sum").clamp_min(1.0)
        return {"loss": loss_sum * accelerator.num_processes / n_global, "loss_sum": loss_sum.detach(),
                "n": n.float(), "tokens": batch["attention_mask"].sum()}

    loop = TrainLoop(accelerator, model, optimizer, scheduler, cfg.max_grad_norm)
    best: dict[str, Any] = {"step": 0, "val_reward": None}
    last_val: dict[str, float] = {}
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="sft", disable=not accelerator.is_local_main_process)
    for step, stats in loop.run(train_loader, micro_step, steps):
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
        if logger and (step % cfg.log_every == 0 or step == steps):
            logger.log(step, {"sft/loss": stats["loss"], "sft/lr": stats["lr"], "sft/grad_norm": stats["grad_norm"],
                              "charts/tokens_per_s": stats["tokens_per_s"]})
        if step % cfg.eval_every == 0 or step == steps:
            metrics: dict[str, float] = _validation_loss(model, val_loader, accelerator) if val_loader else {}
            if reward_model is not None and accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(model)
                completions = sample_completions(unwrapped, tokenizer, select_prompts, chat=chat,
                                                 max_new_tokens=max_new_tokens, seed=cfg.seed)
                rewards = reward_model.score_texts(select_prompts, completions, rm_tokenizer, chat=chat)
                metrics["sft/val_reward"] = float(rewards.mean())
                if best["val_reward"] is None or metrics["sft/val_reward"] > best["val_reward"]:
                    best = {"step": step, "val_reward": metrics["sft/val_reward"]}
                    save_causal_lm(unwrapped, tokenizer, run_dir / "model")
            last_val = metrics
            if logger and metrics:
                logger.log(step, metrics)
    bar.close()
    train_seconds = time.perf_counter() - start

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if reward_model is None:
            best = {"step": steps, "val_reward": None}
            save_causal_lm(unwrapped, tokenizer, run_dir / "model")
        if cfg.use_lora:
            unwrapped.save_pretrained(run_dir / "adapter")  # the adapter alone (final step), for PEFT users
        summary = {
            "steps": steps, "num_processes": accelerator.num_processes, "train_examples": len(train), "val_examples": len(val), "chat": chat,
            "packing": cfg.packing, "train_seconds": round(train_seconds, 2), "tokens": loop.tokens, "tokens_per_s": loop.tokens_per_s(), "train_loop_seconds": round(loop.seconds, 2),
            "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(), "final_train_loss": loop.last.get("loss"),
            "selected_step": best["step"], "selected_val_reward": best["val_reward"], **last_val,
        }
        atomic_write_json(run_dir / "summary.json", summary)
        logger.close()
        log.info("SFT model written to %s (step %d)", run_dir / "model", best["step"])
    accelerator.wait_for_everyone()
    return run_dir
