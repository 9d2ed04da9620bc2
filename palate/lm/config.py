"""Config dataclasses of every ``palate lm`` stage, in one place (no torch import: ``--help`` is instant).

``SFTConfig``, ``RMConfig``, ``DPOConfig`` (supervised and preference training), ``LMPPOConfig``,
``EvalConfig``, ``BestOfNConfig`` and ``PipelineConfig`` (RL, evaluation and the whole pipeline).
Each is also re-exported by the module that runs it (``palate.lm.sft.SFTConfig``,
``palate.lm.reward.RMConfig``, ``palate.lm.ppo.LMPPOConfig``, ...).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from palate.config import doc_field
from palate.errors import ConfigError


@dataclasses.dataclass
class TrainingRunFields:
    """The fields SFT, the reward model and DPO share: optimiser plumbing, precision, the run directory.

    ``--help`` lists them after each stage's own fields (:func:`palate.config.config_fields`).
    """

    max_steps: int = doc_field(0, "stop after this many optimiser steps (0: use epochs)")
    gradient_accumulation_steps: int = doc_field(1, "micro-batches per optimiser step")
    weight_decay: float = doc_field(0.0, "AdamW weight decay")
    max_grad_norm: float = doc_field(1.0, "gradient clipping norm (0: off)")
    dtype: str = doc_field("float32", "float32 on CPU; bfloat16 on GPUs")
    mixed_precision: Literal["no", "bf16", "fp16"] = doc_field("no", "accelerate mixed precision")
    cache_dir: str = doc_field("", "where converted GGUF models are cached (default $PALATE_CACHE or ~/.cache/palate)")
    log_every: int = doc_field(1, "log training metrics every this many steps")
    runs_dir: str = doc_field("runs", "parent directory of runs")
    overwrite: bool = doc_field(False, "replace an existing run of the same name")
    cpu: bool = doc_field(False, "force CPU even when a GPU is present")
    tensorboard: bool = doc_field(True, "mirror metrics to TensorBoard")


@dataclasses.dataclass
class SFTConfig(TrainingRunFields):
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
    batch_size: int = doc_field(8, "sequences per optimiser step, across all processes")
    lr: float = doc_field(2e-5, "AdamW learning rate (peak, after warm-up); ~1e-4 with LoRA")
    warmup_ratio: float = doc_field(0.05, "fraction of steps of linear warm-up, then cosine decay to lr/10")
    gradient_checkpointing: bool = doc_field(False, "recompute activations to save memory")
    use_lora: bool = doc_field(False, "train LoRA adapters instead of all weights (merged into model/ at the end)")
    lora_r: int = doc_field(16, "LoRA rank")
    lora_alpha: int = doc_field(32, "LoRA alpha")
    reward_model: str = doc_field("", "reward model dir: select the checkpoint by mean validation reward")
    select_prompts: int = doc_field(16, "validation prompts sampled for reward-based selection")
    max_new_tokens: int = doc_field(0, "tokens generated per prompt for selection (0: the task's default, else 48)")
    eval_every: int = doc_field(50, "validate every this many steps (and at the end)")
    seed: int = doc_field(0, "seeds data order, the train/val split and selection samples")
    run_name: str = doc_field("sft", "the run is written to <runs_dir>/<run_name>/")

    def validate(self) -> None:
        if not self.train_data:
            raise ConfigError("sft: train_data is empty; give demonstrations (see `palate lm demos`)")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1 or self.max_length < 8:
            raise ConfigError("sft: batch_size, gradient_accumulation_steps must be >= 1 and max_length >= 8")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("sft: val_fraction must be in [0, 1)")


@dataclasses.dataclass
class RMConfig(TrainingRunFields):
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
    batch_size: int = doc_field(8, "comparisons (prompts) per optimiser step, across all processes")
    lr: float = doc_field(1e-5, "AdamW learning rate (peak, after warm-up)")
    warmup_ratio: float = doc_field(0.05, "fraction of steps of linear warm-up, then cosine decay to lr/10")
    max_length: int = doc_field(256, "tokens of prompt + completion (prompt cut from the left)")
    gradient_checkpointing: bool = doc_field(False, "recompute activations to save memory")
    use_lora: bool = doc_field(False, "train LoRA adapters on the backbone (plus the head) instead of all weights")
    lora_r: int = doc_field(16, "LoRA rank")
    lora_alpha: int = doc_field(32, "LoRA alpha")
    features_layer: int = doc_field(
        0, "0: fine-tune the whole model (last-token reading). L > 0: keep the model frozen, cut after block L, "
        "and fit linear heads on the completion's mean hidden state (features computed once; seconds to fit)")
    features_pool: Literal["mean", "mean+last"] = doc_field(
        "mean", "with features_layer: what the heads read: the completion's mean hidden state, or that and the "
        "last token's concatenated (how the text ends)")
    ensemble: int = doc_field(1, "with features_layer: linear heads, each fitted on a bootstrap resample")
    conservative_k: float = doc_field(0.0, "with ensemble > 1: the reward is the heads' mean minus k times their std")
    head_weight_decay: list[float] = doc_field(
        [0.1, 0.3, 1.0, 3.0], "with features_layer: L2 strengths tried; the one with the best validation "
        "accuracy of the training labellers wins (the held-out labeller's answers are never used to choose)")
    head_steps: int = doc_field(400, "with features_layer: full-batch Adam steps per head fit")
    eval_every: int = doc_field(50, "evaluate on val_data every this many steps (and at the end)")
    seed: int = doc_field(0, "seeds data order, head initialisation and the train/val split")
    run_name: str = doc_field("rm", "the run is written to <runs_dir>/<run_name>/")

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
        if self.features_pool != "mean" and not self.features_layer:
            raise ConfigError(f"rm: features_pool: {self.features_pool} reads frozen features, so it needs "
                              "features_layer > 0; set features_layer, or drop features_pool")
        if (self.ensemble > 1 or self.conservative_k) and not self.features_layer:
            raise ConfigError("rm: ensemble and conservative_k need features_layer > 0 (heads on frozen features)")


@dataclasses.dataclass
class DPOConfig(TrainingRunFields):
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
    batch_size: int = doc_field(8, "comparisons (prompts) per optimiser step, across all processes; every "
                                "strictly ordered pair of each is in the step")
    lr: float = doc_field(1e-5, "AdamW learning rate (peak, after warm-up)")
    warmup_ratio: float = doc_field(0.1, "fraction of steps of linear warm-up, then cosine decay to lr/10")
    max_length: int = doc_field(256, "tokens of prompt + completion (prompt cut from the left)")
    forward_batch_size: int = doc_field(16, "sequences per no-grad forward (reference log-probs, validation)")
    eval_every: int = doc_field(50, "evaluate on val_data every this many steps (and before the first and after "
                                "the last)")
    seed: int = doc_field(0, "seeds data order and the train/val split")
    run_name: str = doc_field("dpo", "the run is written to <runs_dir>/<run_name>/")

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


@dataclasses.dataclass
class LMPPOConfig:
    """PPO(-ptx) on a language model. Every field is a flag, a YAML key and part of config.yaml."""

    policy: str = doc_field("smollm2-135m-instruct", "policy to start from: the SFT run dir, a model dir or alias")
    reference: str | None = doc_field(None, "frozen reference rho for the KL penalty (default: the policy)")
    reward_model: str | None = doc_field(None, "reward model dir (palate lm rm run) that scores completions")
    reward_fn: str | None = doc_field(None, "score with a task's reward function instead (e.g. 'sentiment')")
    value_init: str | None = doc_field(None, "reward model dir to start the value function from (default: reward_model)")
    task: str = doc_field("sentiment", "task whose train prompts are used (palate.data.tasks)")
    chat: bool | None = doc_field(None, "format prompts with the chat template (default: the task's setting)")
    max_prompt_length: int = doc_field(128, "prompts are cut to their last this-many tokens")
    max_new_tokens: int | None = doc_field(None, "tokens generated per completion (default: the task's)")
    temperature: float = doc_field(1.0, "sampling temperature; log-probabilities use the same one")
    kl_coef: float = doc_field(0.05, "beta: initial weight of the per-token KL penalty")
    adaptive_kl: bool = doc_field(True, "adapt beta toward kl_target (Ziegler et al. eq. 2)")
    kl_target: float = doc_field(6.0, "KL_target in nats per completion for the adaptive controller")
    kl_horizon: int = doc_field(10000, "horizon H of the adaptive controller, in samples")
    k_beta: float = doc_field(0.1, "K_beta: gain of the adaptive controller")
    kl_budget: float | None = doc_field(
        None, "stop training, before updating on a batch, once the mean KL to the reference of the last "
        "2 rollout batches exceeds this many nats per completion, keeping the policy that drew the previous "
        "batch (null = run every iteration)")
    missing_eos_penalty: float = doc_field(0.0, "subtracted from the score of completions without EOS (0 = off)")
    gamma: float = doc_field(1.0, "discount over tokens (gamma of GAE; not the ptx coefficient)")
    lam: float = doc_field(0.95, "GAE lambda over tokens")
    clip_range: float = doc_field(0.2, "epsilon of the clipped token-level ratio")
    clip_range_vf: float | None = doc_field(0.2, "value clipping around the rollout values (null = off)")
    vf_coef: float = doc_field(0.1, "weight of the value loss")
    ent_coef: float = doc_field(0.0, "weight of the entropy bonus")
    whiten_advantages: bool = doc_field(True, "normalise advantages over the batch's tokens")
    whiten_scores: bool = doc_field(False, "normalise scores over the batch before shaping")
    ppo_epochs: int = doc_field(4, "passes over each rollout batch")
    batch_size: int = doc_field(16, "prompts per rollout batch")
    mini_batch_size: int = doc_field(8, "completions per optimiser step")
    gradient_accumulation_steps: int = doc_field(1, "micro-batches per minibatch (memory, not maths)")
    forward_batch_size: int = doc_field(16, "rows per no-grad forward pass during rollouts")
    learning_rate: float = doc_field(1e-5, "AdamW learning rate of policy and value")
    weight_decay: float = doc_field(0.0, "AdamW weight decay")
    max_grad_norm: float = doc_field(1.0, "global gradient-norm clip")
    target_kl: float | None = doc_field(None, "stop a batch's epochs once approx KL(pi_old||pi) per token exceeds this")
    ptx_coef: float = doc_field(0.0, "gamma of PPO-ptx: weight of the pretraining log-likelihood (0 = plain PPO)")
    ptx_corpus: str = doc_field("python-docs", "pretraining text: 'python-docs' or a .txt/.jsonl file")
    ptx_batch_size: int = doc_field(4, "pretraining blocks per optimiser step")
    ptx_block_size: int = doc_field(128, "tokens per pretraining block")
    lora_r: int = doc_field(0, "LoRA rank for policy and value (0 = train the weights themselves)")
    lora_alpha: int = doc_field(32, "LoRA alpha")
    trainable_layers: int = doc_field(0, "train only the last N transformer blocks (0 = all); cheap on CPU")
    value_trainable_layers: int | None = doc_field(
        None, "with trainable_layers: the value model's trained blocks (null: as trainable_layers; 0: only its head, "
              "on frozen features computed once per rollout)")
    cache_frozen_prefix: bool = doc_field(
        True, "with trainable_layers: run the frozen lower blocks once per rollout, not in every update step")
    reuse_generation: bool = doc_field(
        True, "take the rollout's log pi (and prefix cache) from generation, not from a second policy forward")
    generation_static_cache: bool = doc_field(
        False, "sample with a preallocated (static) KV cache: fixed shapes, what compile_generation needs")
    compile_generation: bool = doc_field(
        False, "torch.compile the decoding step (needs generation_static_cache; the first rollout compiles)")
    iterations: int = doc_field(20, "PPO iterations (rollout + update)")
    online_every: int = doc_field(0, "every M iterations collect new comparisons and retrain the RM (0 = off)")
    online_prompts: int = doc_field(8, "prompts per online collection round")
    online_k: int = doc_field(4, "completions per prompt ranked in an online round")
    online_rm_epochs: int = doc_field(1, "reward-model epochs over all comparisons after an online round")
    online_rm_learning_rate: float = doc_field(1e-5, "learning rate of the online reward-model update")
    online_comparisons: str | None = doc_field(None, "comparisons JSONL the RM was trained on (online rounds add to it)")
    online_labeller: Literal["synthetic", "human"] = doc_field(
        "synthetic", "who ranks online rounds: the task panel's training labellers, or people through the feedback "
        "service (PPO goes on while they answer; the RM is retrained on what has arrived)")
    online_redundancy: int = doc_field(1, "human online labeller: people asked per comparison")
    feedback_url: str = doc_field("http://127.0.0.1:8000", "human online labeller: the feedback service")
    feedback_token_env: str = doc_field("PALATE_FEEDBACK_TOKEN", "human online labeller: env var holding the admin token")
    feedback_project: str | None = doc_field(None, "human online labeller: feedback project (default: the run name)")
    save_every: int = doc_field(5, "checkpoint every N iterations (and at the end)")
    log_samples: int = doc_field(4, "completions written to samples.jsonl per iteration")
    dtype: str = doc_field("float32", "weights dtype (float32 on CPU; bfloat16 on GPU)")
    device: str = doc_field("auto", "cpu, cuda or auto")
    mixed_precision: str = doc_field("no", "accelerate mixed precision: no, bf16, fp16")
    gradient_checkpointing: bool = doc_field(False, "recompute activations in backward (less memory)")
    torch_threads: int = doc_field(0, "torch CPU threads (0 = torch's default)")
    seed: int = doc_field(0, "seeds torch, numpy, sampling and prompt order")
    run_name: str = doc_field("lm-ppo", "run directory name under runs_dir")
    runs_dir: str = doc_field("runs", "parent directory of run directories")

    def validate(self) -> None:
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ConfigError("set exactly one of reward_model (an RM run dir) or reward_fn (a task name)")
        if self.kl_budget is not None and self.kl_budget <= 0:
            raise ConfigError(f"ppo: kl_budget must be > 0 nats (or null for no budget), got {self.kl_budget}")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ConfigError(f"mini_batch_size ({self.mini_batch_size}) must be a multiple of "
                              f"gradient_accumulation_steps ({self.gradient_accumulation_steps})")
        for name in ("iterations", "ppo_epochs", "batch_size", "mini_batch_size", "forward_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.ptx_coef < 0 or self.kl_coef < 0:
            raise ConfigError("ptx_coef and kl_coef must be >= 0")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.online_redundancy < 1:
            raise ConfigError(f"online_redundancy must be >= 1 (people per comparison), got {self.online_redundancy}")
        if self.value_trainable_layers is not None:
            if self.value_trainable_layers < 0:
                raise ConfigError(f"ppo: value_trainable_layers must be >= 0 (0: the value head alone) or null, "
                                  f"got {self.value_trainable_layers}")
            if self.lora_r > 0 or self.trainable_layers <= 0:
                raise ConfigError("ppo: value_trainable_layers needs trainable_layers > 0 and no LoRA (lora_r: 0); "
                                  "remove it, or set trainable_layers")
        if self.compile_generation and not self.generation_static_cache:
            raise ConfigError("compile_generation needs generation_static_cache: true (transformers compiles "
                              "only a fixed-shape cache)")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name

    @property
    def value_layers(self) -> int:
        """The value model's trained blocks (``value_trainable_layers``, or ``trainable_layers``)."""
        return self.trainable_layers if self.value_trainable_layers is None else self.value_trainable_layers


