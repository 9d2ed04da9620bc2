"""Batched sampling and log-probabilities of sampled tokens, with masks that survive padding.

A rollout batch is laid out the way every later step wants it: prompts *left*-padded to a common
length ``P`` (so generation appends to a contiguous right edge, which is what a KV cache needs),
responses *right*-padded to ``R``. The response mask is 1 on every generated token up to and
including the first EOS and 0 after it, so the EOS itself is an action the policy is credited for
(Ziegler et al. end episodes there) and the pad tokens ``generate`` writes after it are not.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RolloutBatch:
    """Prompts and sampled responses as tensors.

    Attributes:
        query_ids: ``[B, P]`` prompt tokens, left-padded.
        query_mask: ``[B, P]`` 1 on real prompt tokens.
        response_ids: ``[B, R]`` sampled tokens, right-padded after the first EOS.
        response_mask: ``[B, R]`` 1 on generated tokens up to and including the first EOS.
        ended: ``[B]`` True where the response stopped at EOS (False: cut by ``max_new_tokens``).
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, index: torch.Tensor) -> RolloutBatch:
        """The rows ``index`` (a minibatch), same layout."""
        return RolloutBatch(self.query_ids[index], self.query_mask[index], self.response_ids[index],
                            self.response_mask[index], self.ended[index])

    def to(self, device: torch.device | str) -> RolloutBatch:
        return RolloutBatch(*(t.to(device) for t in (self.query_ids, self.query_mask, self.response_ids,
                                                      self.response_mask, self.ended)))


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of token lists left-padded to the longest one."""
    if not sequences:
        raise ValueError("left_pad: no sequences given")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids, mask


def response_mask_after_eos(response_ids: torch.Tensor, eos_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, ended)``: 1 up to and including the first EOS of each row, and whether it had one."""
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= response_ids == e
    # Number of EOS strictly before each position: a token is kept while that is still zero.
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = (before == 0).long()
    return mask, is_eos.any(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees positions 0, 1, ...

    This must match what ``generate`` used while sampling, or the recomputed log-probabilities
    of a left-padded row would differ from those the tokens were drawn with.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def eos_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Every token id that ends a response: the generation config's EOS list and the tokenizer's."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [tokenizer.eos_token_id]:
        if e is not None and e not in ids:
            ids.append(int(e))
    return ids


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int | None = None,
) -> RolloutBatch:
    """Sample one response per prompt with ``model.generate`` (KV cache), stopping at EOS.

    Sampling is from the untruncated softmax at ``temperature`` by default (top-k off, top-p 1):
    PPO's ratio and the KL penalty assume the tokens come from exactly the distribution whose
    log-probabilities :func:`response_logprobs` recomputes. Randomness comes from torch's global
    generator, so ``seed_everything`` makes a rollout reproducible.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"sample: max_new_tokens must be >= 1, got {max_new_tokens}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    gen_cfg = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=top_p, max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True,
    )
    query_ids, query_mask = left_pad(prompt_ids, pad_id)
    chunk = batch_size or len(prompt_ids)
    responses = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompt_ids), chunk):
            q, m = query_ids[start:start + chunk], query_mask[start:start + chunk]
            # Trim the common left padding of this chunk: fewer positions to attend over.
            keep = int(m.sum(1).max())
            q, m = q[:, -keep:].to(device), m[:, -keep:].to(device)
            out = model.generate(input_ids=q, attention_mask=m, generation_config=gen_cfg)
            responses.append(out[:, q.shape[1]:].cpu())
    finally:
        model.train(was_training)
    width = max(r.shape[1] for r in responses)
    response_ids = torch.cat([F.pad(r, (0, width - r.shape[1]), value=pad_id) for r in responses])
    response_mask, ended = response_mask_after_eos(response_ids, eos_ids)
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    return RolloutBatch(query_ids, query_mask, response_ids, response_mask, ended)


def logits_to_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                       entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(token), entropy)`` per position from ``[B, L, V]`` logits at ``temperature``.

    ``entropy_grad=False`` computes the entropy outside the autograd graph: when it is only logged
    (no entropy bonus), its backward over the whole vocabulary would be work for a zero gradient.
    """
    logits = logits.float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = torch.gather(logp_all, -1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def keep_response_logits(model: torch.nn.Module, response_len: int) -> dict[str, int]:
    """``{"logits_to_keep": R + 1}`` when the model's forward can skip the LM head on the prompt.

    Only the logits at positions P-1 .. P+R-1 are ever read (the last R+1 positions), and the
    unembedding is a large share of a small model's forward (SmolLM2: 576 x 49,152, about eight
    blocks' worth), so computing it on prompt positions wastes a third or more of the head.
    Pair with :func:`take_response_logits`, which slices the same positions either way.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": response_len + 1} if _takes_logits_to_keep(type(base)) else {}


def take_response_logits(logits: torch.Tensor, response_len: int) -> torch.Tensor:
    """``[B, R, V]``: the logits that predicted the R response tokens (the logit at position t
    predicts token t+1, so positions P-1 .. P+R-2), from full or ``logits_to_keep`` logits."""
    return logits[:, -(response_len + 1):-1]


def response_logits(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """``[B, R, V]`` logits that predicted each response token (one forward over prompt+response)."""
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    r = batch.response_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                **keep_response_logits(model, r))
    return take_response_logits(out.logits, r)


def response_logprobs(model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0,
                      with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``[B, R]`` log pi(y_t | x, y_<t) of the sampled tokens (0 outside the response mask)."""
    logp, entropy = logits_to_logprobs(response_logits(model, batch), batch.response_ids, temperature)
    mask = batch.response_mask.to(logp.dtype)
    if with_entropy:
        return logp * mask, entropy * mask
    return logp * mask


def decode_responses(tokenizer, batch: RolloutBatch) -> list[str]:
    """Response texts without EOS, padding or other special tokens."""
    texts = []
    for ids, mask in zip(batch.response_ids, batch.response_mask):
        texts.append(tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True))
    return texts
