"""LM PPO's rollout: sample completions, score them, and the no-grad passes PPO needs of them.

One rollout samples one completion per prompt from pi (temperature 1, stop at EOS), then runs one
no-grad forward each for log pi, log rho (the frozen SFT reference) and V, in chunks. With the
frozen-prefix cache (:mod:`palate.lm.prefix`) the frozen lower blocks run once per token and their
output is kept for the update; with a generation trace log pi comes from generation itself.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from palate.lm.generation import (
    RolloutBatch,
    SampleTrace,
    keep_response_logits,
    logits_to_logprobs,
    position_ids_from_mask,
    take_response_logits,
)
from palate.lm.prefix import (
    decoder_base,
    forward_capture,
    prefix_equal,
    prefix_frozen,
    response_logits,
    suffix_matches,
)
from palate.lm.value import PolicyAndValue

log = logging.getLogger(__name__)

ScoreFn = Callable[[Sequence[str], Sequence[str]], Any]
"""``score_fn(prompts, completions) -> [B]`` scores (a reward model or a reward function)."""


@dataclasses.dataclass
class Rollout:
    """One PPO batch: tokens, rollout-time log-probs, values, shaped rewards, advantages, returns."""

    batch: RolloutBatch
    prompts: list[str]
    completions: list[str]
    scores: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    # Hidden states entering the first trained block (frozen-prefix cache), or None.
    policy_prefix: torch.Tensor | None = None
    value_prefix: torch.Tensor | None = None


class PromptSampler:
    """Seeded epochs over the prompt list: each epoch a fresh permutation; state is checkpointed."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = np.random.default_rng(seed)
        self.queue: list[int] = []

    def next(self, k: int) -> list[int]:
        while len(self.queue) < k:
            self.queue += self.rng.permutation(self.n).tolist()
        out, self.queue = self.queue[:k], self.queue[k:]
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "queue": list(self.queue)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.queue = list(state["queue"])


def setup_prefix_cache(net: PolicyAndValue, reference: nn.Module | None, vocab: int, trainable_layers: int,
                       device: Any, value_layers: int) -> bool:
    """Turn the frozen-prefix cache on for each network whose lower blocks are frozen and whose
    suffix forward reproduces its full forward (checked here, on this model).

    ``value_layers`` are the value model's trained blocks (``LMPPOConfig.value_layers``); with 0 and
    its whole backbone frozen, the cached "prefix" is the backbone's output and the update runs
    only the value head on it. Sets ``net.policy_start`` / ``net.value_start``; returns whether the
    reference shares the policy's frozen blocks (then rho's forward starts from the policy's cached
    prefix too).
    """
    for name, module, output, n in (("policy", net.policy, "logits", trainable_layers),
                                    ("value", net.value.backbone, "last_hidden_state", value_layers)):
        base = decoder_base(module)
        if base is None:
            continue
        start = len(base.layers) - n
        if name == "value" and n == 0:
            if not any(p.requires_grad for p in module.parameters()):
                net.value_start = start  # the head alone reads the frozen backbone's output
        elif prefix_frozen(module, start) and suffix_matches(module, start, vocab, device, output):
            setattr(net, f"{name}_start", start)
    shares = bool(net.policy_start and reference is not None and prefix_equal(net.policy, reference, net.policy_start))
    log.info("frozen-prefix cache: policy from block %d, value from block %d, reference shares it: %s "
             "(0 = full passes)", net.policy_start, net.value_start, shares)
    return shares


def reference_logits(net: PolicyAndValue, reference: nn.Module | None, ref_shares_prefix: bool, mb: RolloutBatch,
                     policy_prefix: torch.Tensor | None = None) -> torch.Tensor:
    """rho's response logits ``[B, R, V]``; with LoRA (``reference=None``) the policy, adapters off."""
    if reference is not None:
        if ref_shares_prefix and policy_prefix is not None:
            # rho's lower blocks are the policy's frozen ones: start from the policy's prefix.
            return response_logits(reference, mb, policy_prefix, net.policy_start)
        return response_logits(reference, mb)
    # LoRA: rho is the very same weights with the adapters switched off (no extra memory).
    with net.policy.disable_adapter():
        return response_logits(net.policy, mb)


