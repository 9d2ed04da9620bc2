"""Config dataclasses of the language-model commands (light: no torch import, so ``--help`` is instant).

Each is re-exported by the module that uses it (``palate.lm.sft.SFTConfig``,
``palate.lm.reward.RMConfig``), which is where users import them from.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from palate.config import doc_field
from palate.errors import ConfigError


@dataclasses.dataclass
class SFTConfig:
    """Supervised fine-tuning: ``palate lm sft --config configs/lm/sft-sentiment.yaml``."""

    model: str = doc_field("smollm2-135m-instruct", "initial model: a model dir, a run dir, a .gguf file or the alias")
    train_data: str = doc_field("", "demonstrations: JSONL of {prompt, response} or {messages}, or hf:<dataset>[:split]")
    val_data: str = doc_field("", "validation demonstrations (empty: hold out val_fraction of train_data)")
    val_fraction: float = doc_field(0.05, "fraction of train_data held out when val_data is empty")
    task: str = doc_field("", "built-in task: its chat setting, and its validation prompts for reward selection")
    chat: bool | None = doc_field(None, "format prompts with the chat template (default: the task's, else true)")
    max_length: int = doc_field(256, "tokens per sequence (or per packed block)")
    packing: bool = doc_field(False, "pack examples into max_length blocks instead of padding each one")
    epochs: float = doc_field(1.0, "passes over the demonstrations")
    max_steps: int = doc_field(0, "stop after this many optimiser steps (0: use epochs)")
    batch_size: int = doc_field(8, "sequences per optimiser step, across all processes")
    gradient_accumulation_steps: int = doc_field(1, "micro-batches per optimiser step")
    lr: float = doc_field(2e-5, "AdamW learning rate (peak, after warm-up); ~1e-4 with LoRA")
    weight_decay: float = doc_field(0.0, "AdamW weight decay")
    warmup_ratio: float = doc_field(0.05, "fraction of steps of linear warm-up, then cosine decay to lr/10")
    max_grad_norm: float = doc_field(1.0, "gradient clipping norm (0: off)")
    dtype: str = doc_field("float32", "float32 on CPU; bfloat16 on GPUs")
    mixed_precision: Literal["no", "bf16", "fp16"] = doc_field("no", "accelerate mixed precision")
    gradient_checkpointing: bool = doc_field(False, "recompute activations to save memory")
    use_lora: bool = doc_field(False, "train LoRA adapters instead of all weights (merged into model/ at the end)")
    lora_r: int = doc_field(16, "LoRA rank")
    lora_alpha: int = doc_field(32, "LoRA alpha")
    reward_model: str = doc_field("", "reward model dir: select the checkpoint by mean validation reward")
    select_prompts: int = doc_field(16, "validation prompts sampled for reward-based selection")
    max_new_tokens: int = doc_field(0, "tokens generated per prompt for selection (0: the task's default, else 48)")
    eval_every: int = doc_field(50, "validate every this many steps (and at the end)")
    log_every: int = doc_field(1, "log training metrics every this many steps")
    cache_dir: str = doc_field("", "where converted GGUF models are cached (default $PALATE_CACHE or ~/.cache/palate)")
    seed: int = doc_field(0, "seeds data order, the train/val split and selection samples")
    run_name: str = doc_field("sft", "the run is written to <runs_dir>/<run_name>/")
    runs_dir: str = doc_field("runs", "parent directory of runs")
    overwrite: bool = doc_field(False, "replace an existing run of the same name")
    cpu: bool = doc_field(False, "force CPU even when a GPU is present")
    tensorboard: bool = doc_field(True, "mirror metrics to TensorBoard")

    def validate(self) -> None:
        if not self.train_data:
            raise ConfigError("sft: train_data is empty; give demonstrations (see `palate lm demos`)")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1 or self.max_length < 8:
            raise ConfigError("sft: batch_size, gradient_accumulation_steps must be >= 1 and max_length >= 8")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("sft: val_fraction must be in [0, 1)")


@dataclasses.dataclass
class RMConfig:
    """Reward-model training: ``palate lm rm --config configs/lm/rm-sentiment.yaml``."""

    model: str = doc_field("smollm2-135m-instruct", "initial model: an SFT run dir, a model dir, a .gguf file or the alias")
    train_data: str = doc_field("", "comparisons JSONL (rankings, best-of-K or pairs) or hf:<dataset>[:split]")
    val_data: str = doc_field("", "held-out comparisons (may include the held-out labeller); empty: split train_data")
    val_fraction: float = doc_field(0.1, "fraction of train_data held out when val_data is empty")
    task: str = doc_field("", "built-in task whose chat setting and held-out labeller apply (sentiment|instruct)")
    chat: bool | None = doc_field(None, "format prompts with the chat template (default: the task's, else false)")
    held_out_labeller: str = doc_field("", "labeller name reported as rm/held_out_accuracy (default: the task's)")
    norm_data: str = doc_field("", "SFT-format file of reference samples/demonstrations for normalisation; "
                               "empty: the completions of the validation comparisons")
    loss: Literal["auto", "ranking", "best_of_k", "pairwise"] = doc_field(
        "auto", "auto: the loss that matches each comparison's format; pairwise: every pair weighs the same")
    epochs: float = doc_field(1.0, "passes over the training comparisons (InstructGPT: 1, to avoid overfitting)")
    max_steps: int = doc_field(0, "stop after this many optimiser steps (0: use epochs)")
    batch_size: int = doc_field(8, "comparisons (prompts) per optimiser step, across all processes")
    gradient_accumulation_steps: int = doc_field(1, "micro-batches per optimiser step")
    lr: float = doc_field(1e-5, "AdamW learning rate (peak, after warm-up)")
    weight_decay: float = doc_field(0.0, "AdamW weight decay")
    warmup_ratio: float = doc_field(0.05, "fraction of steps of linear warm-up, then cosine decay to lr/10")
    max_grad_norm: float = doc_field(1.0, "gradient clipping norm (0: off)")
    max_length: int = doc_field(256, "tokens of prompt + completion (prompt cut from the left)")
    dtype: str = doc_field("float32", "float32 on CPU; bfloat16 on GPUs")
    mixed_precision: Literal["no", "bf16", "fp16"] = doc_field("no", "accelerate mixed precision")
    gradient_checkpointing: bool = doc_field(False, "recompute activations to save memory")
    use_lora: bool = doc_field(False, "train LoRA adapters on the backbone (plus the head) instead of all weights")
    lora_r: int = doc_field(16, "LoRA rank")
    lora_alpha: int = doc_field(32, "LoRA alpha")
    cache_dir: str = doc_field("", "where converted GGUF models are cached (default $PALATE_CACHE or ~/.cache/palate)")
    features_layer: int = doc_field(
        0, "0: fine-tune the whole model (last-token reading). L > 0: keep the model frozen, cut after block L, "
        "and fit linear heads on the completion's mean hidden state (features computed once; seconds to fit)")
    ensemble: int = doc_field(1, "with features_layer: linear heads, each fitted on a bootstrap resample")
    conservative_k: float = doc_field(0.0, "with ensemble > 1: the reward is the heads' mean minus k times their std")
    head_weight_decay: list[float] = doc_field(
        [0.1, 0.3, 1.0, 3.0], "with features_layer: L2 strengths tried; the one with the best validation "
        "accuracy of the training labellers wins (the held-out labeller's answers are never used to choose)")
    head_steps: int = doc_field(400, "with features_layer: full-batch Adam steps per head fit")
    eval_every: int = doc_field(50, "evaluate on val_data every this many steps (and at the end)")
    log_every: int = doc_field(1, "log training metrics every this many steps")
    seed: int = doc_field(0, "seeds data order, head initialisation and the train/val split")
    run_name: str = doc_field("rm", "the run is written to <runs_dir>/<run_name>/")
    runs_dir: str = doc_field("runs", "parent directory of runs")
    overwrite: bool = doc_field(False, "replace an existing run of the same name")
    cpu: bool = doc_field(False, "force CPU even when a GPU is present")
    tensorboard: bool = doc_field(True, "mirror metrics to TensorBoard")

    def validate(self) -> None:
        if not self.train_data:
            raise ConfigError("rm: train_data is empty; give a comparisons JSONL (see `palate lm label`)")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("rm: batch_size and gradient_accumulation_steps must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("rm: val_fraction must be in [0, 1)")
        if self.features_layer < 0 or self.ensemble < 1 or self.conservative_k < 0 or self.head_steps < 1:
            raise ConfigError("rm: features_layer must be >= 0, ensemble >= 1, conservative_k >= 0, head_steps >= 1")
        if self.features_layer and self.use_lora:
            raise ConfigError("rm: features_layer keeps the backbone frozen, so use_lora has nothing to train; "
                              "set one of them")
        if self.features_layer and (not self.head_weight_decay or min(self.head_weight_decay) < 0):
            raise ConfigError("rm: head_weight_decay needs at least one value >= 0")
        if (self.ensemble > 1 or self.conservative_k) and not self.features_layer:
            raise ConfigError("rm: ensemble and conservative_k need features_layer > 0 (heads on frozen features)")


@dataclasses.dataclass
class DPOConfig:
    """Direct preference optimisation on comparisons: ``palate lm dpo --config configs/lm/dpo-sentiment.yaml``."""

    model: str = doc_field("smollm2-135m-instruct", "policy to start from: an SFT run dir, a model dir, a .gguf file "
                           "or the alias")
    reference: str = doc_field("", "frozen reference pi_ref of the implicit reward (empty: model, the usual choice); "
                               "config.yaml records the one used, where `palate lm eval` finds it")
    train_data: str = doc_field("", "comparisons JSONL, as `palate lm rm` reads (rankings -> every strictly ordered "
                                "pair, best-of-K -> best vs each, pairs; ties form no pair) or hf:<dataset>[:split]")
    val_data: str = doc_field("", "held-out comparisons (may include the held-out labeller); empty: split train_data")
    val_fraction: float = doc_field(0.1, "fraction of train_data held out when val_data is empty")
    task: str = doc_field("", "built-in task whose chat setting and held-out labeller apply (sentiment|instruct)")
    chat: bool | None = doc_field(None, "format prompts with the chat template (default: the task's, else false)")
    held_out_labeller: str = doc_field("", "labeller name reported as dpo/held_out_accuracy (default: the task's)")
    beta: float = doc_field(0.1, "beta: the implicit reward is beta * (log pi - log pi_ref), the KL coefficient "
                            "of the objective DPO solves (smaller: the policy may move further)")
    label_smoothing: float = doc_field(0.0, "cDPO epsilon in [0, 0.5): each label is taken as flipped with this "
                                       "probability")
    add_eos: bool = doc_field(True, "end each completion with EOS, as a finished generation does; false for "
                              "completions cut at max_new_tokens, whose EOS the policy never produced")
    trainable_layers: int = doc_field(0, "train only the last N transformer blocks and the final norm (0: all); "
                                      "cheap on CPU")
    cache_frozen_prefix: bool = doc_field(
        True, "with trainable_layers: run the frozen lower blocks once per sequence, up front, not in every step")
    epochs: float = doc_field(1.0, "passes over the training comparisons")
    max_steps: int = doc_field(0, "stop after this many optimiser steps (0: use epochs)")
    batch_size: int = doc_field(8, "comparisons (prompts) per optimiser step, across all processes; every "
                                "strictly ordered pair of each is in the step")
    gradient_accumulation_steps: int = doc_field(1, "micro-batches per optimiser step")
    lr: float = doc_field(1e-5, "AdamW learning rate (peak, after warm-up)")
    weight_decay: float = doc_field(0.0, "AdamW weight decay")
    warmup_ratio: float = doc_field(0.1, "fraction of steps of linear warm-up, then cosine decay to lr/10")
    max_grad_norm: float = doc_field(1.0, "gradient clipping norm (0: off)")
    max_length: int = doc_field(256, "tokens of prompt + completion (prompt cut from the left)")
    forward_batch_size: int = doc_field(16, "sequences per no-grad forward (reference log-probs, validation)")
    dtype: str = doc_field("float32", "float32 on CPU; bfloat16 on GPUs")
    mixed_precision: Literal["no", "bf16", "fp16"] = doc_field("no", "accelerate mixed precision")
    cache_dir: str = doc_field("", "where converted GGUF models are cached (default $PALATE_CACHE or ~/.cache/palate)")
    eval_every: int = doc_field(50, "evaluate on val_data every this many steps (and before the first and after "
                                "the last)")
    log_every: int = doc_field(1, "log training metrics every this many steps")
    seed: int = doc_field(0, "seeds data order and the train/val split")
    run_name: str = doc_field("dpo", "the run is written to <runs_dir>/<run_name>/")
    runs_dir: str = doc_field("runs", "parent directory of runs")
    overwrite: bool = doc_field(False, "replace an existing run of the same name")
    cpu: bool = doc_field(False, "force CPU even when a GPU is present")
    tensorboard: bool = doc_field(True, "mirror metrics to TensorBoard")

    def validate(self) -> None:
        if not self.train_data:
            raise ConfigError("dpo: train_data is empty; give a comparisons JSONL (see `palate lm label`)")
        if self.beta <= 0:
            raise ConfigError(f"dpo: beta must be > 0 (0.1 is usual), got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo: label_smoothing must be in [0, 0.5) (0: plain DPO), got {self.label_smoothing}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1 or self.forward_batch_size < 1:
            raise ConfigError("dpo: batch_size, gradient_accumulation_steps and forward_batch_size must be >= 1")
        if self.trainable_layers < 0:
            raise ConfigError(f"dpo: trainable_layers must be >= 0 (0: train every block), got {self.trainable_layers}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("dpo: val_fraction must be in [0, 1)")
        if self.max_length < 8:
            raise ConfigError(f"dpo: max_length must be >= 8 tokens, got {self.max_length}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("dpo: set epochs > 0 or max_steps > 0")