@dataclasses.dataclass
class EvalConfig:
    """``palate lm eval RUN``: the policy against its SFT reference, judged by the held-out labeller.

    With ``--judge human`` the same pairs also go to people as blind pair tasks of the feedback
    service (``palate.lm.human_eval``); their verdicts are written beside the labeller's.
    """

    run: str = doc_field("", "policy to evaluate: a PPO run dir (its model/) or a model dir")
    reference: str | None = doc_field(None, "the SFT model to compare with (default: the PPO run's reference/policy)")
    task: str | None = doc_field(None, "task (default: the PPO run's task)")
    split: str = doc_field("test", "prompt split; the held-out labeller judges on it")
    n_prompts: int = doc_field(0, "use the first this many prompts (0 = all)")
    samples_per_prompt: int = doc_field(4, "completions per prompt and model (more: a tighter win rate)")
    max_new_tokens: int | None = doc_field(None, "tokens per completion (default: the PPO run's)")
    temperature: float = doc_field(1.0, "sampling temperature of both models")
    batch_size: int = doc_field(32, "prompts per generation batch")
    reward_model: str | None = doc_field(None, "also report this reward model's mean score")
    ptx_corpus: str = doc_field("python-docs", "pretraining text whose held-out split measures the alignment tax")
    ptx_block_size: int = doc_field(128, "tokens per perplexity block")
    max_ppl_blocks: int = doc_field(32, "held-out blocks used for perplexity (0 = all)")
    n_samples_table: int = doc_field(6, "before/after sample pairs kept for the report")
    out: str | None = doc_field(None, "directory for summary.json and samples (default: <run>/eval)")
    device: str = doc_field("auto", "cpu, cuda or auto")
    torch_threads: int = doc_field(0, "torch CPU threads (0 = torch's default)")
    seed: int = doc_field(1234, "sampling and labelling-noise seed; also fixes the left/right order people see")
    judge: Literal["labeller", "human"] = doc_field(
        "labeller", "who judges the pairs: the held-out labeller, or also people through the feedback service")
    feedback_url: str = doc_field("http://127.0.0.1:8000", "human judge: the feedback service")
    feedback_token_env: str = doc_field("PALATE_FEEDBACK_TOKEN", "human judge: env var holding the admin token")
    feedback_project: str | None = doc_field(None, "human judge: feedback project (unset: <run parent>-<run name>-eval)")
    judge_redundancy: int = doc_field(1, "human judge: people asked per pair (distinct judges)")
    wait_s: float = doc_field(
        3600.0, "human judge: longest wait for answers; then what has arrived is written (run again for the rest)")

    def validate(self) -> None:
        if self.samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        from palate.feedback.tasks import MAX_REDUNDANCY

        if not 1 <= self.judge_redundancy <= MAX_REDUNDANCY:
            raise ConfigError(f"judge_redundancy must be 1..{MAX_REDUNDANCY} (people per pair), "
                              f"got {self.judge_redundancy}")
        if self.wait_s < 0:
            raise ConfigError(f"wait_s must be >= 0 seconds, got {self.wait_s}")


