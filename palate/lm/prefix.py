"""Frozen-prefix caching: run the frozen lower blocks of a decoder once per rollout, not per step.

When PPO trains only the last N transformer blocks (``trainable_layers``), the first L - N blocks
are a fixed function of the tokens. Their output at block L - N is therefore the same

* for the policy in every epoch and minibatch of the update (it is recomputed there for nothing),
* for the frozen reference rho, whose lower blocks *are* the policy's (both start as the SFT model).

So the rollout forward keeps the hidden state entering block L - N, and everything after runs only
the top N blocks from it: the update's forward shrinks to N/L of a full pass and the reference's
rollout forward to its top blocks and head. The numbers are those of the full forward (the same
operations on the same values); :func:`suffix_matches` checks that on the actual model before the
trainer relies on it, so an architecture whose forward does something else between the embedding
and the first block (Gemma scales the embeddings, for example) falls back to full passes.

The suffix runs through the model's *own* ``forward`` with ``inputs_embeds`` set to the cached
hidden state and the block list temporarily cut to the top blocks, so the attention mask, rotary
positions, final norm and head are exactly the ones the model always uses.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def decoder_base(model: nn.Module) -> nn.Module | None:
    """The module holding the block list ``layers`` (``model.model`` of a causal LM, or ``model``)."""
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if prefix else None
    if base is not None and isinstance(getattr(base, "layers", None), nn.ModuleList):
        return base
    return None


@contextlib.contextmanager
def _top_blocks(model: nn.Module, start: int) -> Iterator[None]:
    base = decoder_base(model)
    if base is None:
        raise ValueError(f"{type(model).__name__} has no decoder block list to cut")
    full = base._modules["layers"]
    base._modules["layers"] = nn.ModuleList(list(full)[start:])
    try:
        yield
    finally:
        base._modules["layers"] = full


def forward_capture(model: nn.Module, start: int, **inputs: Any) -> tuple[Any, torch.Tensor]:
    """``(model(**inputs), hidden state entering block start)`` from one full forward."""
    out = model(**inputs, output_hidden_states=True)
    return out, out.hidden_states[start]


def forward_suffix(model: nn.Module, hidden: torch.Tensor, start: int, **inputs: Any) -> Any:
    """``model``'s output computed from the hidden state entering block ``start`` (blocks start..L-1)."""
    inputs.pop("input_ids", None)
    with _top_blocks(model, start):
        return model(inputs_embeds=hidden, **inputs)


def response_logits(model: nn.Module, batch: Any, prefix: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """``model``'s logits ``[B, R, V]`` at the response positions of ``batch`` (a rollout batch).

    With ``prefix``, the hidden state entering block ``start`` that another model computed from the
    same blocks (:func:`shared_blocks`), only blocks ``start..L-1`` run. Only the last R+1 positions
    are projected onto the vocabulary where the model allows it. The KL to a reference at PPO's
    rollouts and at evaluation both read the reference through this.
    """
    from palate.lm.generation import keep_response_logits, position_ids_from_mask, take_response_logits

    r = batch.response_ids.shape[1]
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=position_ids_from_mask(batch.attention_mask), use_cache=False,
                  **keep_response_logits(model, r))
    out = forward_suffix(model, prefix, start, **kwargs) if prefix is not None else model(**kwargs)
    return take_response_logits(out.logits, r)


def prefix_equal(a: nn.Module, b: nn.Module, start: int) -> bool:
    """Whether two decoders share embeddings and blocks ``0..start-1`` bit for bit."""
    base_a, base_b = decoder_base(a), decoder_base(b)
    if base_a is None or base_b is None or len(base_a.layers) != len(base_b.layers):
        return False
    modules = [(base_a.embed_tokens, base_b.embed_tokens)] if hasattr(base_a, "embed_tokens") else []
    modules += list(zip(list(base_a.layers)[:start], list(base_b.layers)[:start]))
    return all(_same_parameters(ma, mb) for ma, mb in modules)


def _same_parameters(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def shared_blocks(a: nn.Module, b: nn.Module) -> int:
    """How many leading decoder blocks two models share bit for bit (0 when the embeddings differ).

    A PPO policy trained with ``trainable_layers: N`` shares all but its top N blocks with its SFT
    reference, so the reference can start from the policy's hidden state there.
    """
    base_a, base_b = decoder_base(a), decoder_base(b)
    if base_a is None or base_b is None or len(base_a.layers) != len(base_b.layers) or not prefix_equal(a, b, 0):
        return 0
    shared = 0
    for la, lb in zip(base_a.layers, base_b.layers):
        if not _same_parameters(la, lb):
            break
        shared += 1
    return shared


def prefix_frozen(model: nn.Module, start: int) -> bool:
    """True when nothing below block ``start`` (embeddings included) requires grad."""
    base = decoder_base(model)
    if base is None or not 0 < start < len(base.layers):
        return False
    lower = [base.embed_tokens] if hasattr(base, "embed_tokens") else []
    lower += list(base.layers)[:start]
    return not any(p.requires_grad for m in lower for p in m.parameters())


@torch.no_grad()
def suffix_matches(model: nn.Module, start: int, vocab_size: int, device: torch.device | str,
                   output: str = "logits", atol: float = 1e-4) -> bool:
    """Check on a small left-padded probe that the suffix path reproduces the full forward.

    ``output`` names the field compared (``logits`` for a causal LM, ``last_hidden_state`` for a
    bare decoder).
    """
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 7), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    try:
        full, hidden = forward_capture(model, start, **inputs)
        part = forward_suffix(model, hidden, start, **inputs)
    except Exception as err:  # an architecture whose forward rejects inputs_embeds or the cut list
        log.info("frozen-prefix cache off for %s: %s", type(model).__name__, err)
        return False
    a, b = getattr(full, output)[mask.bool()], getattr(part, output)[mask.bool()]
    scale = max(1.0, float(a.abs().max()))
    ok = bool(torch.allclose(a.float(), b.float(), atol=atol * scale, rtol=0))
    if not ok:
        log.info("frozen-prefix cache off for %s: the suffix forward differs by %.2e", type(model).__name__,
                 float((a.float() - b.float()).abs().max()))
    return ok
