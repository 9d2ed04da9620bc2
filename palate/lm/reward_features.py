"""Reward heads on frozen features: a reward model fitted in seconds, refitted as labels arrive.

Fine-tuning a 135M-parameter backbone on a few hundred rankings costs minutes on a CPU and, with
that little data, generalises worse than a linear read-out of what the pretrained model already
represents (``palate.bench.rm_ceiling`` measures both). So ``palate lm rm`` with
``features_layer: L`` keeps the backbone frozen, cut after block L, and

1. runs it once over every distinct (prompt, completion) of the comparisons, keeping the mean hidden
   state over the completion's tokens (:class:`FeatureCache`);
2. fits linear Bradley-Terry heads on those features with the same losses as the fine-tuned model
   (:func:`palate.lm.reward.comparison_loss`: ranking, best-of-K, pairs), L2-regularised, the L2
   strength chosen by the *training* labellers' validation accuracy;
3. fits an ensemble of such heads on bootstrap resamples of the comparisons: the reward PPO sees is
   their mean minus ``conservative_k`` times their spread (:meth:`RewardModel.combine`).

Online rounds (:mod:`palate.lm.online`) add the new texts to the cache and refit the heads on all
labels so far, which takes seconds instead of an epoch of fine-tuning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from palate.errors import ModelError

log = logging.getLogger(__name__)

FEATURES_FILE = "features.pt"
Key = tuple[str, str]


class FeatureCache:
    """Pooled features of (prompt, completion) pairs under one frozen reward model, each computed once.

    ``ref`` lists the keys the heads' scores are normalised on (mean 0, std 1), so a refit keeps the
    reward on the scale PPO started with.
    """

    def __init__(self, keys: Sequence[Key] = (), features: torch.Tensor | None = None,
                 ref: Sequence[Key] = ()) -> None:
        self.keys: list[Key] = [tuple(k) for k in keys]  # type: ignore[misc]
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.features = features if features is not None else torch.zeros(0, 0)
        if len(self.keys) != self.features.shape[0]:
            raise ModelError(f"feature cache holds {len(self.keys)} texts but {self.features.shape[0]} feature rows")
        self.ref: list[Key] = [tuple(k) for k in ref]  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.keys)

    @torch.no_grad()
    def ensure(self, rm: Any, tokenizer: Any, texts: Sequence[Key], batch_size: int = 16,
               progress: bool = False) -> torch.Tensor:
        """Row indices of ``texts``, computing the features of those not cached yet."""
        missing = list(dict.fromkeys(tuple(t) for t in texts if tuple(t) not in self.index))
        if missing:
            from tqdm.auto import tqdm

            device = rm.head.weight.device
            was_training = rm.training
            rm.eval()
            rows = []
            bar = tqdm(total=len(missing), desc="rm features", disable=not progress, unit="text")
            try:
                for start in range(0, len(missing), batch_size):
                    chunk = missing[start:start + batch_size]
                    batch = rm.encode_texts([p for p, _ in chunk], [c for _, c in chunk], tokenizer)
                    rows.append(rm.pooled(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                          batch["completion_mask"].to(device)).float().cpu())
                    bar.update(len(chunk))
            finally:
                bar.close()
                rm.train(was_training)
            new = torch.cat(rows)
            self.features = new if len(self) == 0 else torch.cat([self.features, new])
            for k in missing:
                self.index[k] = len(self.keys)
                self.keys.append(k)
        return torch.tensor([self.index[tuple(t)] for t in texts], dtype=torch.long)

    def state(self) -> dict[str, Any]:
        return {"keys": [list(k) for k in self.keys], "features": self.features.float().contiguous(),
                "ref": [list(k) for k in self.ref]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FeatureCache:
        return cls(state["keys"], state["features"], state.get("ref", ()))

    @classmethod
    def load(cls, directory: str | Path) -> FeatureCache:
        """The cache saved beside a reward model (``model/features.pt``); empty if there is none."""
        path = Path(directory) / FEATURES_FILE
        if not path.is_file():
            return cls()
        return cls.from_state(torch.load(path, weights_only=True))


def comparison_batch(comps: Sequence[Any], cache: FeatureCache) -> dict[str, Any]:
    """Comparisons as cache rows: ``idx [B, K]`` plus the ``valid``/``ranks``/``best`` tensors of
    :func:`palate.lm.reward.collate_comparisons` (filler slots repeat the first completion, masked)."""
    k = max((len(c.completions) for c in comps), default=0)
    idx, valid, ranks, best, is_best = [], [], [], [], []
    for c in comps:
        n = len(c.completions)
        rows = [cache.index[(c.prompt, y)] for y in c.completions]
        idx.append(rows + [rows[0]] * (k - n))
        valid.append([True] * n + [False] * (k - n))
        ranks.append(list(c.ranks) + [k] * (k - n))
        best.append(c.best if c.best is not None else -1)
        is_best.append(c.kind == "best_of_k")
    return {"idx": torch.tensor(idx, dtype=torch.long).view(len(comps), k), "valid": torch.tensor(valid).view(len(comps), k),
            "ranks": torch.tensor(ranks).view(len(comps), k), "best": torch.tensor(best),
            "is_best_of_k": torch.tensor(is_best, dtype=torch.bool), "labeller": [c.labeller or "" for c in comps]}


def _rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    return {k: (v[rows] if torch.is_tensor(v) else [v[i] for i in rows.tolist()]) for k, v in batch.items()}


def fit_head(x: torch.Tensor, batch: dict[str, Any], weight_decay: float, steps: int = 400,
             lr: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [H], bias)`` of one linear Bradley-Terry head on raw features ``x [N, H]``.

    Fitted on standardised features (so one L2 strength suits every layer and model), full batch,
    then unstandardised: ``x @ weight + bias`` is the head's raw score, with mean 0 over ``x``'s
    rows used by the batch.
    """
    from palate.lm.reward import comparison_loss

    used = torch.unique(batch["idx"][batch["valid"]])
    mu = x[used].mean(0)
    sd = x[used].std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        r = (z @ w)[batch["idx"]]
        out = comparison_loss(r, batch)
        loss = out["loss_sum"] / out["n"].clamp_min(1.0) + weight_decay * (w * w).sum()
        loss.backward()
        opt.step()
    weight = w.detach() / sd
    return weight, -(weight @ mu)


