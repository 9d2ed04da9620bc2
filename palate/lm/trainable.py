"""Which weights LM PPO (and DPO) train: the last blocks, or LoRA adapters on every block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


def freeze_all_but_last_layers(model: nn.Module, n_layers: int) -> None:
    """Train only the last ``n_layers`` transformer blocks and the final norm.

    On a CPU this is the cheapest honest fine-tune: the backward pass stops at the first trained
    block, so an update costs a fraction of a full one, unlike LoRA whose backward crosses every
    layer. Embeddings (tied to the LM head in SmolLM2) stay frozen.
    """
    if n_layers <= 0:
        return
    base = getattr(model, model.base_model_prefix, model)
    layers = base.layers
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[-n_layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    for p in base.norm.parameters():
        p.requires_grad_(True)


def lora_config(r: int, alpha: int, task_type: str | None) -> Any:
    """A ``peft`` LoRA config on every projection of a SmolLM2/Llama-style block."""
    from peft import LoraConfig

    # No adapter dropout: PPO's first-epoch ratio must be exactly 1 for the surrogate to be right.
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type=task_type,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def make_trainable(policy: nn.Module, value: nn.Module, lora_r: int, lora_alpha: int,
                   trainable_layers: int, value_layers: int) -> nn.Module:
    """Set what PPO trains on both networks; returns the policy (a ``peft`` model with LoRA).

    With LoRA both get adapters (the value backbone's in place); otherwise the policy trains its
    last ``trainable_layers`` blocks and final norm and the value model its last ``value_layers``
    (``LMPPOConfig.value_layers``: as many unless set) and final norm, so the frozen-prefix cache
    can serve both. ``value_layers=0`` freezes the whole value backbone: only its scalar head
    trains, on features the rollout computes once, and the update's value costs next to nothing.
    """
    if lora_r > 0:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(lora_r, lora_alpha, "CAUSAL_LM"))
        value.backbone = get_peft_model(value.backbone, lora_config(lora_r, lora_alpha, None))
        return policy
    freeze_all_but_last_layers(policy, trainable_layers)
    if trainable_layers > 0:
        value.backbone.requires_grad_(False)
        if value_layers > 0:
            for layer in list(value.backbone.layers)[-value_layers:]:
                layer.requires_grad_(True)
            value.backbone.norm.requires_grad_(True)
    return policy


def enable_block_checkpointing(model: nn.Module) -> list[nn.Module]:
    """Recompute each transformer block's activations in the backward pass; returns the blocks.

    Non-reentrant, so it works when no input requires grad (frozen embeddings, LoRA). A ``peft``
    model is switched on through its base model. transformers runs the recomputation only in
    training mode, which LM PPO never enters (no dropout: the first ratio must be 1), so the
    update arms the returned blocks with :func:`checkpointing_armed`.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    from palate.lm.models import enable_checkpointing

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable_checkpointing(base)
    return [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


@contextlib.contextmanager
def checkpointing_armed(blocks: list[nn.Module]) -> Iterator[None]:
    """Set only the blocks' own ``training`` flag, which is what transformers' checkpointing
    tests; their attention and MLP stay in eval mode, so no dropout is switched on."""
    for block in blocks:
        block.training = True
    try:
        yield
    finally:
        for block in blocks:
            block.training = False
