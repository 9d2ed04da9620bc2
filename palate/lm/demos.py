"""Synthetic data from the labeller panel: demonstrations for SFT and comparisons for the reward model.

* ``palate lm demos``: best-of-N demonstrations. For each prompt, sample N completions from a model
  and keep the one the panel's training labellers like best (mean utility). This is a *stand-in
  for human demonstrations*: InstructGPT's contractors wrote answers; we can only select among
  what the base model already writes, so SFT on these is a distillation of best-of-N sampling.
* ``palate lm label``: comparisons. For each prompt, sample K completions from the policy (the SFT
  model, as in InstructGPT) and have labellers rank them (Plackett-Luce noise at each labeller's
  temperature). ``labellers: train`` assigns one training labeller per prompt in turn, like the
  contractors (``redundancy: R``: the next R in turn, each answer its own line); ``labellers: all``
  has every labeller, the held-out one included, rank the same samples, which is what validation
  sets need for per-labeller and held-out accuracy.
  ``labeller: human`` asks people instead, through the feedback service
  (:mod:`palate.lm.human_label`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import numpy as np

from palate.config import doc_field
from palate.data.formats import Comparison, SFTExample, write_comparisons, write_sft
from palate.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DemosConfig:
    """Best-of-N demonstrations judged by the panel: ``palate lm demos``."""

    model: str = doc_field("smollm2-135m-instruct", "model that samples the candidates")
    task: str = doc_field("sentiment", "built-in task (sentiment|instruct)")
    split: Literal["train", "validation", "test"] = doc_field("train", "prompt split")
    limit: int = doc_field(0, "use the first this many prompts (0: all)")
    n: int = doc_field(4, "candidates sampled per prompt (N of best-of-N)")
    max_new_tokens: int = doc_field(0, "tokens per candidate (0: the task's default)")
    temperature: float = doc_field(1.0, "sampling temperature")
    top_p: float = doc_field(1.0, "nucleus sampling mass")
    batch_size: int = doc_field(16, "prompts per generation batch")
    out: str = doc_field("data/demos.jsonl", "output JSONL of {prompt, response, score}")
    seed: int = doc_field(0, "sampling seed")
    cache_dir: str = doc_field("", "where converted GGUF models are cached")


@dataclasses.dataclass
class LabelConfig:
    """Comparisons of K policy samples per prompt, labelled by the panel: ``palate lm label``."""

    model: str = doc_field("smollm2-135m-instruct", "policy that samples the K completions (an SFT run)")
    task: str = doc_field("sentiment", "built-in task (sentiment|instruct)")
    split: Literal["train", "validation", "test"] = doc_field("train", "prompt split")
    limit: int = doc_field(0, "use the first this many prompts (0: all)")
    k: int = doc_field(4, "completions per prompt (2..9)")
    format: Literal["ranking", "best_of_k", "pair"] = doc_field(
        "ranking", "ranking (InstructGPT), best_of_k (Ziegler) or pair (best vs worst of K)")
    labellers: Literal["train", "all", "held_out"] = doc_field(
        "train", "train: one training labeller per prompt in turn; all: every labeller ranks every "
        "prompt (validation sets); held_out: only the held-out labeller (synthetic panel only)")
    labeller: Literal["synthetic", "human"] = doc_field(
        "synthetic", "who ranks: the task's synthetic panel, or people through the feedback service")
    mode: Literal["rank", "best"] = doc_field(
        "rank", "human labeller: people order all K (rank, written as rankings) or pick the best (best, "
        "written as best_of_k)")
    redundancy: int = doc_field(
        1, "labellers asked per comparison, each answer its own line: people (human labeller), or with "
        "labellers: train the next training labellers in turn, each with its own noise (4 = every one of the "
        "sentiment panel's): more labels on the same samples, at no sampling cost")
    feedback_url: str = doc_field("http://127.0.0.1:8000", "human labeller: the feedback service")
    feedback_token_env: str = doc_field("PALATE_FEEDBACK_TOKEN", "human labeller: env var holding the admin token")
    feedback_project: str | None = doc_field(None, "human labeller: feedback project the tasks go to")
    feedback_run: str = doc_field(
        "", "human labeller: names this round in the tasks' external ids (default: <task>-<split>-s<seed>)")
    label_wait_s: float = doc_field(
        0.0, "human labeller: longest wait for all answers before stopping with how to resume (0: no limit)")
    poll_s: float = doc_field(2.0, "human labeller: seconds between reads of new answers")
    max_new_tokens: int = doc_field(0, "tokens per completion (0: the task's default)")
    temperature: float = doc_field(1.0, "sampling temperature")
    top_p: float = doc_field(1.0, "nucleus sampling mass")
    batch_size: int = doc_field(16, "prompts per generation batch")
    out: str = doc_field("data/comparisons.jsonl", "output comparisons JSONL")
    seed: int = doc_field(0, "sampling and labelling-noise seed")
    cache_dir: str = doc_field("", "where converted GGUF models are cached")

    def validate(self) -> None:
        if not 2 <= self.k <= 9:
            raise ConfigError(f"label: k must be in 2..9, got {self.k}")
        if self.labeller == "human":
            if self.format == "pair":
                raise ConfigError("label: people answer rank tasks; for pairs use --k 2 (and the default "
                                  "--format ranking), not --format pair")
            if self.format == "best_of_k" and self.mode == "rank":
                raise ConfigError("label: --format best_of_k with --mode rank; for people say --mode best (best-of-K "
                                  "tasks, written as best_of_k): --format is the synthetic panel's")
            if self.redundancy < 1 or self.label_wait_s < 0 or self.poll_s <= 0:
                raise ConfigError("label: redundancy must be >= 1, label_wait_s >= 0 and poll_s > 0")
        elif self.redundancy < 1:
            raise ConfigError(f"label: redundancy must be >= 1 (labellers per comparison), got {self.redundancy}")
        elif self.redundancy > 1 and self.labellers != "train":
            raise ConfigError(f"label: redundancy {self.redundancy} asks for several training labellers per prompt, "
                              f"but labellers: {self.labellers} already names who ranks; use labellers: train")


def candidate_stream(kind: str, split: str) -> int:
    """The :func:`palate.lm.generation.row_seed` stream of a stage's candidates (``kind`` demos or label).

    Distinct per stage and split, so the label stage's SFT samples do not reuse the noise that drew
    the demonstrations the SFT model was trained on, and a validation set is not a copy of the training one.
    """
    from palate.lm.generation import named_stream

    return named_stream(f"candidates/{kind}/{split}")


def _candidates(model_name: str, cache_dir: str, task_name: str, split: str, limit: int, n: int,
                max_new_tokens: int, temperature: float, top_p: float, batch_size: int,
                seed: int, kind: str = "label") -> tuple[object, list[str], list[list[str]]]:
    """``(task, prompts, [n completions per prompt])`` sampled from ``model_name``.

    At top-p 1 (the default) completion ``j`` of prompt ``i`` draws from its own generator,
    seeded by ``seed``, the stage and its place ``i * n + j`` (:func:`palate.lm.generation.row_seed`):
    the completions do not depend on ``batch_size``, so a larger batch is only faster, and a restart that resamples a prompt gets the
    same K completions. Nucleus sampling (top-p < 1) draws from torch's global generator instead.
    """
    from tqdm.auto import tqdm

    from palate.data.tasks import load_task
    from palate.lm.formatting import encode_prompt_completion
    from palate.lm.generation import decode_responses, row_seed, sample
    from palate.lm.models import load_model
    from palate.lm.sft import sample_completions
    from palate.runs import seed_everything

    task = load_task(task_name)
    prompts = task.prompts(split)  # type: ignore[arg-type]
    if limit:
        prompts = prompts[:limit]
    seed_everything(seed)
    model, tokenizer = load_model(model_name, cache_dir=cache_dir or None)
    tokens = max_new_tokens or task.max_new_tokens
    flat = [p for p in prompts for _ in range(n)]
    outs: list[str] = []
    row_seeded = top_p == 1.0 and temperature > 0
    if row_seeded:
        ids = [encode_prompt_completion(tokenizer, p, "", task.chat, 256, add_eos=False)["input_ids"] for p in flat]
        stream = candidate_stream(kind, split)
        seeds = [row_seed(seed, stream, i) for i in range(len(flat))]
    for start in tqdm(range(0, len(flat), batch_size), desc="sampling", unit="batch"):
        if row_seeded:
            batch = sample(model, tokenizer, ids[start:start + batch_size], tokens, temperature,
                           row_seeds=seeds[start:start + batch_size])
            outs.extend(decode_responses(tokenizer, batch))
        else:
            outs.extend(sample_completions(model, tokenizer, flat[start:start + batch_size], chat=task.chat,
                                           max_new_tokens=tokens, batch_size=batch_size,
                                           temperature=temperature, top_p=top_p))
    grouped = [outs[i * n:(i + 1) * n] for i in range(len(prompts))]
    return task, prompts, grouped


def build_demonstrations(cfg: DemosConfig) -> Path:
    """Write best-of-N demonstrations (judged by the training labellers' mean utility) to ``cfg.out``."""
    task, prompts, grouped = _candidates(cfg.model, cfg.cache_dir, cfg.task, cfg.split, cfg.limit, cfg.n,
                                         cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size, cfg.seed,
                                         "demos")
    judges = task.panel.train_labellers  # type: ignore[attr-defined]
    examples = []
    for prompt, cands in zip(prompts, grouped):
        scores = [float(np.mean([j.score(prompt, c) for j in judges])) for c in cands]
        best = int(np.argmax(scores))
        examples.append(SFTExample(prompt=prompt, completion=cands[best] if cands[best].strip() else cands[best] + ".",
                                   meta={"score": round(scores[best], 4), "source": f"best-of-{cfg.n}"}))
    path = write_sft(cfg.out, examples)
    log.info("wrote %d demonstrations to %s", len(examples), path)
    return path


def label_comparisons(cfg: LabelConfig) -> Path:
    """Sample K completions per prompt and write the panel's (or people's) comparisons to ``cfg.out``."""
    cfg.validate()
    if cfg.labeller == "human":
        from palate.lm.human_label import label_with_people

        return label_with_people(cfg)
    task, prompts, grouped = _candidates(cfg.model, cfg.cache_dir, cfg.task, cfg.split, cfg.limit, cfg.k,
                                         cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size, cfg.seed,
                                         "label")
    panel = task.panel  # type: ignore[attr-defined]
    rng = np.random.default_rng(cfg.seed)
    comps: list[Comparison] = []
    for i, (prompt, cands) in enumerate(zip(prompts, grouped)):
        if cfg.labellers == "train":  # prompt i's labellers: i*R, i*R+1, ... in turn (R = redundancy)
            train = panel.train_labellers
            who = [train[(i * cfg.redundancy + r) % len(train)] for r in range(cfg.redundancy)]
        elif cfg.labellers == "held_out":
            who = [panel.held_out]
        else:
            who = list(panel.labellers)
        for lab in who:
            if cfg.format == "best_of_k":
                best = lab.best_of(prompt, cands, rng)
                ranks = [0 if j == best else 1 for j in range(len(cands))]
                comps.append(Comparison(prompt, list(cands), ranks, "best_of_k", best=best, labeller=lab.name))
                continue
            ranks = lab.compare(prompt, cands, rng)
            if len(set(ranks)) < 2:
                continue  # every completion identical: no preference to record
            if cfg.format == "pair":
                top, bottom = int(np.argmin(ranks)), int(np.argmax(ranks))
                comps.append(Comparison(prompt, [cands[top], cands[bottom]], [0, 1], "pair", labeller=lab.name))
            else:
                comps.append(Comparison(prompt, list(cands), ranks, "ranking", labeller=lab.name))
    path = write_comparisons(cfg.out, comps)
    log.info("wrote %d comparisons to %s", len(comps), path)
    return path