def fit_ensemble(x: torch.Tensor, batch: dict[str, Any], n_heads: int, weight_decay: float, steps: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [E, H], bias [E])``: one head on all comparisons, or E heads on bootstrap resamples."""
    b = batch["idx"].shape[0]
    gen = torch.Generator().manual_seed(seed)
    weights, biases = [], []
    for _ in range(n_heads):
        rows = torch.arange(b) if n_heads == 1 else torch.randint(0, b, (b,), generator=gen)
        w, c = fit_head(x, _rows(batch, rows), weight_decay, steps)
        weights.append(w)
        biases.append(c)
    return torch.stack(weights), torch.stack(biases)


def comparison_metrics(raw: torch.Tensor, batch: dict[str, Any], held_out: str = "",
                       prefix: str = "rm/val_") -> dict[str, float]:
    """The metrics of :func:`palate.lm.reward.evaluate_comparisons` from scores ``raw [B, K]``."""
    from palate.lm.reward import _expected_calibration_error, comparison_loss

    out = comparison_loss(raw, batch)
    k = raw.shape[1]
    iu = torch.triu_indices(k, k, offset=1)
    ranks, valid = batch["ranks"], batch["valid"]
    ri, rj = ranks[:, iu[0]], ranks[:, iu[1]]
    ok = valid[:, iu[0]] & valid[:, iu[1]] & (ri != rj)
    p = torch.sigmoid(raw[:, iu[0]] - raw[:, iu[1]])
    y = (ri < rj).float()
    correct = ((p > 0.5).float() == y) & ok
    p_all, y_all = p[ok].numpy(), y[ok].numpy()
    metrics = {
        f"{prefix}loss": float(out["loss_sum"] / out["n"].clamp_min(1.0)),
        f"{prefix}accuracy": float(correct.sum() / ok.sum()) if bool(ok.any()) else float("nan"),
        f"{prefix}pairs": float(ok.sum()),
        f"{prefix}ece": _expected_calibration_error(p_all, y_all),
        f"{prefix}brier": float(((p_all - y_all) ** 2).mean()) if p_all.size else float("nan"),
    }
    names = batch["labeller"]
    for name in sorted(set(names)):
        rows = torch.tensor([n == name for n in names])
        if name and bool(ok[rows].any()):
            acc = float(correct[rows].sum() / ok[rows].sum())
            metrics[f"{prefix}accuracy/{name}"] = acc
            if name == held_out:
                metrics["rm/held_out_accuracy"] = acc
    return metrics


def _selection_accuracy(raw: torch.Tensor, batch: dict[str, Any], held_out: str) -> float:
    """Validation accuracy over the *training* labellers' comparisons only (never the held-out one's)."""
    keep = torch.tensor([n != held_out for n in batch["labeller"]])
    if not bool(keep.any()):
        return float("nan")
    return comparison_metrics(raw[keep], _rows(batch, torch.nonzero(keep).view(-1)), "")["rm/val_accuracy"]


def apply_heads(rm: Any, weight: torch.Tensor, bias: torch.Tensor, cache: FeatureCache) -> None:
    """Load fitted heads into ``rm`` and normalise each on the cache's reference texts."""
    with torch.no_grad():
        rm.head.weight.copy_(weight.to(rm.head.weight))
        rm.head.bias.copy_(bias.to(rm.head.bias))
        if cache.ref:
            ref = torch.tensor([cache.index[k] for k in cache.ref])
            rm.set_normalization(cache.features[ref] @ weight.T + bias)


