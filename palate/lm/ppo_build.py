"""Assembling an LM PPO trainer from its config: models, task, reward, value init, what trains.

:func:`build_trainer` loads what :class:`palate.lm.ppo.LMPPOTrainer` is given (tests inject tiny
models directly instead); :func:`train_ppo` is ``palate lm ppo``: a run directory, then the loop.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from palate.config import config_to_dict
from palate.errors import CheckpointError, ConfigError
from palate.lm.config import LMPPOConfig
from palate.lm.ppo import LMPPOTrainer
from palate.lm.rollout import make_score_fn
from palate.lm.trainable import make_trainable
from palate.lm.value import ValueModel
from palate.runs import prepare_run_dir, seed_everything

__all__ = ["build_trainer", "load_ptx_blocks", "train_ppo"]



def _device(cfg: LMPPOConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def load_ptx_blocks(cfg: LMPPOConfig, tokenizer) -> torch.Tensor | None:
    """Training blocks of the ptx corpus (the held-out split is kept for the alignment tax)."""
    if cfg.ptx_coef <= 0:
        return None
    from palate.lm.pretrain_text import load_corpus, pack_tokens, split_corpus

    train_docs, _held_out = split_corpus(load_corpus(cfg.ptx_corpus))
    return pack_tokens(tokenizer, train_docs, cfg.ptx_block_size)


def build_trainer(cfg: LMPPOConfig) -> LMPPOTrainer:
    """Load models, task and reward for ``cfg`` and return a ready trainer."""
    from palate.data.tasks import load_task
    from palate.lm.formatting import encode_prompt_completion
    from palate.lm.models import load_model

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    seed_everything(cfg.seed)
    device = _device(cfg)
    policy, tokenizer = load_model(cfg.policy, dtype=cfg.dtype, device=device,
                                   gradient_checkpointing=cfg.gradient_checkpointing)
    task = load_task(cfg.task)
    chat = task.chat if cfg.chat is None else cfg.chat
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = task.max_new_tokens

    reference = None
    if cfg.reference and cfg.reference != cfg.policy:
        reference, _ = load_model(cfg.reference, dtype=cfg.dtype, device=device)
    elif cfg.lora_r <= 0:
        reference = copy.deepcopy(policy)

    score_fn, rm = make_score_fn(cfg, tokenizer, device)
    value_src = cfg.value_init or cfg.reward_model
    if rm is not None and value_src == cfg.reward_model:
        value = ValueModel.from_reward_model(rm)
    elif value_src:
        from palate.lm.reward_model import RewardModel

        value = ValueModel.from_reward_model(RewardModel.from_pretrained(value_src, dtype=cfg.dtype, device=device))
        # The reward is not this RM's score (e.g. a task's reward function): keep the RM's features,
        # which know what the labellers like, but start V at 0 instead of at a score on another scale.
        nn.init.zeros_(value.head.weight)
        nn.init.zeros_(value.head.bias)
    else:
        value = ValueModel.from_causal_lm(policy)
    value.requires_grad_(True)

    policy = make_trainable(policy, value, cfg.lora_r, cfg.lora_alpha, cfg.trainable_layers, cfg.value_layers)

    def encode_prompt(prompt: str) -> list[int]:
        # Exactly the prompt tokens SFT and the reward model saw (same template, same BOS rule).
        return encode_prompt_completion(tokenizer, prompt, "", chat, cfg.max_prompt_length, add_eos=False)["input_ids"]

    online = None
    if cfg.online_every > 0:
        from palate.lm.online import OnlineCollector

        if rm is None:
            raise ConfigError("online_every > 0 retrains the reward model, so it needs reward_model (not reward_fn)")
        online = OnlineCollector.from_config(cfg, rm, tokenizer, task, cfg.online_comparisons)
    return LMPPOTrainer(cfg, policy, tokenizer, value, score_fn, task.prompts("train"), encode_prompt,
                        reference=reference, ptx_blocks=load_ptx_blocks(cfg, tokenizer), online=online)


def train_ppo(cfg: LMPPOConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train and return the run directory (``<run>/model`` holds the policy)."""
    from accelerate import PartialState

    run_dir = cfg.run_dir
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"cannot resume {run_dir}: no config.yaml there")
    else:
        # Under `accelerate launch` every process runs this: the main one makes the directory,
        # the others wait for it (PartialState is the launch's process group, or one process).
        state = PartialState(cpu=_device(cfg) == "cpu")
        if (run_dir / "config.yaml").exists() and not overwrite:  # every process refuses alike
            prepare_run_dir(run_dir, {}, overwrite=False)
        state.wait_for_everyone()
        if state.is_main_process:
            prepare_run_dir(run_dir, config_to_dict(cfg), overwrite=overwrite)
        state.wait_for_everyone()
    trainer = build_trainer(cfg)
    trainer.train(run_dir, resume=resume)
    return run_dir
