"""The LM reward model: a transformer backbone and a scalar head (Ziegler 2019, Ouyang 2022).

The reward model is the SFT (or base) model without its unembedding: the backbone's hidden state at
the *last real token* of prompt + completion goes through ``nn.Linear(hidden, 1)``. "Last real
token" is found from the attention mask, and positions are counted over real tokens only, so a
sequence gets the same score whether the batch is padded on the left (as generation pads) or on
the right.

Scores are normalised, as both papers do before RL: a bias so that reference samples have mean 0
and a gain so that they have standard deviation 1. ``forward`` returns the normalised score
``gain * raw + bias``; ``raw_scores`` the head's output. Training is in :mod:`palate.lm.reward`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from palate.errors import ConfigError, ModelError
from palate.lm.formatting import encode_prompt_completion, last_token_index, pad_batch, position_ids_from_mask
from palate.runs import atomic_write_dir

__all__ = ["RewardModel", "load_reward_model", "truncate_backbone"]

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


POOLS = ("last", "mean", "mean+last")


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor | None,
                pool: str) -> torch.Tensor:
    """``[B, H]`` (``[B, 2H]`` for ``mean+last``): one reading of ``hidden [B, L, H]`` per row.

    ``last``: the last real token; ``mean``: the mean over the completion's tokens; ``mean+last``:
    both, concatenated. Shared by :meth:`RewardModel.pooled` and ``palate.bench.rm_layers``.
    """
    parts = []
    if pool != "last":
        if completion_mask is None:
            raise ValueError("a mean-pooled reward model needs the completion_mask of its inputs "
                             "(use score_texts, which builds it)")
        m = completion_mask.to(hidden.dtype).unsqueeze(-1)
        parts.append((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))
    if pool != "mean":
        idx = last_token_index(attention_mask)
        parts.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), idx])
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


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
    * ``pool="mean+last"``: as ``mean``, with the hidden state at the last real token concatenated
      (``2 * hidden`` features): the mean reads what the text is about, the last token how it ends.

    Each head is normalised on its own (``gain * raw + bias``); with one head the score is simply
    the normalised head output.
    """

    def __init__(self, backbone: nn.Module, *, chat: bool = False, max_length: int = 512, n_heads: int = 1,
                 pool: str = "last", conservative_k: float = 0.0) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"reward model pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if n_heads < 1:
            raise ConfigError(f"reward model n_heads must be >= 1, got {n_heads}")
        self.backbone = backbone
        hidden = int(backbone.config.hidden_size)
        width = 2 * hidden if pool == "mean+last" else hidden
        self.head = nn.Linear(width, n_heads)
        # Ziegler et al. initialise the head so the initial rewards have unit-ish scale.
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(width + 1))
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
        return self.pool != "last"

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
        return pool_hidden(hidden, attention_mask, completion_mask, self.pool)

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
        """One ``nn.Linear(hidden, 1)`` giving the heads' mean normalised score (the value's start).

        A ``mean+last`` head's two halves are summed: read at every position, as the value reads
        it, both weigh the same hidden state.
        """
        w = self.head.weight.detach() * self.gain.unsqueeze(-1)
        b = self.head.bias.detach() * self.gain + self.bias
        hidden = int(self.backbone.config.hidden_size)
        if w.shape[1] == 2 * hidden:
            w = w[:, :hidden] + w[:, hidden:]
        head = nn.Linear(hidden, 1).to(self.head.weight)
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