@torch.no_grad()
def forward_rollout(net: PolicyAndValue, reference: nn.Module | None, ref_shares_prefix: bool, batch: RolloutBatch,
                    chunk: int, temperature: float, device: Any,
                    trace: SampleTrace | None = None) -> tuple[torch.Tensor | None, ...]:
    """Rollout-time ``(log pi, log rho, entropy, V, policy prefix, value prefix)``, masked, on the CPU.

    Runs in chunks of ``chunk`` rows. With a generation ``trace`` log pi, the entropy and the
    policy's prefix come from it and the policy is not run again (but for the prefix, when the
    trace has none).
    """
    outs: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, len(batch), chunk):
        rows = torch.arange(start, min(start + chunk, len(batch)))
        mb = batch.select(rows).to(device)
        p, r = mb.query_ids.shape[1], mb.response_ids.shape[1]
        position_ids = position_ids_from_mask(mb.attention_mask)
        inputs = dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=position_ids,
                      use_cache=False)
        policy_prefix = value_prefix = None
        if trace is not None:
            logp, ent = trace.logprobs[rows].to(device), trace.entropy[rows].to(device)
            if net.policy_start and trace.hidden is not None:
                policy_prefix = trace.hidden[rows].to(device)
            elif net.policy_start:  # the engine kept no block input: one pass up to the first trained block
                _, policy_prefix = forward_capture(net.policy, net.policy_start, **inputs,
                                                   **keep_response_logits(net.policy, r))
        else:
            keep = keep_response_logits(net.policy, r)
            if net.policy_start:
                out, policy_prefix = forward_capture(net.policy, net.policy_start, **inputs, **keep)
            else:
                out = net.policy(**inputs, **keep)
            logp, ent = logits_to_logprobs(take_response_logits(out.logits, r), mb.response_ids, temperature)
            del out
        if net.value_start:
            values, value_prefix = net.value.forward_capture(mb.input_ids, mb.attention_mask, position_ids,
                                                             net.value_start)
        else:
            values = net.value(mb.input_ids, mb.attention_mask, position_ids)
        values = values[:, p - 1:-1]
        ref_logits = reference_logits(net, reference, ref_shares_prefix, mb, policy_prefix)
        ref_logp, _ = logits_to_logprobs(ref_logits, mb.response_ids, temperature)
        del ref_logits
        m = mb.response_mask.float()
        outs.append((logp * m, ref_logp * m, ent * m, values.float() * m, policy_prefix, value_prefix))
    return tuple(None if parts[0] is None else torch.cat(parts).cpu() for parts in zip(*outs))


def shard_bounds(n: int, rank: int, num_processes: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a global batch of ``n`` that process ``rank`` samples (contiguous, equal)."""
    if n % num_processes:
        raise ValueError(f"a batch of {n} rows does not split evenly over {num_processes} processes")
    per = n // num_processes
    return rank * per, (rank + 1) * per


def gather_rows(accelerator: Any, t: torch.Tensor, pad_value: float = 0, pad_first: bool = False) -> torch.Tensor:
    """Every process's ``[b, L, ...]`` rows concatenated in process order, ``L`` padded to the widest.

    ``pad_first`` pads on the left (prompts are left-padded). The result is on the CPU, where the
    rollout lives; the collective runs on the accelerator's device (NCCL needs GPU tensors).
    """
    if accelerator.num_processes == 1:
        return t
    dtype = t.dtype
    x = t.to(accelerator.device)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)  # not every backend gathers bools
    if x.dim() > 1:
        x = accelerator.pad_across_processes(x, dim=1, pad_index=pad_value, pad_first=pad_first)
    return accelerator.gather(x).cpu().to(dtype)


def gather_rollout(accelerator: Any, batch: RolloutBatch, pad_id: int, per_token: Sequence[torch.Tensor | None],
                   per_position: Sequence[torch.Tensor | None],
                   per_row: Sequence[torch.Tensor]) -> tuple[RolloutBatch, list, list, list]:
    """The global rollout from each process's shard: the batch laid out as one process would have it.

    ``per_token`` are ``[b, R]`` (right-padded with 0), ``per_position`` ``[b, P + R, ...]`` (the
    prompt part left-padded, the response part right-padded, with 0), ``per_row`` ``[b]``. After
    this every process holds the same tensors, so shaping, whitening, the KL controller and the
    metrics are computed on the global batch, identically everywhere.
    """
    if accelerator.num_processes == 1:
        return batch, list(per_token), list(per_position), list(per_row)
    p = batch.query_ids.shape[1]
    new = RolloutBatch(gather_rows(accelerator, batch.query_ids, pad_id, pad_first=True),
                       gather_rows(accelerator, batch.query_mask, 0, pad_first=True),
                       gather_rows(accelerator, batch.response_ids, pad_id),
                       gather_rows(accelerator, batch.response_mask, 0),
                       gather_rows(accelerator, batch.ended))
    tokens = [None if t is None else gather_rows(accelerator, t) for t in per_token]
    positions = [None if t is None else torch.cat([gather_rows(accelerator, t[:, :p], pad_first=True),
                                                   gather_rows(accelerator, t[:, p:])], dim=1)
                 for t in per_position]
    rows = [gather_rows(accelerator, t) for t in per_row]
    return new, tokens, positions, rows


def make_score_fn(cfg: Any, tokenizer: Any, device: str) -> tuple[ScoreFn, nn.Module | None]:
    """``(score_fn, reward_model or None)`` from an LM PPO config's ``reward_model`` or ``reward_fn``."""
    if cfg.reward_model:
        from palate.lm.reward_model import RewardModel

        rm = RewardModel.from_pretrained(cfg.reward_model, dtype=cfg.dtype, device=device)
        rm.eval()
        rm.requires_grad_(False)

        def score_rm(prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
            return rm.score_texts(list(prompts), list(completions), tokenizer, batch_size=cfg.forward_batch_size)

        return score_rm, rm
    from palate.data.tasks import load_task

    task = load_task(cfg.reward_fn)
    return (lambda p, c: task.reward_fn(list(p), list(c))), None