@dataclasses.dataclass
class BestOfNConfig:
    """``palate lm bon``: best-of-N sampling with the reward model, the baseline PPO is measured against.

    N completions per test prompt from the SFT model; the reward model picks one. For every
    N = 1, 2, 4, ..., n the stage reports the reward model's score of the pick (the proxy), the
    held-out labeller's utility of it (the gold score), the held-out labeller's expected win rate
    against an SFT sample, and the KL of best-of-N to SFT, log N - (N - 1) / N (Gao et al. 2022).
    """

    model: str = doc_field("", "the SFT model that samples (a run dir, model dir or alias)")
    reward_model: str = doc_field("", "reward model dir (palate lm rm run) that picks the best sample")
    task: str = doc_field("sentiment", "task whose prompts and held-out labeller are used")
    split: str = doc_field("test", "prompt split")
    n_prompts: int = doc_field(0, "use the first this many prompts (0 = all)")
    n: int = doc_field(16, "samples per prompt: the largest N (a power of 2); smaller N are estimated from them")
    max_new_tokens: int | None = doc_field(None, "tokens per completion (default: the task's)")
    temperature: float = doc_field(1.0, "sampling temperature")
    batch_size: int = doc_field(32, "prompts x samples per generation batch")
    out: str = doc_field("", "directory for summary.json and samples.jsonl")
    device: str = doc_field("auto", "cpu, cuda or auto")
    torch_threads: int = doc_field(0, "torch CPU threads (0 = torch's default)")
    seed: int = doc_field(4321, "sampling seed")

    def validate(self) -> None:
        if self.n < 1 or self.n & (self.n - 1):
            raise ConfigError(f"bon: n must be a power of 2 (1, 2, 4, ..., 64), got {self.n}")
        if not self.model or not self.reward_model:
            raise ConfigError("bon: set model (the SFT model) and reward_model (a palate lm rm run)")
        if not self.out:
            raise ConfigError("bon: set out, the directory the results are written to")
        if self.temperature <= 0:
            raise ConfigError(f"bon: temperature must be > 0 (best-of-N needs N different samples), got {self.temperature}")


