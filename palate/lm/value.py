"""The value model of LM PPO and the one module PPO trains: policy + value behind one forward.

The value function has the reward model's shape (backbone + scalar head) and starts *as* the
reward model (InstructGPT, appendix C.3), so its first predictions are already calibrated.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from palate.lm.generation import keep_response_logits, position_ids_from_mask, take_response_logits
from palate.lm.prefix import decoder_base, forward_capture, forward_suffix
from palate.lm.pretrain_text import lm_nll


class ValueModel(nn.Module):
    """V(x, y_<t): a transformer backbone with a scalar head read at every position.

    The same shape as :class:`palate.lm.reward_model.RewardModel` (backbone + ``nn.Linear(hidden, 1)``),
    so it can start as a copy of the reward model: InstructGPT initialises the value function
    from the RM, which makes the first advantages meaningful instead of noise.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
                start: int = 0) -> torch.Tensor:
        """``[B, L]`` values; with ``prefix`` (the hidden state entering block ``start``, see
        :mod:`palate.lm.prefix`) only blocks ``start..`` run."""
        if prefix is not None and start >= self.n_layers:  # a frozen backbone's output: the head alone
            return self.head(prefix.to(self.head.weight.dtype)).squeeze(-1)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        out = self.backbone(**inputs) if prefix is None else forward_suffix(self.backbone, prefix, start, **inputs)
        return self.head(out.last_hidden_state.to(self.head.weight.dtype)).squeeze(-1)

    def forward_capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                        start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, hidden state entering block start)`` from one full forward; with ``start`` at
        the number of blocks, the backbone's output (after its final norm) for the head alone."""
        if start >= self.n_layers:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False)
            last = out.last_hidden_state
            return self.head(last.to(self.head.weight.dtype)).squeeze(-1), last
        out, hidden = forward_capture(self.backbone, start, input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids, use_cache=False)
        return self.head(out.last_hidden_state.to(self.head.weight.dtype)).squeeze(-1), hidden

    @property
    def n_layers(self) -> int:
        """Transformer blocks in the backbone (0 when it has no block list)."""
        base = decoder_base(self.backbone)
        return len(base.layers) if base is not None else 0

    @classmethod
    def from_causal_lm(cls, model: nn.Module) -> ValueModel:
        """A copy of the LM's backbone with a zero head (V = 0 everywhere at the start)."""
        base = getattr(model, model.base_model_prefix)
        head = nn.Linear(model.config.hidden_size, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return cls(copy.deepcopy(base), head.to(next(base.parameters()).dtype))

    @classmethod
    def from_reward_model(cls, reward_model: nn.Module) -> ValueModel:
        """A copy of the RM whose head folds in its normalisation: V(x, y) == RM(x, y) at the end.

        An ensemble's heads fold into their mean; a mean-pooled RM's head, read here at every
        position, is a start that already knows what the labellers like, not V itself.
        """
        if callable(getattr(reward_model, "folded_head", None)):
            return cls(copy.deepcopy(reward_model.backbone), reward_model.folded_head())
        head = copy.deepcopy(reward_model.head)
        gain, bias = fold_normalisation(reward_model)
        with torch.no_grad():
            head.weight.mul_(gain)
            head.bias.mul_(gain).add_(bias)
        return cls(copy.deepcopy(reward_model.backbone), head)


def fold_normalisation(reward_model: nn.Module) -> tuple[float, float]:
    """``(a, c)`` such that the RM's normalised score is ``a * raw + c``.

    Read off the RM itself, by normalising raw scores 0 and 1, so this stays right whatever form
    the RM's ``gain``/``bias`` buffers take.
    """
    normalise = getattr(reward_model, "normalise", None)
    if callable(normalise):
        zero, one = (float(normalise(torch.tensor([v]))[0]) for v in (0.0, 1.0))
        return one - zero, zero
    return float(reward_model.gain), float(reward_model.bias)


class PolicyAndValue(nn.Module):
    """Both trained networks behind one ``forward``, so ``accelerate`` wraps (and syncs) them once."""

    def __init__(self, policy: nn.Module, value: ValueModel) -> None:
        super().__init__()
        self.policy = policy
        self.value = value
        # First trained block of each network when the frozen-prefix cache is on (0 = off).
        self.policy_start = 0
        self.value_start = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int,
                ptx_ids: torch.Tensor | None = None, policy_prefix: torch.Tensor | None = None,
                value_prefix: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(response logits [B,R,V], values [B,R], ptx NLL or None)``.

        ``policy_prefix`` / ``value_prefix``: cached hidden states entering the first trained
        block (:mod:`palate.lm.prefix`); the frozen blocks below are then not run again.
        """
        position_ids = position_ids_from_mask(attention_mask)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        r = input_ids.shape[1] - query_len
        keep = keep_response_logits(self.policy, r)
        if policy_prefix is None:
            out = self.policy(**inputs, **keep)
        else:
            out = forward_suffix(self.policy, policy_prefix, self.policy_start, **inputs, **keep)
        logits = take_response_logits(out.logits, r)
        values = self.value(input_ids, attention_mask, position_ids, value_prefix,
                            self.value_start)[:, query_len - 1:-1]
        ptx = lm_nll(self.policy, ptx_ids) if ptx_ids is not None else None
        return logits, values, ptx


