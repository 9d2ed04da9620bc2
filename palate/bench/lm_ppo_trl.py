"""The TRL arms of :mod:`palate.bench.lm_ppo`: TRL 1.12's PPO and TRL 1.16's RLOO and GRPO.

Each runs in its own process with its TRL on ``PYTHONPATH`` (see :mod:`palate.bench.lm_ppo`), from
the same SFT model, on the same reward model (exported to TRL's sequence-classifier format where
TRL needs it) and with the same budget as palate's arm.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from palate.errors import ConfigError
from palate.runs import atomic_write_text


def trl_ppo_blocker(rm_dir: str | Path) -> str | None:
    """Why TRL 1.12's PPO cannot use this reward model, or ``None`` if it can.

    Its ``PPOTrainer`` scores with a sequence classifier: one linear head on the last token's
    hidden state. A palate RM that mean-pools over the completion, or averages an ensemble of
    heads, computes something that model cannot express; reads only the RM's metadata.
    """
    rm_dir = Path(rm_dir)
    meta_file = next((d / "reward.json" for d in (rm_dir, rm_dir / "model")
                      if (d / "reward.json").is_file()), None)  # RewardModel.save_pretrained's metadata
    if meta_file is None:
        return None  # not a palate RM directory: let the arm's own loading report it
    meta = json.loads(meta_file.read_text())
    pool, heads = meta.get("pool", "last"), int(meta.get("n_heads", 1))
    if pool == "last" and heads == 1:
        return None
    return (f"not run: TRL 1.12's PPOTrainer reads the RM as a LlamaForSequenceClassification (one head at "
            f"the last token); this RM mean-pools ({pool}) over the completion with {heads} heads. Pass a "
            f"last-token one-head RM (`palate lm rm` without features_layer) to run it")


def export_reward_model_for_trl(rm_dir: Path, out: Path) -> Path:
    """palate's RewardModel as a ``LlamaForSequenceClassification`` directory (TRL's RM format).

    The normalised score is ``gain * (w.h + b) + bias``; the HF head has no bias, so it gets
    ``gain * w`` and the constant ``gain * b + bias`` is dropped: a constant added to every
    score changes neither PPO's advantages (whitened) nor its ordering of samples.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from palate.lm.reward_model import load_reward_model

    if (out / "config.json").is_file():
        return out
    rm, tok = load_reward_model(rm_dir)
    if rm.pool != "last" or rm.n_heads != 1:
        raise ConfigError(f"{rm_dir}: TRL's sequence classifier reads one head at the last token; this reward "
                          f"model mean-pools ({rm.pool}) over {rm.n_heads} head(s). Train it with features_layer: 0")
    config = AutoConfig.for_model(rm.backbone.config.model_type, **{
        k: v for k, v in rm.backbone.config.to_dict().items() if k not in ("model_type", "_name_or_path")})
    config.num_labels = 1
    config.pad_token_id = tok.pad_token_id
    seq = AutoModelForSequenceClassification.from_config(config)
    getattr(seq, seq.base_model_prefix).load_state_dict(rm.backbone.state_dict())
    with torch.no_grad():
        seq.score.weight.copy_(rm.head.weight * rm.gain)
    seq.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def arm_trl_ppo(work: Path, sft: str, rm_dir: str, s: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from palate.data.tasks import load_task

    hf_rm = export_reward_model_for_trl(Path(rm_dir), work / "trl-rm")
    tok = AutoTokenizer.from_pretrained(sft, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = load_task("sentiment").prompts("train")
    # Raw text prompts, tokenised as palate's formatting does for non-chat tasks.
    ds = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})
    policy = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(str(hf_rm), num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(str(hf_rm), num_labels=1, dtype=torch.float32)
    if s["trainable_layers"]:
        # The same trainable set as palate's arm; HF's Trainer builds its optimiser from requires_grad.
        from palate.lm.trainable import freeze_all_but_last_layers

        freeze_all_but_last_layers(policy, s["trainable_layers"])
        freeze_all_but_last_layers(value, s["trainable_layers"])
        value.score.requires_grad_(True)
    # TRL 1.12 PPO's rollout batch is per_device_train_batch_size x gradient_accumulation_steps, cut into
    # num_mini_batches minibatches, each walked in micro-batches of per_device_train_batch_size under
    # accelerate's accumulation. So one optimiser step per minibatch of mini_batch_size, as palate's,
    # needs gradient_accumulation_steps=1 and a micro-batch no smaller than the minibatch.
    args = PPOConfig(
        output_dir=str(work / "trl-ppo"), per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=s["batch_size"] // s["mini_batch_size"], num_ppo_epochs=s["ppo_epochs"],
        total_episodes=s["iterations"] * s["batch_size"], response_length=s["max_new_tokens"],
        learning_rate=s["learning_rate"], lr_scheduler_type="constant", kl_coef=s["kl_coef"], temperature=1.0,
        stop_token="eos", local_rollout_forward_batch_size=s["batch_size"], num_sample_generations=0,
        report_to="none", save_strategy="no", seed=s["seed"], use_cpu=True, logging_steps=1,
        per_device_eval_batch_size=1)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=ds, value_model=value, eval_dataset=ds.select(range(2)))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    out = work / "trl-ppo" / "model"
    trainer.policy_model.save_pretrained(out) if hasattr(trainer, "policy_model") else policy.save_pretrained(out)
    tok.save_pretrained(out)
    logs = [h for h in trainer.state.log_history if "objective/rlhf_reward" in h or "objective/scores" in h]
    last = logs[-1] if logs else {}
    return {"train_wall_s": wall, "generated_tokens": s["iterations"] * s["batch_size"] * s["max_new_tokens"],
            "generated_tokens_note": "upper bound (TRL does not log response lengths)", "model": str(out),
            "final_train_reward": last.get("objective/scores"), "final_train_kl": last.get("objective/kl")}


