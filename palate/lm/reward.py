"""Reward models for language: a transformer backbone and a scalar head (Ziegler 2019, Ouyang 2022).

The reward model is the SFT (or base) model without its unembedding: the backbone's hidden state at
the *last real token* of prompt + completion goes through ``nn.Linear(hidden, 1)``. "Last real
token" is found from the attention mask, and positions are counted over real tokens only, so a
sequence gets the same score whether the batch is padded on the left (as generation pads) or on
the right.

Training uses the losses of :mod:`palate.core.preference`:

* rankings of K completions (InstructGPT): all C(K, 2) pairs of a prompt in one batch element,
  ``-1/C(K,2) E[log sigmoid(r(x, y_w) - r(x, y_l))]``, so the K forward passes are shared;
* best-of-K (Ziegler et al.): a softmax over the K rewards, cross-entropy against the choice;
* pairs (the TRL format): the K = 2 ranking, i.e. ``-log sigmoid(r_chosen - r_rejected)``.

After training the scores are normalised, as both papers do before RL: a bias so that reference
samples have mean 0 and a gain so that they have standard deviation 1. ``forward`` returns the
normalised score ``gain * raw + bias``; ``raw_scores`` the head's output.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from palate.errors import ConfigError, ModelError
from palate.lm.configs import RMConfig
from palate.lm.formatting import encode_prompt_completion, last_token_index, pad_batch, position_ids_from_mask
from palate.lm.models import LoraSettings
from palate.runs import atomic_write_dir

__all__ = ["RMConfig", "RewardModel", "load_reward_model", "train_reward_model"]

log = logging.getLogger(__name__)

_HEAD_FILE = "reward_head.safetensors"
_META_FILE = "reward.json"
# Settings of the head fit that online rounds reuse (palate.lm.reward_features), kept in reward.json.
_EXTRA_META = ("head_weight_decay", "head_steps", "seed")


def truncate_backbone(backbone: nn.Module, n_layers: int) -> nn.Module:
    """Keep the first ``n_layers`` transformer blocks of ``backbone`` (in place; its config follows).

    Saved, the result is an ordinary smaller model of the same architecture.
    """
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ModelError(f"cannot cut {type(backbone).__name__}: it has no .layers")
    if not 1 <= n_layers <= len(layers):
        raise ConfigError(f"features_layer must be in 1..{len(layers)} for this model, got {n_layers}")
    backbone.layers = nn.ModuleList(list(layers)[:n_layers])
    backbone.config.num_hidden_layers = n_layers
    types = getattr(backbone.config, "layer_types", None)
    if isinstance(types, list):
        backbone.config.layer_types = types[:n_layers]
    return backbone


class RewardModel(nn.Module):
    """r(x, y): backbone hidden state -> linear head(s) -> normalised score.

    Two readings of the backbone, one class (so PPO, online collection and evaluation load either):

    * ``pool="last"`` (the default, Ziegler/InstructGPT): the hidden state at the last real token,
      one head, the whole backbone fine-tuned by :func:`train_reward_model`;
    * ``pool="mean"``: the mean hidden state over the *completion's* tokens, from a backbone kept
      frozen and cut after its first ``n_layers`` blocks, read by an ensemble of ``n_heads``
      linear heads fitted on cached features (:mod:`palate.lm.reward_features`). The score is the
      heads' mean minus ``conservative_k`` times their spread, the control half's conservative
      reward: a policy gains nothing from text the heads disagree about.

    Each head is normalised on its own (``gain * raw + bias``); with one head the score is simply
    the normalised head output.
    """

    def __init__(self, backbone: nn.Module, *, chat: bool = False, max_length: int = 512, n_heads: int = 1,
                 pool: str = "last", conservative_k: float = 0.0) -> None:
        super().__init__()
        if pool not in ("last", "mean"):
            raise ConfigError(f"reward model pool must be 'last' or 'mean', got {pool!r}")
        if n_heads < 1:
            raise ConfigError(f"reward model n_heads must be >= 1, got {n_heads}")
        self.backbone = backbone
        hidden = int(backbone.config.hidden_size)
        self.head = nn.Linear(hidden, n_heads)
        # Ziegler et al. initialise the head so the initial rewards have unit-ish scale.
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.head.bias)
        self.register_buffer("gain", torch.ones(n_heads))
        self.register_buffer("bias", torch.zeros(n_heads))
        self.chat = chat
        self.max_length = max_length
        self.pool = pool
        self.conservative_k = float(conservative_k)
        # Written into reward.json / beside the weights by save_pretrained (the head fit's settings,
        # the feature cache online rounds extend); from_pretrained sets source_dir.
        self.extra_meta: dict[str, Any] = {}
        self.extra_files: dict[str, Any] = {}
        self.source_dir: Path | None = None

    @property
    def config(self) -> Any:
        """The backbone's transformers config (hidden size, vocabulary...)."""
        return self.backbone.config

    @property
    def n_heads(self) -> int:
        return int(self.head.out_features)

    @property
    def frozen_features(self) -> bool:
        """True for the frozen-backbone kind: only the heads ever train."""
        return self.pool == "mean"

    @classmethod
    def from_causal_lm(cls, model: nn.Module, *, chat: bool = False, max_length: int = 512, n_heads: int = 1,
                       pool: str = "last", conservative_k: float = 0.0, n_layers: int = 0) -> RewardModel:
        """A reward model whose backbone is ``model`` without its unembedding (``lm_head``).

        LoRA adapters on ``model`` are merged first: the reward model trains its own copy.
        ``n_layers > 0`` keeps only the first ``n_layers`` blocks (then the final norm).
        """
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        backbone = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        if backbone is None or not hasattr(backbone, "config"):
            raise ModelError(f"cannot find the transformer backbone of {type(model).__name__}; pass a causal LM")
        if n_layers:
            truncate_backbone(backbone, n_layers)
        return cls(backbone, chat=chat, max_length=max_length, n_heads=n_heads, pool=pool,
                   conservative_k=conservative_k).to(next(model.parameters()).device)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               completion_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, hidden]``: the feature the heads read (last real token, or completion mean)."""
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.pool == "mean":
            if completion_mask is None:
                raise ValueError("a mean-pooled reward model needs the completion_mask of its inputs "
                                 "(use score_texts, which builds it)")
            m = completion_mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        idx = last_token_index(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]

    def hidden_at_last_token(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, hidden]``: the backbone's final hidden state at each row's last real token."""
        if self.pool != "last":
            raise ValueError("hidden_at_last_token is the reading of a pool='last' reward model")
        return self.pooled(input_ids, attention_mask)

    def head_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    completion_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, n_heads]`` un-normalised outputs of every head."""
        h = self.pooled(input_ids, attention_mask, completion_mask)
        return self.head(h.to(self.head.weight.dtype))

    def raw_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` un-normalised score (the heads' mean; what the preference losses train)."""
        return self.head_scores(input_ids, attention_mask, completion_mask).mean(-1)

    def combine(self, head_raw: torch.Tensor) -> torch.Tensor:
        """``[B]`` reward from ``[B, n_heads]`` raw head outputs: mean - k * std of the normalised heads."""
        normed = self.gain * head_raw + self.bias
        score = normed.mean(-1)
        if self.conservative_k and normed.shape[-1] > 1:
            score = score - self.conservative_k * normed.std(-1)
        return score

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, raw: bool = False,
                completion_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` rewards (``raw=True``: the un-normalised heads' mean).

        Training calls ``model(..., raw=True)`` rather than ``raw_scores`` so that the call goes
        through the DDP/FSDP wrapper, which synchronises gradients only on ``forward``.
        """
        head_raw = self.head_scores(input_ids, attention_mask, completion_mask)
        return head_raw.mean(-1) if raw else self.combine(head_raw)

    def encode_texts(self, prompts: Sequence[str], completions: Sequence[str], tokenizer: Any, *,
                     chat: bool | None = None, add_eos: bool = True) -> dict[str, torch.Tensor]:
        """One left-padded batch, encoded exactly as the policy sees the texts."""
        chat = self.chat if chat is None else chat
        keys = ("input_ids", "attention_mask", "completion_mask")
        enc = [encode_prompt_completion(tokenizer, p, c, chat, self.max_length, add_eos=add_eos)
               for p, c in zip(prompts, completions)]
        return pad_batch([{k: e[k] for k in keys} for e in enc], tokenizer.pad_token_id, padding_side="left")

    @torch.no_grad()
    def score_texts(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        tokenizer: Any,
        batch_size: int = 8,
        *,
        chat: bool | None = None,
        add_eos: bool = True,
        normalized: bool = True,
        per_head: bool = False,
    ) -> torch.Tensor:
        """``[B]`` rewards of text pairs, encoded exactly as the policy sees them.

        Args:
            chat: use the chat template for prompts (default: as the model was trained).
            add_eos: end each completion with EOS as a finished generation does.
            normalized: the reward (True) or the raw heads' mean.
            per_head: ``[B, n_heads]`` normalised scores of each head instead (the ensemble's spread).
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        device = self.head.weight.device
        was_training = self.training
        self.eval()
        scores = []
        try:
            for start in range(0, len(prompts), batch_size):
                batch = self.encode_texts(prompts[start:start + batch_size], completions[start:start + batch_size],
                                          tokenizer, chat=chat, add_eos=add_eos)
                head_raw = self.head_scores(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                            batch["completion_mask"].to(device))
                if per_head:
                    out = self.gain * head_raw + self.bias
                else:
                    out = self.combine(head_raw) if normalized else head_raw.mean(-1)
                scores.append(out.float().cpu())
        finally:
            self.train(was_training)
        if scores:
            return torch.cat(scores)
        return torch.zeros(0, self.n_heads) if per_head else torch.zeros(0)

    def set_normalization(self, raw: torch.Tensor) -> None:
        """Choose ``gain``, ``bias`` so these raw reference scores get mean 0 and std 1, per head.

        ``raw``: ``[N]`` (one head, or the same for every head) or ``[N, n_heads]``.
        """
        raw = raw.detach().float()
        if raw.dim() == 1:
            raw = raw.unsqueeze(-1).expand(-1, self.n_heads)
        std = raw.std(0) if raw.shape[0] > 1 else torch.ones(raw.shape[1])
        gain = 1.0 / std.clamp_min(1e-6)
        self.gain.copy_(gain.to(self.gain))
        self.bias.copy_((-gain * raw.mean(0)).to(self.bias))

    def folded_head(self) -> nn.Linear:
        """One ``nn.Linear(hidden, 1)`` giving the heads' mean normalised score (the value's start)."""
        w = self.head.weight.detach() * self.gain.unsqueeze(-1)
        b = self.head.bias.detach() * self.gain + self.bias
        head = nn.Linear(self.head.in_features, 1).to(self.head.weight)
        with torch.no_grad():
            head.weight.copy_(w.mean(0, keepdim=True))
            head.bias.copy_(b.mean().reshape(1))
        return head

    def save_pretrained(self, directory: str | os.PathLike[str], tokenizer: Any = None) -> Path:
        """Write config + backbone safetensors + head + normalisation (+ tokenizer), atomically.

        The backbone is an ordinary transformers model (``AutoModel`` loads it), so other tools
        can read the features; the head and the normalisation live in two small extra files.
        """
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            backbone = self.backbone.merge_and_unload() if hasattr(self.backbone, "merge_and_unload") else self.backbone
            backbone.save_pretrained(tmp)
            tensors = {
                "head.weight": self.head.weight.detach().float().cpu().contiguous(),
                "head.bias": self.head.bias.detach().float().cpu().contiguous(),
                "gain": self.gain.detach().float().cpu().reshape(-1).contiguous(),
                "bias": self.bias.detach().float().cpu().reshape(-1).contiguous(),
            }
            save_file(tensors, str(tmp / _HEAD_FILE))
            meta = {"format": "palate-reward-model", "version": 2, "chat": self.chat,
                    "max_length": self.max_length, "gain": self.gain.tolist(), "bias": self.bias.tolist(),
                    "hidden_size": int(self.head.in_features), "n_heads": self.n_heads, "pool": self.pool,
                    "conservative_k": self.conservative_k,
                    "n_layers": int(getattr(backbone.config, "num_hidden_layers", 0) or 0), **self.extra_meta}
            for name, value in self.extra_files.items():
                torch.save(value, tmp / name)
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        return atomic_write_dir(directory, write)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], *, dtype: str = "float32",
                        device: str = "cpu") -> RewardModel:
        """Load a reward model written by :meth:`save_pretrained` (or a run directory holding ``model/``)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        directory = Path(directory)
        if not (directory / _META_FILE).is_file() and (directory / "model" / _META_FILE).is_file():
            directory = directory / "model"
        if not (directory / _META_FILE).is_file():
            raise ModelError(f"{directory} holds no reward model ({_META_FILE} missing); pass the model/ "
                             "directory of a `palate lm rm` run")
        meta = json.loads((directory / _META_FILE).read_text())
        backbone = AutoModel.from_pretrained(str(directory), dtype=getattr(torch, dtype))
        tensors = load_file(str(directory / _HEAD_FILE))
        model = cls(backbone, chat=bool(meta.get("chat", False)), max_length=int(meta.get("max_length", 512)),
                    n_heads=int(tensors["head.weight"].shape[0]), pool=str(meta.get("pool", "last")),
                    conservative_k=float(meta.get("conservative_k", 0.0)))
        with torch.no_grad():
            model.head.weight.copy_(tensors["head.weight"])
            model.head.bias.copy_(tensors["head.bias"])
            model.gain.copy_(tensors["gain"].reshape(-1).expand(model.n_heads))
            model.bias.copy_(tensors["bias"].reshape(-1).expand(model.n_heads))
        model.extra_meta = {k: v for k, v in meta.items() if k in _EXTRA_META}
        model.source_dir = directory
        return model.to(device)


def load_reward_model(directory: str | os.PathLike[str], *, dtype: str = "float32",
                      device: str = "cpu") -> tuple[RewardModel, Any]:
    """``(reward_model, tokenizer)`` from a saved reward model or ``palate lm rm`` run directory."""
    from palate.lm.models import prepare_tokenizer

    model = RewardModel.from_pretrained(directory, dtype=dtype, device=device)
    directory = Path(directory)
    tok_dir = directory / "model" if (directory / "model" / _META_FILE).is_file() else directory
    from transformers import AutoTokenizer

    return model, prepare_tokenizer(AutoTokenizer.from_pretrained(str(tok_dir)))


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
    from palate.data.tasks import load_task
    from palate.lm.models import load_model
    from palate.lm.training import (
        TrainLoop,
        make_loader,
        make_optimizer_and_scheduler,
        peak_rss_mb,
        start_run,
    )
    from palate.runs import MetricsLogger, atomic_write_json

    cfg.validate()
    # Read and validate the data before creating the run directory: a bad line leaves no half-made run.
    task = load_task(cfg.task) if cfg.task else None
    chat = cfg.chat if cfg.chat is not None else (task.chat if task else False)
    held_out = cfg.held_out_labeller or (task.panel.held_out_name if task else "")

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
