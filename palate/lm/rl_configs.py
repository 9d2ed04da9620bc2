"""Config dataclasses of ``palate lm ppo``, ``eval``, ``bon`` and ``pipeline`` (torch-free: ``--help`` is instant).

Each is re-exported where it is used (``palate.lm.ppo.LMPPOConfig``,
``palate.lm.evaluate.EvalConfig``, ``palate.lm.pipeline.PipelineConfig``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from palate.config import doc_field
from palate.errors import ConfigError


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
    cache_frozen_prefix: bool = doc_field(
        True, "with trainable_layers: run the frozen lower blocks once per rollout, not in every update step")
    reuse_generation: bool = doc_field(
        True, "take the rollout's log pi (and prefix cache) from generation, not from a second policy forward")
    iterations: int = doc_field(20, "PPO iterations (rollout + update)")
    online_every: int = doc_field(0, "every M iterations collect new comparisons and retrain the RM (0 = off)")
    online_prompts: int = doc_field(8, "prompts per online collection round")
    online_k: int = doc_field(4, "completions per prompt ranked in an online round")
    online_rm_epochs: int = doc_field(1, "reward-model epochs over all comparisons after an online round")
    online_rm_learning_rate: float = doc_field(1e-5, "learning rate of the online reward-model update")
    online_comparisons: str | None = doc_field(None, "comparisons JSONL the RM was trained on (online rounds add to it)")
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

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name


@dataclasses.dataclass
class EvalConfig:
    """``palate lm eval RUN``: the policy against its SFT reference, judged by the held-out labeller."""

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
    seed: int = doc_field(1234, "sampling and labelling-noise seed")

    def validate(self) -> None:
        if self.samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")


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