def refit(rm: Any, cache: FeatureCache, comps: Sequence[Any]) -> dict[str, float]:
    """Refit ``rm``'s heads on ``comps`` (their texts already in ``cache``) with the settings its
    training chose (``reward.json``); returns the new heads' training loss and accuracy."""
    meta = rm.extra_meta
    batch = comparison_batch(comps, cache)
    weight, bias = fit_ensemble(cache.features, batch, rm.n_heads, float(meta.get("head_weight_decay", 0.03)),
                                int(meta.get("head_steps", 400)), int(meta.get("seed", 0)) + len(comps))
    apply_heads(rm, weight, bias, cache)
    raw = (cache.features @ weight.T + bias).mean(-1)[batch["idx"]]
    m = comparison_metrics(raw, batch, prefix="rm/")
    return {"loss": m["rm/loss"], "accuracy": m["rm/accuracy"]}


def train_feature_reward_model(cfg: Any, train: Sequence[Any], val: Sequence[Any], run_dir: Path,
                               held_out: str, chat: bool) -> dict[str, Any]:
    """The ``features_layer > 0`` branch of :func:`palate.lm.reward.train_reward_model`.

    Writes ``metrics.jsonl`` (one row: the training and validation metrics of the chosen heads and
    ``rm/val_accuracy_wd/<L2>`` for each L2 strength tried), ``model/`` (the cut backbone, the heads,
    ``features.pt``) and returns the summary.
    """
    from palate.data.formats import read_sft
    from palate.lm.models import load_model
    from palate.lm.reward_model import RewardModel
    from palate.runs import MetricsLogger

    t0 = time.perf_counter()
    base, tokenizer = load_model(cfg.model, dtype=cfg.dtype, cache_dir=cfg.cache_dir or None)
    rm = RewardModel.from_causal_lm(base, chat=chat, max_length=cfg.max_length, n_heads=cfg.ensemble,
                                    pool=cfg.features_pool, conservative_k=cfg.conservative_k,
                                    n_layers=cfg.features_layer)
    del base
    rm.requires_grad_(False)
    rm.eval()
    if cfg.norm_data:
        ref = [(ex.prompt, ex.completion) for ex in read_sft(cfg.norm_data) if ex.prompt is not None]
    else:
        ref = list(dict.fromkeys((c.prompt, y) for c in (val or train) for y in c.completions))
    cache = FeatureCache(ref=ref)
    texts = list(dict.fromkeys([(c.prompt, y) for c in list(train) + list(val) for y in c.completions] + ref))
    with torch.inference_mode():
        cache.ensure(rm, tokenizer, texts, batch_size=16, progress=True)
    feature_s = time.perf_counter() - t0

    x = cache.features
    train_b = comparison_batch(train, cache)
    val_b = comparison_batch(val, cache) if val else None
    tried: dict[float, float] = {}
    grid = sorted(set(float(w) for w in cfg.head_weight_decay))
    if len(grid) > 1 and val_b is not None:
        for wd in grid:
            w, c = fit_head(x, train_b, wd, cfg.head_steps)
            tried[wd] = _selection_accuracy((x @ w + c)[val_b["idx"]], val_b, held_out)
    scored = {wd: a for wd, a in tried.items() if not np.isnan(a)}
    chosen = max(scored, key=lambda wd: (scored[wd], wd)) if scored else grid[len(grid) // 2]
    weight, bias = fit_ensemble(x, train_b, cfg.ensemble, chosen, cfg.head_steps, cfg.seed)
    apply_heads(rm, weight, bias, cache)
    rm.extra_meta = {"head_weight_decay": chosen, "head_steps": cfg.head_steps, "seed": cfg.seed}
    rm.extra_files = {FEATURES_FILE: cache.state()}

    raw_all = (x @ weight.T + bias).mean(-1)
    metrics = comparison_metrics(raw_all[train_b["idx"]], train_b, prefix="rm/")
    metrics = {k: v for k, v in metrics.items() if k in ("rm/loss", "rm/accuracy")}
    if val_b is not None:
        metrics.update(comparison_metrics(raw_all[val_b["idx"]], val_b, held_out))
    metrics.update({f"rm/val_accuracy_wd/{wd:g}": a for wd, a in tried.items()})
    rm.save_pretrained(run_dir / "model", tokenizer=tokenizer)
    logger = MetricsLogger(run_dir, tensorboard=cfg.tensorboard)
    logger.log(1, metrics)
    logger.close()
    log.info("feature reward model (block %d, %d head(s), L2 %g) written to %s: val accuracy %.3f",
             cfg.features_layer, cfg.ensemble, chosen, run_dir / "model", metrics.get("rm/val_accuracy", float("nan")))
    return {"features_layer": cfg.features_layer, "ensemble": cfg.ensemble, "conservative_k": cfg.conservative_k,
            "head_weight_decay": chosen, "texts": len(cache), "feature_seconds": round(feature_s, 2),
            "train_seconds": round(time.perf_counter() - t0, 2), "train_comparisons": len(train),
            "val_comparisons": len(val), "normalized_on": len(ref), "chat": chat, "held_out_labeller": held_out,
            "gain": rm.gain.tolist(), "bias": rm.bias.tolist(), **metrics,
            "best_val_accuracy": metrics.get("rm/val_accuracy", -1.0)}