PIPELINE_STAGES = ("demos", "sft", "label", "rm", "ppo", "eval", "bon", "dpo", "dpo_eval", "report")
# What a pipeline runs unless ``stages`` says otherwise: DPO (the offline baseline on the same
# rankings) doubles the CPU time of the demo, so it is asked for, e.g. ``--stages dpo,dpo_eval,report``
# after a finished run.
DEFAULT_PIPELINE_STAGES = ("demos", "sft", "label", "rm", "ppo", "eval", "bon", "report")


@dataclasses.dataclass
class PipelineConfig:
    """``palate lm pipeline``: demonstrations -> SFT -> comparisons -> RM -> PPO(-ptx) -> eval -> report.

    Each stage's section (``sft:``, ``rm:``, ``ppo:``...) holds fields of that stage's own config
    (SFTConfig, RMConfig, LMPPOConfig...); the pipeline fills in the paths that chain them.
    """

    name: str = doc_field("sentiment", "pipeline name: stages are written to <runs_dir>/<name>/<stage>/")
    runs_dir: str = doc_field("runs", "parent directory of pipelines")
    task: str = doc_field("sentiment", "built-in task (sentiment|instruct)")
    base_model: str = doc_field("smollm2-135m-instruct", "pretrained model everything starts from")
    ppo_reward: str = doc_field("rm", "what PPO maximises: 'rm' (the learned reward model, InstructGPT) or "
                                "'task' (the task's reward function, Ziegler's mock sentiment classifier)")
    stages: list[str] = doc_field(list(DEFAULT_PIPELINE_STAGES),
                                  "stages to run, in order (done ones are skipped); also available: dpo, dpo_eval "
                                  "(DPO on the same rankings from the SFT model, and its evaluation)")
    seed: int = doc_field(0, "seed of every stage")
    torch_threads: int = doc_field(0, "torch CPU threads for every stage (0 = torch's default)")
    demos: dict[str, Any] = doc_field({}, "DemosConfig fields (best-of-N demonstrations for SFT)")
    sft: dict[str, Any] = doc_field({}, "SFTConfig fields")
    label: dict[str, Any] = doc_field({}, "LabelConfig fields (comparisons for the reward model)")
    label_val: dict[str, Any] = doc_field(
        {}, "LabelConfig fields of the RM's validation set, written by the label stage to label/val.jsonl "
        "(e.g. {split: validation, labellers: all}: validation prompts ranked by every labeller, the held-out "
        "one included, which is how rm/held_out_accuracy is measured); empty: no such set, the RM splits "
        "its training comparisons")
    rm: dict[str, Any] = doc_field({}, "RMConfig fields")
    ppo: dict[str, Any] = doc_field({}, "LMPPOConfig fields")
    eval: dict[str, Any] = doc_field({}, "EvalConfig fields")
    bon: dict[str, Any] = doc_field({}, "BestOfNConfig fields (the best-of-N baseline and the overoptimisation plot)")
    dpo: dict[str, Any] = doc_field({}, "DPOConfig fields (the offline baseline on the label stage's rankings)")
    dpo_eval: dict[str, Any] = doc_field({}, "EvalConfig fields for the DPO policy, over the eval section's "
                                         "(by default it is judged exactly as PPO is, on the same prompts)")

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in PIPELINE_STAGES]
        if unknown:
            raise ConfigError(f"unknown pipeline stage(s) {unknown}; stages are {list(PIPELINE_STAGES)}")
        if self.ppo_reward not in ("rm", "task"):
            raise ConfigError(f"ppo_reward must be 'rm' or 'task', got {self.ppo_reward!r}")

    @property
    def root(self) -> Path:
        return Path(self.runs_dir) / self.name
