"""Diagnostic: how much held-out accuracy do a task's comparisons allow a reward model?

The reward-model benchmark (:mod:`palate.bench.lm_sft_rm`) asks for 75% accuracy on the held-out
labeller's ``sentiment`` judgements. This script measures what bounds that figure, on the same
comparison files, without training the transformer:

* **Ceilings.** The held-out labeller answers with Gumbel noise, so even its own noiseless utility
  does not order every pair it labelled the way it did. That utility's accuracy is the best any
  reward model can score; VADER's compound score alone is the best a pure sentiment model can.
* **Frozen representations.** The base model's hidden states are extracted once (at the last real
  token, as the reward model reads them, and mean-pooled over the completion) at several layers,
  and a linear Bradley-Terry head is fitted on the training pairs (L2-regularised). With
  ``--relabel R`` the training prompts are instead ranked R times by randomly drawn training
  labellers, which separates label noise (fixed by more labels per prompt) from the number of
  distinct texts (fixed only by more samples).

``python -m palate.bench.rm_ceiling --train T.jsonl --val V.jsonl --out DIR`` writes
``rm_ceiling.json`` and prints one line per probe. Feature extraction runs the model once over every
distinct text (about 4 minutes for 1,600 texts on one core); the probes take seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from palate.runs import atomic_write_json

Pair = tuple[int, int, str]


def _read(path: Path) -> list[dict[str, Any]]:
    from palate.data.formats import read_comparisons

    return [{"prompt": c.prompt, "completions": list(c.completions), "ranks": list(c.ranks),
             "labeller": c.labeller or ""} for c in read_comparisons(path)]


def _pairs(ids: Sequence[int], ranks: Sequence[int], labeller: str) -> list[Pair]:
    """(winner, loser, labeller) for every strictly ordered pair of one ranking."""
    out = []
    for a, b in itertools.combinations(range(len(ids)), 2):
        if ranks[a] < ranks[b]:
            out.append((ids[a], ids[b], labeller))
        elif ranks[b] < ranks[a]:
            out.append((ids[b], ids[a], labeller))
    return out


@torch.no_grad()
def extract_features(model: Any, tokenizer: Any, texts: Sequence[tuple[str, str]], layers: Sequence[int],
                     chat: bool, max_length: int = 128, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """``{"last<L>": [N, H], "mean<L>": [N, H]}``: hidden states of layer L per (prompt, completion)."""
    from palate.core.stats import masked_mean
    from palate.lm.formatting import (
        encode_prompt_completion,
        last_token_index,
        pad_batch,
        position_ids_from_mask,
    )

    backbone = model.get_decoder()
    feats: dict[str, list[torch.Tensor]] = {f"{kind}{layer}": [] for layer in layers for kind in ("last", "mean")}
    for start in range(0, len(texts), batch_size):
        enc = [encode_prompt_completion(tokenizer, p, c, chat, max_length) for p, c in texts[start:start + batch_size]]
        batch = pad_batch(enc, tokenizer.pad_token_id or 0)
        out = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=position_ids_from_mask(batch["attention_mask"]),
                       output_hidden_states=True, use_cache=False)
        rows = torch.arange(batch["input_ids"].shape[0])
        idx = last_token_index(batch["attention_mask"])
        on_completion = batch["completion_mask"].unsqueeze(-1)
        for layer in layers:
            h = out.hidden_states[layer]
            feats[f"last{layer}"].append(h[rows, idx])
            feats[f"mean{layer}"].append(masked_mean(h, on_completion, dim=1))
    return {k: torch.cat(v).float() for k, v in feats.items()}


def fit_probe(x: torch.Tensor, train: Sequence[Pair], weight_decay: float, steps: int = 400) -> torch.Tensor:
    """Scores ``x @ w`` of a linear Bradley-Terry head fitted on ``train`` (standardised features)."""
    from palate.core.preference import pairwise_loss

    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=1e-2)
    win = torch.tensor([p[0] for p in train])
    lose = torch.tensor([p[1] for p in train])
    for _ in range(steps):
        opt.zero_grad()
        r = x @ w
        loss = pairwise_loss(r[win], r[lose]) + weight_decay * (w ** 2).sum()
        loss.backward()
        opt.step()
    return (x @ w).detach()


def accuracy(scores: Sequence[float] | torch.Tensor, pairs: Sequence[Pair]) -> float:
    """Fraction of ``pairs`` whose winner scores strictly higher."""
    return float(np.mean([float(scores[a] > scores[b]) for a, b, _ in pairs])) if pairs else float("nan")


def run(train_path: Path, val_path: Path, out_dir: Path, task_name: str = "sentiment",
        layers: Sequence[int] = (10, 20, 30), relabel: Sequence[int] = (0, 4, 16),
        weight_decays: Sequence[float] = (0.01, 0.1), model_name: str = "smollm2-135m-instruct",
        seed: int = 0) -> dict[str, Any]:
    """Ceilings and frozen-probe accuracies; writes ``out_dir/rm_ceiling.json``."""
    from palate.data.tasks import load_task, vader_compound
    from palate.lm.models import load_model

    task = load_task(task_name)
    train, val = _read(train_path), _read(val_path)
    index: dict[tuple[str, str], int] = {}
    for rec in train + val:
        for c in rec["completions"]:
            index.setdefault((rec["prompt"], c), len(index))
    texts = list(index)
    ids = lambda rec: [index[(rec["prompt"], c)] for c in rec["completions"]]  # noqa: E731
    val_pairs = [p for rec in val for p in _pairs(ids(rec), rec["ranks"], rec["labeller"])]
    held = [p for p in val_pairs if p[2] == task.panel.held_out_name]
    result: dict[str, Any] = {
        "train": str(train_path), "val": str(val_path), "texts": len(texts), "val_pairs": len(val_pairs),
        "held_out_pairs": len(held),
        "ceiling_held_out_utility": accuracy([task.panel.held_out.score(p, c) for p, c in texts], held),
        "ceiling_vader": accuracy([vader_compound(c) for _, c in texts], held),
        "probes": [],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "probes"}), flush=True)
    start = time.perf_counter()
    model, tokenizer = load_model(model_name)
    model.eval()
    feats = extract_features(model, tokenizer, texts, layers, task.chat)
    result["feature_seconds"] = round(time.perf_counter() - start, 1)
    rng = np.random.default_rng(seed)
    labellers = task.panel.train_labellers
    for r in relabel:
        if r == 0:
            train_pairs = [p for rec in train for p in _pairs(ids(rec), rec["ranks"], rec["labeller"])]
        else:
            train_pairs = []
            for rec in train:
                for _ in range(r):
                    lab = labellers[int(rng.integers(len(labellers)))]
                    train_pairs += _pairs(ids(rec), lab.compare(rec["prompt"], rec["completions"], rng), lab.name)
        for name, x in feats.items():
            for wd in weight_decays:
                scores = fit_probe(x, train_pairs, wd)
                row = {"features": name, "relabel": r, "train_pairs": len(train_pairs), "weight_decay": wd,
                       "val_acc": accuracy(scores, val_pairs), "held_out_acc": accuracy(scores, held)}
                result["probes"].append(row)
                print(json.dumps(row), flush=True)
    atomic_write_json(out_dir / "rm_ceiling.json", result)  # a killed run never leaves half a file
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m palate.bench.rm_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="training rankings JSONL (palate lm label)")
    parser.add_argument("--val", type=Path, required=True, help="validation rankings JSONL, held-out labeller included")
    parser.add_argument("--out", type=Path, required=True, help="directory for rm_ceiling.json")
    parser.add_argument("--task", default="sentiment", help="built-in task whose panel labelled the files")
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 20, 30], help="hidden-state layers to probe")
    parser.add_argument("--relabel", type=int, nargs="+", default=[0, 4, 16],
                        help="0: the files' labels; R: rank each training prompt R times by random training labellers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run(args.train, args.val, args.out, args.task, args.layers, args.relabel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
