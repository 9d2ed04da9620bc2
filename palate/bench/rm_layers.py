"""Which block should the reward model's heads read? Held-out accuracy per block, on pipeline runs.

The pipeline's reward model (``rm.features_layer: L``) fits bootstrap Bradley-Terry heads on the
completion's mean hidden state after block L of the SFT model. This probe repeats exactly that fit
(:mod:`palate.lm.reward_features`: the same L2 grid chosen by the training labellers' validation
accuracy, the same ensemble) on the features of every block asked for, and of concatenations, for
the rankings of one or more finished pipeline runs, and reports the held-out labeller's accuracy on
each run's validation rankings. One forward pass per text gives every block at once.

``python -m palate.bench.rm_layers runs/sentiment-cpu-s0 runs/sentiment-cpu-s1 --out DIR`` writes
``rm_layers.json`` and prints the table (about 3 minutes per run of 1,300 texts on one core).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from palate.lm.reward_model import POOLS, pool_hidden
from palate.runs import atomic_write_json


@torch.inference_mode()
def block_features(rm: Any, tokenizer: Any, texts: Sequence[tuple[str, str]], blocks: Sequence[int],
                   batch_size: int = 32, pool: str = "mean") -> dict[int, torch.Tensor]:
    """``{block: [N, hidden]}``: the feature a reward model cut after each block reads.

    ``rm`` is a :class:`palate.lm.reward_model.RewardModel` over the whole backbone; a model cut after
    block L applies the final norm to block L's output, so the same norm is applied here. ``pool``:
    ``mean`` over the completion's tokens (the pipeline's reading), the ``last`` real token, or
    ``mean+last`` (both, concatenated: ``[N, 2 * hidden]``).
    """
    from palate.lm.generation import position_ids_from_mask

    if pool not in POOLS:
        raise ValueError(f"rm_layers: pool must be one of {POOLS}, got {pool!r}")

    n_layers = len(rm.backbone.layers)
    bad = [b for b in blocks if not 1 <= b <= n_layers]
    if bad:
        raise ValueError(f"rm_layers: blocks {bad} are outside 1..{n_layers} for this model")
    norm = rm.backbone.norm
    out: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        batch = rm.encode_texts([p for p, _ in chunk], [c for _, c in chunk], tokenizer)
        hidden = rm.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False,
                             output_hidden_states=True).hidden_states
        for b in blocks:
            h = hidden[b] if b < n_layers else hidden[-1]  # hidden_states[-1] is already normed
            h = norm(h) if b < n_layers else h
            out[b].append(pool_hidden(h.float(), batch["attention_mask"], batch["completion_mask"], pool))
    return {b: torch.cat(v) for b, v in out.items()}


def held_out_accuracy(x: torch.Tensor, keys: Sequence[tuple[str, str]], train: Sequence[Any], val: Sequence[Any],
                      held_out: str, weight_decays: Sequence[float] = (0.1, 0.3, 1.0, 3.0), ensemble: int = 5,
                      steps: int = 400, seed: int = 0) -> dict[str, float]:
    """The pipeline's head fit on features ``x`` (rows in ``keys`` order): chosen L2 and held-out accuracy."""
    from palate.lm.reward_features import (
        FeatureCache,
        _selection_accuracy,
        comparison_batch,
        comparison_metrics,
        fit_ensemble,
        fit_head,
    )

    cache = FeatureCache(keys, x)
    train_b, val_b = comparison_batch(train, cache), comparison_batch(val, cache)
    tried = {}
    for wd in weight_decays:
        w, c = fit_head(x, train_b, wd, steps)
        tried[wd] = _selection_accuracy((x @ w + c)[val_b["idx"]], val_b, held_out)
    chosen = max(tried, key=lambda wd: (tried[wd], wd))
    weight, bias = fit_ensemble(x, train_b, ensemble, chosen, steps, seed)
    m = comparison_metrics((x @ weight.T + bias).mean(-1)[val_b["idx"]], val_b, held_out)
    return {"weight_decay": chosen, "held_out_accuracy": m.get("rm/held_out_accuracy", float("nan")),
            "val_accuracy": m["rm/val_accuracy"]}