def arm_trl_rloo(work: Path, sft: str, rm_dir: str, s: dict[str, Any]) -> dict[str, Any]:
    """TRL 1.16's RLOOTrainer on the same budget: ``batch_size / rloo_k`` prompts x ``rloo_k`` completions.

    The reward is palate's RM called as a reward function, not the ``LlamaForSequenceClassification``
    export the trl-ppo arm needs: RLOO scores ``prompt + completion`` as one string with no EOS, and with
    SmolLM2's pad token = EOS the HF head would read the last text token, while palate's RM was trained
    on, and palate's arm and the common evaluation score at, the EOS that
    :meth:`~palate.lm.reward_model.RewardModel.score_texts` appends. The function gives RLOO exactly their
    score, whatever the RM's pooling or number of heads.
    """
    return _arm_trl_group("rloo", work, sft, rm_dir, s)


def arm_trl_grpo(work: Path, sft: str, rm_dir: str, s: dict[str, Any]) -> dict[str, Any]:
    """TRL 1.16's GRPOTrainer through the same reward function: ``batch_size / grpo_k`` x ``grpo_k``."""
    return _arm_trl_group("grpo", work, sft, rm_dir, s)


def _arm_trl_group(kind: str, work: Path, sft: str, rm_dir: str, s: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palate.data.tasks import load_task
    from palate.lm.reward_model import RewardModel
    from palate.lm.trainable import freeze_all_but_last_layers

    if kind == "rloo":
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    name = f"trl-{kind}"
    from palate.bench.lm_ppo import GROUP_K  # the settings live with the benchmark's driver

    k = s[GROUP_K[name]]
    tok = AutoTokenizer.from_pretrained(sft, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rm = RewardModel.from_pretrained(rm_dir)
    rm.eval()
    rm.requires_grad_(False)
    generated = [0]  # completion tokens (EOS included, as palate's response/length counts it)

    def palate_rm(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
        generated[0] += sum(len(ids) for ids in completion_ids)
        return rm.score_texts(list(prompts), list(completions), tok, batch_size=s["batch_size"]).tolist()

    ds = Dataset.from_dict({"prompt": load_task("sentiment").prompts("train")})  # raw text, as the other arms
    policy = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    if s["trainable_layers"]:
        freeze_all_but_last_layers(policy, s["trainable_layers"])  # the optimiser takes requires_grad params
    steps_per_batch = s["batch_size"] // s["mini_batch_size"]
    # What differs between the two: RLOO's leave-one-out advantages get the batch normalisation the PPO
    # arms' whitening gives theirs (so one learning rate means the same step size); GRPO keeps its own
    # defaults (group-scaled rewards, the dapo loss), as a GRPO user would run it.
    own = {"normalize_advantages": True} if kind == "rloo" else {}
    args = Config(
        output_dir=str(work / name),
        # One generation batch of batch_size completions (batch_size / k prompts), shuffled and cut into
        # steps_per_batch minibatches of mini_batch_size, one optimiser step each, reused ppo_epochs
        # times (num_iterations, mu), then the next batch: `iterations` generation batches in all.
        num_generations=k, per_device_train_batch_size=s["mini_batch_size"],
        gradient_accumulation_steps=1, steps_per_generation=steps_per_batch, num_iterations=s["ppo_epochs"],
        max_steps=s["iterations"] * s["ppo_epochs"] * steps_per_batch,
        max_completion_length=s["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        # beta: RLOO subtracts the sequence's summed log(pi/ref) from its score, as palate's KL shaping
        # sums; GRPO adds beta x the per-token k3 estimate of KL(pi||ref) to its loss.
        beta=s["kl_coef"], epsilon=0.2, **own,
        learning_rate=s["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=0.0, max_grad_norm=1.0,
        # TRL's defaults (bf16 autocast, gradient checkpointing) would differ from palate's float32 run.
        bf16=False, gradient_checkpointing=False, disable_dropout=True,
        use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=s["seed"],
        dataloader_num_workers=0)
    trainer = Trainer(model=policy, reward_funcs=palate_rm, args=args, train_dataset=ds, processing_class=tok)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    out = work / name / "model"
    trainer.model.save_pretrained(out)
    tok.save_pretrained(out)
    history = trainer.state.log_history
    atomic_write_text(work / name / "log_history.json", json.dumps(history, indent=1))
    # Generation-time metrics land in the first log after each generation batch.
    logs = [h for h in history if "reward" in h and "completions/mean_length" in h]
    last = logs[-1] if logs else {}
    kl_token = last.get("kl")
    return {"train_wall_s": wall, "generated_tokens": generated[0], "model": str(out),
            "final_train_reward": last.get("reward"),
            # TRL logs a per-token mean; x mean length = the mean per-sequence sum palate logs.
            "final_train_kl": None if kl_token is None else kl_token * last["completions/mean_length"],
            "optimizer_steps": trainer.state.global_step,
            # Steps where every sample was outside the clip range (RLOO clips the sequence's ratio): no update.
            "zero_grad_steps": sum(1 for h in history if h.get("grad_norm") == 0.0)}
