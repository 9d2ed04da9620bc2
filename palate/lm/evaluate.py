"""Evaluation of an RLHF policy against its SFT starting point (InstructGPT, section 4).

* **Win rate**: for the same test prompts, one completion from the policy and one from the SFT
  model; the task panel's *held-out* labeller (never used to train anything) ranks the pair. Ties
  count one half.
* **Reward**: the task's programmatic reward (and a reward model's, if given) for both models.
* **KL to the reference**: sum over the completion's tokens of log pi - log rho, averaged over
  policy samples, in nats: the x-axis of Ziegler et al.'s reward-vs-KL frontier.
* **Alignment tax**: perplexity of both models on held-out *pretraining* text, which PPO-ptx
  is meant to protect.
* Length, EOS rate, distinct-n and repeated n-grams, because a policy that games a reward often
  does it by repeating itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from palate.errors import CheckpointError, ConfigError
from palate.lm.config import EvalConfig
from palate.lm.generation import (
    decode_responses,
    logits_to_logprobs,
    row_seed,
    sample,
    sample_traced,
)
from palate.lm.pretrain_text import nll_sum
from palate.runs import atomic_write_json, atomic_write_text, read_run_config, seed_everything

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "distinct_n", "repeated_ngram_fraction", "win_rate", "evaluate_models", "eval_out_dir",
           "evaluate"]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts (Li et al. 2016): low means repetitive output."""
    grams: list[tuple[str, ...]] = []
    for t in texts:
        words = t.split()
        grams += [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    """Fraction of a text's word n-grams that already occurred earlier in it."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def win_rate(judge: Any, prompts: Sequence[str], policy_texts: Sequence[str], baseline_texts: Sequence[str],
             rng: np.random.Generator) -> tuple[float, list[float]]:
    """Fraction of prompts where ``judge`` ranks the policy's completion above the baseline's (ties 1/2).

    ``judge.compare(prompt, [a, b], rng)`` returns ranks (0 = best) like every palate labeller,
    so a person answering through the feedback service can judge in its place.
    """
    outcomes = []
    for p, a, b in zip(prompts, policy_texts, baseline_texts, strict=True):
        ra, rb = judge.compare(p, [a, b], rng)
        outcomes.append(1.0 if ra < rb else 0.0 if ra > rb else 0.5)
    return float(np.mean(outcomes)) if outcomes else float("nan"), outcomes


def _text_stats(texts: Sequence[str], lengths: torch.Tensor, ended: torch.Tensor) -> dict[str, float]:
    return {
        "length_tokens": float(lengths.float().mean()),
        "eos_frac": float(ended.float().mean()),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repetition_3gram": float(np.mean([repeated_ngram_fraction(t) for t in texts])) if texts else 0.0,
    }


@torch.no_grad()
def sample_batches(model: torch.nn.Module, tokenizer, prompt_ids: Sequence[list[int]], max_new_tokens: int,
                   temperature: float, batch_size: int,
                   row_seeds: Sequence[int] | None = None) -> tuple[list[Any], list[str]]:
    """``(rollout batches, decoded completions)`` of one sample per prompt id list, ``batch_size`` at a time.

    With ``row_seeds`` each completion draws from its own generator (:func:`palate.lm.generation.sample`),
    so it does not depend on the batch or process it is sampled in.
    """
    batches, texts = [], []
    for i in range(0, len(prompt_ids), batch_size):
        seeds = None if row_seeds is None else row_seeds[i:i + batch_size]
        b = sample(model, tokenizer, prompt_ids[i:i + batch_size], max_new_tokens, temperature, row_seeds=seeds)
        batches.append(b)
        texts += decode_responses(tokenizer, b)
    return batches, texts


def _policy_kl(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer, prompt_ids: Sequence[list[int]],
               max_new_tokens: int, temperature: float, batch_size: int,
               row_seeds: Sequence[int]) -> tuple[list[Any], list[str], list[float]]:
    """The policy's samples (as :func:`sample_batches`) and each one's KL to the reference, in nats.

    log pi comes from the logits the tokens were drawn from (no second policy pass). When the two
    models share their lower blocks bit for bit (a policy trained with ``trainable_layers``), the
    reference runs only its top blocks, from the hidden state the policy's generation captured
    there (:mod:`palate.lm.prefix`): on SmolLM2 with 6 trained blocks, a fifth of a full pass.
    """
    from palate.lm.prefix import decoder_base, response_logits, shared_blocks, suffix_matches

    device = next(policy.parameters()).device
    base = decoder_base(policy)
    start = min(shared_blocks(policy, reference), len(base.layers) - 1) if base is not None else 0
    if start and not suffix_matches(reference, start, int(reference.config.vocab_size), device):
        start = 0
    log.info("KL to the reference: log pi from generation; the reference %s",
             f"from block {start} (blocks below are the policy's)" if start else "runs a full pass")
    batches, texts, kls = [], [], []
    for i in range(0, len(prompt_ids), batch_size):
        b, trace = sample_traced(policy, tokenizer, prompt_ids[i:i + batch_size], max_new_tokens, temperature,
                                 capture_block=start or None, row_seeds=row_seeds[i:i + batch_size])
        batches.append(b)
        texts += decode_responses(tokenizer, b)
        mb = b.to(device)
        with torch.no_grad():
            logits = response_logits(reference, mb, trace.hidden.to(device) if start else None, start)
            ref_logp, _ = logits_to_logprobs(logits, mb.response_ids, temperature)
        del logits
        ref_logp = (ref_logp * mb.response_mask.to(ref_logp.dtype)).cpu()
        kls += (trace.logprobs - ref_logp).sum(1).tolist()
    return batches, texts, kls


def _shard(n: int, accelerator: Any) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that this process evaluates: contiguous, in rank order, the last may be short."""
    if accelerator is None or accelerator.num_processes == 1:
        return 0, n
    per = -(-n // accelerator.num_processes)
    rank = accelerator.process_index
    return min(rank * per, n), min((rank + 1) * per, n)


def _gather(accelerator: Any, items: list[Any]) -> list[Any]:
    """Every process's ``items``, concatenated in rank order (the rows of :func:`_shard`), on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return list(gather_object(items))


def _perplexity(model: torch.nn.Module, blocks: torch.Tensor, accelerator: Any, batch_size: int = 8) -> float:
    """exp(mean token NLL) over ``blocks``, each process taking its shard of the blocks."""
    lo, hi = _shard(len(blocks), accelerator)
    parts = _gather(accelerator, [nll_sum(model, blocks[lo:hi], batch_size)])
    return float(np.exp(sum(t for t, _ in parts) / max(sum(c for _, c in parts), 1)))


@torch.no_grad()
def evaluate_models(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    encode_prompt: Callable[[str], list[int]],
    judge: Any,
    reward_fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    samples_per_prompt: int = 1,
    batch_size: int = 32,
    ppl_blocks: torch.Tensor | None = None,
    extra_scorers: dict[str, Callable[[Sequence[str], Sequence[str]], Any]] | None = None,
    seed: int = 0,
    accelerator: Any = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """All evaluation numbers for ``policy`` vs ``reference`` on ``prompts``, and the samples.

    Both models answer the same (prompt, repeat) list; the reference's KL-to-itself is 0 by
    definition, so only the policy's samples are scored under both models for the KL. Each
    completion is sampled from its own generator, seeded by ``seed`` and its place in that list
    (:func:`palate.lm.generation.row_seed`), so under ``accelerate launch`` (an ``accelerator`` of
    N processes) each process samples its shard of the list and, gathered, the completions,
    verdicts and metrics are the ones a single process computes.
    """
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    ids = [encode_prompt(p) for p in flat]
    lo, hi = _shard(len(ids), accelerator)
    seed_everything(seed)
    pol_batches, pol_texts, kls = _policy_kl(policy, reference, tokenizer, ids[lo:hi], max_new_tokens, temperature,
                                             batch_size, [row_seed(seed, 0, i) for i in range(lo, hi)])
    ref_batches, ref_texts = sample_batches(reference, tokenizer, ids[lo:hi], max_new_tokens, temperature,
                                            batch_size, row_seeds=[row_seed(seed, 1, i) for i in range(lo, hi)])

    def rows(batches: list[Any], attr: str) -> list[Any]:
        return [v for b in batches for v in (getattr(b, attr).sum(1) if attr == "response_mask"
                                             else getattr(b, attr)).tolist()]

    pol_texts, ref_texts = _gather(accelerator, pol_texts), _gather(accelerator, ref_texts)
    kl = torch.tensor(_gather(accelerator, kls), dtype=torch.float32)
    pol_len = torch.tensor(_gather(accelerator, rows(pol_batches, "response_mask")))
    ref_len = torch.tensor(_gather(accelerator, rows(ref_batches, "response_mask")))
    pol_ended = torch.tensor(_gather(accelerator, rows(pol_batches, "ended")), dtype=torch.bool)
    ref_ended = torch.tensor(_gather(accelerator, rows(ref_batches, "ended")), dtype=torch.bool)

    rng = np.random.default_rng(seed)
    wr, outcomes = win_rate(judge, flat, pol_texts, ref_texts, rng)
    pol_reward = np.asarray(reward_fn(flat, pol_texts), dtype=float)
    ref_reward = np.asarray(reward_fn(flat, ref_texts), dtype=float)
    n = len(outcomes)
    metrics: dict[str, Any] = {
        "win_rate": wr,
        "win_rate_stderr": float(np.std(outcomes) / np.sqrt(n)) if n > 1 else float("nan"),
        "n_comparisons": n,
        "judge": getattr(judge, "name", type(judge).__name__),
        "reward": float(pol_reward.mean()),
        "reward_reference": float(ref_reward.mean()),
        "kl": float(kl.mean()),
        "kl_stderr": float(kl.std() / np.sqrt(len(kl))) if len(kl) > 1 else float("nan"),
        "judge_score": float(np.mean([judge.score(p, t) for p, t in zip(flat, pol_texts)])) if hasattr(judge, "score") else None,
        "judge_score_reference": float(np.mean([judge.score(p, t) for p, t in zip(flat, ref_texts)])) if hasattr(judge, "score") else None,
    }
    metrics.update({f"policy/{k}": v for k, v in _text_stats(pol_texts, pol_len, pol_ended).items()})
    metrics.update({f"reference/{k}": v for k, v in _text_stats(ref_texts, ref_len, ref_ended).items()})
    for name, scorer in (extra_scorers or {}).items():
        metrics[f"{name}"] = float(torch.as_tensor(scorer(flat, pol_texts)).float().mean())
        metrics[f"{name}_reference"] = float(torch.as_tensor(scorer(flat, ref_texts)).float().mean())
    if ppl_blocks is not None:
        metrics["perplexity"] = _perplexity(policy, ppl_blocks, accelerator)
        metrics["perplexity_reference"] = _perplexity(reference, ppl_blocks, accelerator)
        metrics["alignment_tax_ppl_ratio"] = metrics["perplexity"] / metrics["perplexity_reference"]
    samples = [{"prompt": p, "policy": a, "reference": b, "policy_reward": float(ra), "reference_reward": float(rb),
                "held_out_prefers": {1.0: "policy", 0.0: "reference", 0.5: "tie"}[o], "kl": float(k)}
               for p, a, b, ra, rb, o, k in zip(flat, pol_texts, ref_texts, pol_reward, ref_reward, outcomes, kl.tolist())]
    return metrics, samples


def _run_settings(run: Path) -> dict[str, Any]:
    """The PPO config of a run directory, or {} for a plain model directory."""
    try:
        return read_run_config(run)
    except CheckpointError:
        return {}


def eval_out_dir(cfg: EvalConfig) -> Path:
    """Where an evaluation writes: ``cfg.out``, else ``<run>/eval`` for a run dir, else ``runs/eval``."""
    run = Path(cfg.run)
    return Path(cfg.out) if cfg.out else (run / "eval" if (run / "config.yaml").is_file() else Path("runs") / "eval")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.run`` against its reference; writes ``summary.json`` and ``samples.jsonl``.

    With ``cfg.judge == "human"`` people also judge the same pairs (:mod:`palate.lm.human_eval`),
    and ``summary.json`` gains their verdicts in a ``human`` block.
    """
    from palate.data.tasks import load_task
    from palate.lm.formatting import encode_prompt_completion
    from palate.lm.models import load_model
    from palate.lm.pretrain_text import load_corpus, pack_tokens, split_corpus

    cfg.validate()
    if cfg.judge == "human":
        from palate.lm.human_eval import evaluate_with_people

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("eval --judge human posts tasks to the feedback service from one process: run it "
                              "without accelerate launch (the labeller's part is cheap next to people's)")

        return evaluate_with_people(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    run = Path(cfg.run)
    settings = _run_settings(run)
    reference_name = cfg.reference or settings.get("reference") or settings.get("policy")
    if not reference_name:
        raise CheckpointError(f"{run} is not a PPO run, so give the SFT model to compare with: --reference DIR")
    task = load_task(cfg.task or settings.get("task") or "sentiment")
    chat = task.chat if settings.get("chat") is None else bool(settings["chat"])
    max_new_tokens = cfg.max_new_tokens or settings.get("max_new_tokens") or task.max_new_tokens
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device)
    from palate.lm.training import make_accelerator

    # One process, or each of `accelerate launch`'s: it samples its shard of the pairs (see evaluate_models).
    accelerator = make_accelerator(cpu=device == "cpu")
    if accelerator.num_processes > 1:
        device = str(accelerator.device)
    t0 = time.perf_counter()
    policy, tokenizer = load_model(str(run), device=device)
    reference, _ = load_model(reference_name, device=device)
    policy.eval()
    reference.eval()
    prompts = task.prompts(cfg.split)  # type: ignore[arg-type]
    if cfg.n_prompts:
        prompts = prompts[: cfg.n_prompts]
    max_prompt = int(settings.get("max_prompt_length", 128))

    def encode_prompt(p: str) -> list[int]:
        return encode_prompt_completion(tokenizer, p, "", chat, max_prompt, add_eos=False)["input_ids"]

    _, held_docs = split_corpus(load_corpus(cfg.ptx_corpus))
    blocks = pack_tokens(tokenizer, held_docs, cfg.ptx_block_size)
    if cfg.max_ppl_blocks:
        blocks = blocks[: cfg.max_ppl_blocks]
    extra = {}
    if cfg.reward_model:
        from palate.lm.reward_model import RewardModel

        rm = RewardModel.from_pretrained(cfg.reward_model, device=device)
        extra["rm_score"] = lambda p, c: rm.score_texts(list(p), list(c), tokenizer, batch_size=16)
    metrics, samples = evaluate_models(
        policy, reference, tokenizer, prompts, encode_prompt, task.panel.held_out, task.reward_fn,
        max_new_tokens=max_new_tokens, temperature=cfg.temperature, samples_per_prompt=cfg.samples_per_prompt,
        batch_size=cfg.batch_size, ppl_blocks=blocks, extra_scorers=extra, seed=cfg.seed, accelerator=accelerator)
    metrics.update({"policy_model": str(run), "reference_model": str(reference_name), "task": task.name,
                    "split": cfg.split, "max_new_tokens": max_new_tokens, "num_processes": accelerator.num_processes,
                    "wall_s": time.perf_counter() - t0})
    if accelerator.is_main_process:  # the main process writes the files
        out = eval_out_dir(cfg)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "samples.jsonl", "".join(json.dumps(row) + "\n" for row in samples))
        atomic_write_json(out / "summary.json", metrics)
        log.info("win rate vs SFT (held-out labeller) %.3f +- %.3f, KL %.2f nats, reward %.3f (SFT %.3f)",
                 metrics["win_rate"], metrics["win_rate_stderr"], metrics["kl"], metrics["reward"],
                 metrics["reward_reference"])
    # Every process leaves together: one that exited while another still used the process group
    # would take gloo's threads down with it (std::terminate).
    accelerator.wait_for_everyone()
    return metrics