def probe_run(run: Path, blocks: Sequence[int], combos: Sequence[Sequence[int]],
              pool: str = "mean") -> dict[str, dict[str, float]]:
    """Held-out accuracy of each block (and each concatenation in ``combos``) on one pipeline run."""
    from palate.data.formats import read_comparisons
    from palate.data.tasks import load_task
    from palate.lm.models import load_model
    from palate.lm.reward_model import RewardModel

    train = read_comparisons(run / "label" / "comparisons.jsonl")
    val = read_comparisons(run / "label" / "val.jsonl")
    settings = json.loads((run / "pipeline.json").read_text()) if (run / "pipeline.json").is_file() else {}
    task = load_task(settings.get("task", "sentiment"))
    rm_cfg = settings.get("rm", {}) if isinstance(settings.get("rm"), dict) else {}
    base, tokenizer = load_model(str(run / "sft" / "model"))
    rm = RewardModel.from_causal_lm(base, chat=task.chat, max_length=int(rm_cfg.get("max_length", 96)), n_heads=1,
                                    pool="mean")
    rm.eval()
    keys = list(dict.fromkeys((c.prompt, y) for c in list(train) + list(val) for y in c.completions))
    needed = sorted(set(blocks) | {b for combo in combos for b in combo})
    feats = block_features(rm, tokenizer, keys, needed, pool=pool)
    held_out = task.panel.held_out.name
    rows = {f"block {b}": held_out_accuracy(feats[b], keys, train, val, held_out) for b in blocks}
    if pool == "mean+last":  # each half alone too, from the same forward passes
        half = feats[blocks[0]].shape[1] // 2 if blocks else 0
        for b in blocks:
            rows[f"block {b}, mean alone"] = held_out_accuracy(feats[b][:, :half], keys, train, val, held_out)
            rows[f"block {b}, last token alone"] = held_out_accuracy(feats[b][:, half:], keys, train, val, held_out)
    for combo in combos:
        x = torch.cat([feats[b] for b in combo], 1)
        rows["blocks " + " + ".join(map(str, combo))] = held_out_accuracy(x, keys, train, val, held_out)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m palate.bench.rm_layers", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished pipeline run directories (runs/NAME)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 12, 16, 20, 24, 30], help="blocks to probe")
    parser.add_argument("--combine", nargs="*", default=["16,20,24", "12,20,30"],
                        help="comma-separated blocks whose features are concatenated")
    parser.add_argument("--pool", choices=POOLS, default="mean",
                        help="how the completion's hidden states are read (the pipeline reads the mean); "
                        "mean+last also reports each half alone")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/rm-layers"), help="directory for rm_layers.json")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not (run / "label" / "comparisons.jsonl").is_file() or not (run / "sft" / "model").is_dir():
            parser.error(f"{run} is not a finished pipeline run (needs label/comparisons.jsonl, label/val.jsonl "
                         "and sft/model): run palate lm pipeline first")
    combos = [[int(b) for b in c.split(",")] for c in args.combine]
    results = {str(run): probe_run(run, args.blocks, combos, args.pool) for run in args.runs}
    names = list(next(iter(results.values())))
    print("| features | " + " | ".join(r.name for r in args.runs) + " | mean |")
    print("|---|" + "---|" * (len(args.runs) + 1))
    for name in names:
        accs = [results[str(r)][name]["held_out_accuracy"] for r in args.runs]
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {np.mean(accs):.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "rm_layers.json", {"runs": results, "blocks": args.blocks, "combine": combos,
                                                     "pool": args.pool})
    print(json.dumps({"out": str(args.out / "rm_layers.json")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
