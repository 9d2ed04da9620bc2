"""PPO for language models with a per-token KL penalty (Ziegler et al. 2019; InstructGPT, 2022).

One iteration, top to bottom, like CleanRL's single-file PPO:

1. **Rollout**: sample one completion per prompt from pi (temperature 1, stop at EOS), then one
   no-grad forward each for log pi, log rho (the frozen SFT reference) and V.
2. **Score**: the reward model's normalised score, or a reward function (Ziegler's mock
   sentiment task scores with a classifier), minus a penalty if the completion never ended.
3. **Shape**: r_t = -beta (log pi - log rho) at every token, + score at the last token
   (:func:`palate.core.kl.kl_shaped_rewards`); GAE over tokens (:func:`gae_masked`).
4. **Update**: several epochs of minibatches of the clipped token-level surrogate, clipped value
   loss, optional entropy bonus and, for PPO-ptx, gamma x pretraining NLL; stop the epochs early
   when the policy has moved more than ``target_kl`` from the rollout policy.
5. **Adapt beta** toward ``kl_target`` (Ziegler eq. 2) and log.

The value function has the reward model's shape (backbone + scalar head) and starts *as* the
reward model (InstructGPT, appendix C.3), so its first predictions are already calibrated.

Under ``accelerate launch --num_processes N`` (DDP) each process samples and scores a slice of
the global batch, the slices are gathered so steps 3 and 5 see the whole batch, and each process
takes a slice of every minibatch in step 4: the run makes the one-process updates
(docs/gpu.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from palate.core.advantages import gae_masked
from palate.core.kl import AdaptiveKLController, FixedKLController, KLBudget, kl_shaped_rewards
from palate.core.ppo import clipped_surrogate_loss, value_loss
from palate.core.stats import explained_variance, masked_mean, whiten
from palate.errors import ConfigError
from palate.lm.config import LMPPOConfig
from palate.lm.generation import (
    GenerationEngine,
    HFGenerate,
    RolloutBatch,
    SampleTrace,
    contiguous_head_input,
    decode_responses,
    logits_to_logprobs,
    row_seed,
)
from palate.lm.ppo_checkpoint import PPOCheckpointMixin, read_metrics
from palate.lm.pretrain_text import PretrainBatches
from palate.lm.rollout import (
    PromptSampler,
    Rollout,
    ScoreFn,
    forward_rollout,
    gather_rollout,
    make_score_fn,
    setup_prefix_cache,
    shard_bounds,
)
from palate.lm.trainable import (
    checkpointing_armed,
    enable_block_checkpointing,
    freeze_all_but_last_layers,
    lora_config,
)
from palate.lm.training import adamw, peak_gpu_mb, peak_rss_mb, reset_accelerator_settings
from palate.lm.value import PolicyAndValue, ValueModel, fold_normalisation
from palate.runs import (
    MetricsLogger,
    atomic_write_json,
    truncate_metrics,
)

# Where users import the PPO parts from (the tests and scripts/gpu do).
__all__ = ["LMPPOConfig", "LMPPOTrainer", "PolicyAndValue", "PromptSampler", "Rollout", "ScoreFn", "ValueModel",
           "fold_normalisation", "freeze_all_but_last_layers", "lora_config", "make_score_fn",
           "read_metrics"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Trainer


class LMPPOTrainer(PPOCheckpointMixin):
    """The PPO(-ptx) loop over injected parts: policy, reference, value model, scorer, prompts.

    :func:`build_trainer` assembles these from a config (model loading, the task, the reward
    model); tests inject tiny models and simple reward functions directly.

    Args:
        cfg: the run's config.
        policy: causal LM being trained (a ``peft`` model when ``cfg.lora_r > 0``).
        tokenizer: its tokenizer.
        value_model: V; a :class:`ValueModel`.
        score_fn: ``(prompts, completions) -> [B]`` scores.
        prompts: prompt texts (what ``score_fn`` and the labellers see).
        encode_prompt: prompt text -> token ids as the policy must see it (chat template etc.).
        reference: frozen rho; ``None`` with LoRA means "the policy with adapters disabled".
        ptx_blocks: ``[N, T]`` pretraining token blocks for PPO-ptx (needed when ptx_coef > 0).
        online: an :class:`palate.lm.online.OnlineCollector` run every ``cfg.online_every`` iterations.
        engine: what samples the rollouts (:class:`palate.lm.generation.GenerationEngine`); by default
            transformers' ``generate`` with the config's cache and compile settings.
    """

    def __init__(self, cfg: LMPPOConfig, policy: nn.Module, tokenizer, value_model: ValueModel,
                 score_fn: ScoreFn, prompts: Sequence[str], encode_prompt: Callable[[str], list[int]],
                 reference: nn.Module | None = None, ptx_blocks: torch.Tensor | None = None,
                 online: Any = None, engine: GenerationEngine | None = None) -> None:
        from accelerate import Accelerator

        if cfg.ptx_coef > 0 and ptx_blocks is None:
            raise ConfigError("ptx_coef > 0 needs pretraining text (ptx_blocks); set ptx_corpus or ptx_coef: 0")
        if reference is None and not hasattr(policy, "disable_adapter"):
            raise ConfigError("without LoRA the trainer needs an explicit frozen reference model")
        if not prompts:
            raise ConfigError("no prompts to train on")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.score_fn = score_fn
        self.prompts = list(prompts)
        self.prompt_ids = [encode_prompt(p)[-cfg.max_prompt_length:] for p in self.prompts]
        self.online = online
        self.engine = engine or HFGenerate(traced=cfg.reuse_generation, static_cache=cfg.generation_static_cache,
                                           compile=cfg.compile_generation)
        cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        reset_accelerator_settings()
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision)
        self.device = self.accelerator.device

        self.reference = reference
        contiguous_head_input(policy)
        if reference is not None:
            contiguous_head_input(reference)
            reference.requires_grad_(False)
            reference.eval()
            reference.to(self.device)
        policy.eval()  # no dropout anywhere: PPO's ratio must be 1 before the first step
        value_model.eval()
        # Blocks of both networks that recompute activations in the update's backward pass.
        self.checkpointed: list[nn.Module] = []
        if cfg.gradient_checkpointing:
            self.checkpointed = enable_block_checkpointing(policy) + enable_block_checkpointing(value_model.backbone)
        self.model = PolicyAndValue(policy, value_model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("nothing to train: every parameter is frozen (check lora_r / trainable_layers)")
        optimizer = adamw(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self._check_processes(cfg, online)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.unwrapped: PolicyAndValue = self.accelerator.unwrap_model(self.model)
        self.ref_shares_prefix = False
        if cfg.cache_frozen_prefix and cfg.trainable_layers > 0:
            self._setup_prefix_cache(cfg.trainable_layers, cfg.value_layers)

        if cfg.adaptive_kl:
            self.kl_ctl: Any = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.k_beta)
        else:
            self.kl_ctl = FixedKLController(cfg.kl_coef)
        self.sampler = PromptSampler(len(self.prompts), cfg.seed)
        self.ptx = PretrainBatches(ptx_blocks, cfg.ptx_batch_size, cfg.seed) if cfg.ptx_coef > 0 else None
        self.update_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.iteration = 0
        self.kl_budget = KLBudget(cfg.kl_budget)
        # With a budget: the trainable weights that drew the last batch within it, restored at the stop.
        self._within_budget: dict[str, torch.Tensor] | None = None
        self.max_new_tokens = cfg.max_new_tokens or 24
        self._generation_s = 0.0

    def _check_processes(self, cfg: LMPPOConfig, online: Any) -> None:
        """Refuse what a multi-process run cannot do, before anything is trained."""
        n = self.accelerator.num_processes
        if n == 1:
            return
        kind = str(self.accelerator.distributed_type)
        if "DEEPSPEED" in kind or "FSDP" in kind:
            raise ConfigError(f"LM PPO runs data-parallel under DDP only (this launch is {kind}): its checkpoint "
                              "holds one replica of the optimiser; launch with configs/accelerate/ddp.yaml")
        if cfg.mini_batch_size % (n * cfg.gradient_accumulation_steps):
            raise ConfigError(f"mini_batch_size ({cfg.mini_batch_size}) must be a multiple of num_processes x "
                              f"gradient_accumulation_steps ({n} x {cfg.gradient_accumulation_steps}): each process "
                              "takes an equal share of every minibatch")
        if cfg.ptx_coef > 0 and cfg.ptx_batch_size < n * cfg.gradient_accumulation_steps:
            raise ConfigError(f"ptx_batch_size ({cfg.ptx_batch_size}) must be at least num_processes x "
                              f"gradient_accumulation_steps ({n} x {cfg.gradient_accumulation_steps})")
        if online is not None:
            raise ConfigError("online collection (online_every > 0) runs in one process only; launch without "
                              "accelerate's --num_processes or set online_every: 0")

    # -- rollout ---------------------------------------------------------------------------

    def _setup_prefix_cache(self, trainable_layers: int, value_layers: int) -> None:
        vocab = int(getattr(self.unwrapped.policy.config, "vocab_size", 0) or len(self.tokenizer))
        self.ref_shares_prefix = setup_prefix_cache(self.unwrapped, self.reference, vocab, trainable_layers,
                                                    self.device, value_layers)

    def _forward_rollout(self, batch: RolloutBatch, trace: SampleTrace | None = None) -> tuple[torch.Tensor | None, ...]:
        """:func:`palate.lm.rollout.forward_rollout` on this trainer's networks."""
        return forward_rollout(self.unwrapped, self.reference, self.ref_shares_prefix, batch,
                               self.cfg.forward_batch_size, self.cfg.temperature, self.device, trace)

    def rollout(self) -> Rollout:
        """Sample, score and shape one global batch of ``batch_size`` prompts.

        Every process draws the same global prompt indices, samples and scores its contiguous
        slice (each row seeded by its place in the global batch, :func:`row_seed`), and the shards
        are gathered: shaping and whitening then see the whole batch, as in one process.
        """
        cfg = self.cfg
        acc = self.accelerator
        index = self.sampler.next(cfg.batch_size)
        lo, hi = shard_bounds(cfg.batch_size, acc.process_index, acc.num_processes)
        ids = [self.prompt_ids[i] for i in index[lo:hi]]
        seeds = [row_seed(cfg.seed, self.iteration, j) for j in range(lo, hi)]
        # Under mixed_precision (bf16) the rollout's passes run in it too, as the update's do.
        with acc.autocast():
            t0 = time.perf_counter()
            batch, trace = self.engine(self.unwrapped.policy, self.tokenizer, ids, self.max_new_tokens,
                                       cfg.temperature, seeds, capture_block=self.unwrapped.policy_start or None)
            self._generation_s = time.perf_counter() - t0
            logp, ref_logp, entropy, values, policy_prefix, value_prefix = self._forward_rollout(batch, trace)
            local_prompts = [self.prompts[i] for i in index[lo:hi]]
            scores = torch.as_tensor(self.score_fn(local_prompts, decode_responses(self.tokenizer, batch)),
                                     dtype=torch.float32).detach().cpu().view(-1)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        batch, (logp, ref_logp, entropy, values), (policy_prefix, value_prefix), (scores,) = gather_rollout(
            acc, batch, pad_id, (logp, ref_logp, entropy, values), (policy_prefix, value_prefix), (scores,))
        prompts = [self.prompts[i] for i in index]
        completions = decode_responses(self.tokenizer, batch)
        ro = self._shape(batch, prompts, completions, scores, logp, ref_logp, values, entropy)
        ro.policy_prefix, ro.value_prefix = policy_prefix, value_prefix
        return ro

    def _shape(self, batch: RolloutBatch, prompts: list[str], completions: list[str], scores: torch.Tensor,
               logp: torch.Tensor, ref_logp: torch.Tensor, values: torch.Tensor, entropy: torch.Tensor) -> Rollout:
        """Scores -> per-token rewards -> GAE advantages, all on the rollout's tokens only."""
        cfg = self.cfg
        mask = batch.response_mask
        shaped = scores.clone()
        if cfg.missing_eos_penalty:
            shaped = shaped - cfg.missing_eos_penalty * (~batch.ended).float()
        if cfg.whiten_scores and len(shaped) > 1:
            shaped = whiten(shaped)
        rewards, kl = kl_shaped_rewards(shaped, logp, ref_logp, mask, self.kl_ctl.kl_coef)
        advantages, returns = gae_masked(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        return Rollout(batch, prompts, completions, scores, logp, ref_logp, values, entropy, rewards, kl,
                       advantages, returns)

    # -- update ----------------------------------------------------------------------------

    # Per optimiser step, each process sums these over its micro-batches; the first six are sums
    # over response tokens (divided by the minibatch's token count after the reduction), ptx_loss
    # is already its share of the minibatch's mean pretraining NLL.
    _STATS = ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac", "entropy", "ptx_loss")

    def update(self, ro: Rollout) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatches; stop early past ``target_kl``.

        Every process holds the whole rollout and draws the same permutation; of each minibatch of
        ``mini_batch_size`` completions process ``r`` takes the ``r``-th equal slice. Losses are sums
        over the slice's tokens divided by the *minibatch's* token count and multiplied by the
        number of processes, so the gradient DDP averages is the one-process gradient of the
        minibatch's token mean (the convention of :mod:`palate.lm.training`); gradient accumulation
        then changes memory, not the maths.
        """
        cfg = self.cfg
        per_step: list[torch.Tensor] = []
        with checkpointing_armed(self.checkpointed):
            epochs_done = self._epochs(ro, per_step)
        steps = torch.cat(per_step).mean(0)
        out = {k: float(v) for k, v in zip(self._STATS, steps)}
        if cfg.clip_range_vf is None:
            del out["vf_clipfrac"]
        if self.ptx is None:
            del out["ptx_loss"]
        out["epochs"] = epochs_done
        return out

    def _epochs(self, ro: Rollout, per_step: list[torch.Tensor]) -> int:
        """The epochs of :meth:`update`; appends each epoch's per-step statistics, returns how many ran."""
        cfg = self.cfg
        acc = self.accelerator
        n_proc, rank = acc.num_processes, acc.process_index
        per_process = cfg.mini_batch_size // n_proc
        micro = per_process // cfg.gradient_accumulation_steps
        token_mask = ro.batch.response_mask.float()
        epochs_done = 0
        for _epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(len(ro.batch), generator=self.update_generator)
            epoch_sums, epoch_tokens = [], []
            for start in range(0, len(perm), cfg.mini_batch_size):
                mb_index = perm[start:start + cfg.mini_batch_size]
                n_tokens = float(token_mask[mb_index].sum().clamp_min(1.0))
                local = mb_index[rank * per_process:(rank + 1) * per_process]
                ptx_parts = self._ptx_parts(n_proc, rank)
                self.optimizer.zero_grad(set_to_none=True)
                sums = torch.zeros(len(self._STATS), dtype=torch.float64)
                for k, idx in enumerate(local.split(micro)):
                    last = k == cfg.gradient_accumulation_steps - 1
                    ctx = acc.no_sync(self.model) if not last else contextlib.nullcontext()
                    with ctx:
                        sums += self._loss_and_backward(ro, idx, n_tokens, n_proc,
                                                        ptx_parts[k] if ptx_parts else None)
                if cfg.max_grad_norm:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                epoch_sums.append(sums)
                epoch_tokens.append(n_tokens)
            # One reduction per epoch: every process then has the same statistics (and the same
            # early-stopping decision, which must agree or the processes would fall out of step).
            totals = torch.stack(epoch_sums)
            if n_proc > 1:
                totals = acc.reduce(totals.to(acc.device), "sum").cpu()
            totals[:, :6] /= torch.tensor(epoch_tokens, dtype=torch.float64)[:, None]
            per_step.append(totals)
            epochs_done += 1
            if cfg.target_kl is not None and float(totals[:, 3].mean()) > cfg.target_kl:
                break  # KL early stop: the policy already left the region the samples describe
        return epochs_done

    def _ptx_parts(self, n_proc: int, rank: int) -> list[tuple[torch.Tensor, float]] | None:
        """This process's micro-batch shares of one optimiser step's ``ptx_batch_size`` blocks,
        each with its weight (share of the blocks), or None without ptx."""
        if self.ptx is None:
            return None
        g = self.cfg.gradient_accumulation_steps
        blocks = next(self.ptx)  # the same draw on every process: the stream is seeded alike
        parts = blocks.tensor_split(n_proc * g)[rank * g:(rank + 1) * g]
        return [(part, len(part) / len(blocks)) for part in parts]

    def _loss_and_backward(self, ro: Rollout, idx: torch.Tensor, n_tokens: float, n_proc: int,
                           ptx: tuple[torch.Tensor, float] | None) -> torch.Tensor:
        """Backward of this micro-batch's share of the minibatch loss; returns its statistic sums."""
        cfg = self.cfg
        mb = ro.batch.select(idx).to(self.device)
        mask = mb.response_mask.float()
        # Trim right padding shared by the whole micro-batch: fewer positions to compute.
        width = int(mask.sum(1).max().item())
        mb = RolloutBatch(mb.query_ids, mb.query_mask, mb.response_ids[:, :width], mb.response_mask[:, :width],
                          mb.ended)
        mask = mask[:, :width]
        n_local = mask.sum().clamp_min(1.0)

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[idx][:, :width].to(self.device)

        ptx_ids = ptx[0].to(self.device) if ptx is not None else None
        prefixes = [None if t is None else t[idx][:, :mb.input_ids.shape[1]].to(self.device)
                    for t in (ro.policy_prefix, ro.value_prefix)]
        with self.accelerator.autocast():
            logits, vpred, ptx_nll = self.model(mb.input_ids, mb.attention_mask, mb.query_ids.shape[1], ptx_ids,
                                                *prefixes)
        logp, ent = logits_to_logprobs(logits, mb.response_ids, cfg.temperature, entropy_grad=cfg.ent_coef != 0)
        # core's losses are token means over this micro-batch; times its token count they are sums.
        pg_loss, pg_stats = clipped_surrogate_loss(logp, take(ro.logprobs), take(ro.advantages), cfg.clip_range, mask)
        vf_loss, vf_stats = value_loss(vpred.float(), take(ro.values), take(ro.returns), cfg.clip_range_vf, mask)
        entropy = masked_mean(ent, mask)
        loss_sum = (pg_loss + cfg.vf_coef * vf_loss) * n_local
        if cfg.ent_coef != 0:
            loss_sum = loss_sum - cfg.ent_coef * entropy * n_local
        loss = loss_sum * (n_proc / n_tokens)
        ptx_share = torch.zeros(())
        if ptx_nll is not None:
            # PPO-ptx (InstructGPT eq. 2): maximise gamma * E_pretrain[log pi(x)] over the step's blocks.
            ptx_share = ptx_nll.float() * ptx[1]
            loss = loss + cfg.ptx_coef * ptx_share * n_proc
        self.accelerator.backward(loss)
        vf_clip = vf_stats.get("vf_clipfrac", torch.zeros(()))
        parts = (pg_loss, vf_loss, pg_stats["clipfrac"], pg_stats["approx_kl"], vf_clip, entropy)
        sums = [float(x.detach()) * float(n_local) for x in parts] + [float(ptx_share.detach())]
        return torch.tensor(sums, dtype=torch.float64)

    # -- one iteration and the loop ----------------------------------------------------------

    def step(self) -> tuple[dict[str, float], Rollout]:
        """One rollout + update + beta adaptation; returns metrics with the palate/CleanRL names.

        Past ``kl_budget`` the update is skipped, the weights go back to the policy that drew the
        previous batch (the last within the budget: one update can add several nats, so the policy
        that drew the batch past it may itself be over), ``self.stopped`` is set and the metrics are
        the rollout's alone (``train`` then ends the run; :class:`palate.core.kl.KLBudget`).
        """
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ro = self.rollout()
        t1 = time.perf_counter()
        rollout_kl = float(ro.kl.sum(1).mean())
        if self.kl_budget.check(rollout_kl, self.iteration):
            stopped = self.kl_budget.stopped
            assert stopped is not None
            if self._within_budget is not None:
                self.unwrapped.load_state_dict(self._within_budget, strict=False)
                stopped.update(policy_iteration=self.iteration - 1, policy_kl=self.kl_budget.history[-1])
            else:  # the very first batch of the run is over the budget: nothing earlier to go back to
                stopped.update(policy_iteration=self.iteration, policy_kl=rollout_kl)
            return {"objective/reward": float(ro.scores.mean()), "objective/kl": rollout_kl,
                    "objective/kl_coef": self.kl_ctl.kl_coef, "time/rollout_s": t1 - t0}, ro
        if self.kl_budget.budget is not None:
            self._within_budget = self._trainable_state()
        upd = self.update(ro)
        t2 = time.perf_counter()
        perf = self._throughput(ro, upd["epochs"], t2 - t1)
        mask = ro.batch.response_mask.float()
        kl_per_seq = ro.kl.sum(1)
        mean_kl = float(kl_per_seq.mean())
        beta = self.kl_ctl.kl_coef
        self.kl_ctl.update(mean_kl, len(ro.batch))
        n_tokens = float(mask.sum())
        valid = mask.bool()
        ev = explained_variance(ro.values[valid], ro.returns[valid]) if valid.sum() > 1 else float("nan")
        metrics: dict[str, float] = {
            "objective/reward": float(ro.scores.mean()),
            "objective/reward_std": float(ro.scores.std()) if len(ro.scores) > 1 else 0.0,
            "objective/kl": mean_kl,
            "objective/kl_coef": beta,
            "objective/non_score_reward": float((-beta * kl_per_seq).mean()),
            "objective/entropy": float(ro.entropy.sum(1).mean()),
            "ppo/clipfrac": upd.get("clipfrac", 0.0),
            "ppo/approx_kl": upd.get("approx_kl", 0.0),
            "ppo/epochs": upd["epochs"],
            "losses/policy_loss": upd.get("pg_loss", 0.0),
            "losses/value_loss": upd.get("vf_loss", 0.0),
            "losses/explained_variance": ev,
            "response/length": float(mask.sum(1).mean()),
            "response/eos_frac": float(ro.batch.ended.float().mean()),
            "charts/tokens_per_s": n_tokens / max(t2 - t0, 1e-9),
            "time/rollout_s": t1 - t0,
            "time/update_s": t2 - t1,
            **perf,
        }
        if "vf_clipfrac" in upd:
            metrics["ppo/val_clipfrac"] = upd["vf_clipfrac"]
        if "ptx_loss" in upd:
            metrics["ptx/loss"] = upd["ptx_loss"]
        self.iteration += 1
        return metrics, ro

    def _throughput(self, ro: Rollout, epochs: int, update_s: float) -> dict[str, float]:
        """Generation and training tokens/s of all processes, and the largest process's peak memory.

        Generation: the completions' tokens over the slowest process's sampling time. Training:
        prompt + completion tokens through the update's forwards and backwards (every epoch),
        over the update's time. Memory: ``torch.cuda.max_memory_allocated`` during this iteration
        on a GPU, else the process's peak resident memory since it started.
        """
        acc = self.accelerator
        memory = peak_gpu_mb() if torch.cuda.is_available() else peak_rss_mb()
        local = torch.tensor([self._generation_s, float(memory)], dtype=torch.float64)
        if acc.num_processes > 1:
            local = acc.gather(local.to(acc.device)).view(-1, 2).max(0).values.cpu()
        generation_s, memory = float(local[0]), float(local[1])
        generated = float(ro.batch.response_mask.sum())
        trained = float(ro.batch.attention_mask.sum()) * epochs
        return {"perf/generation_tokens_per_s": generated / max(generation_s, 1e-9),
                "perf/train_tokens_per_s": trained / max(update_s, 1e-9),
                "perf/peak_memory_mb": memory, "time/generation_s": generation_s}

    def train(self, run_dir: Path, resume: bool = False) -> dict[str, Any]:
        """Run (or continue) the loop, logging each iteration and checkpointing atomically."""
        cfg = self.cfg
        if resume:
            self.load_checkpoint(run_dir)
            if self.accelerator.is_main_process:
                truncate_metrics(run_dir, self.iteration)
            self.accelerator.wait_for_everyone()
        logger = MetricsLogger(run_dir, tensorboard=False) if self.accelerator.is_main_process else None
        samples_path = run_dir / "samples.jsonl"
        start_time = time.perf_counter()
        last: dict[str, float] = {}
        try:
            while self.iteration < cfg.iterations and self.stopped is None:
                # Online collection (Ziegler et al.): before iterations M, 2M, ... so a resumed run,
                # whose checkpoint follows an update, runs the round it had not reached yet.
                if self.online is not None and cfg.online_every and self.iteration > 0 \
                        and self.iteration % cfg.online_every == 0:
                    online_metrics = self.online.collect(self, self.iteration)
                    if logger:
                        logger.log(self.iteration, {"phase": "online", **online_metrics})
                metrics, ro = self.step()
                if self.stopped is not None:
                    if self.accelerator.is_main_process:
                        log.info("stopping before iteration %d's update: mean KL of the last 2 batches %.2f > "
                                 "kl_budget %.2f nats; the policy is the one after iteration %d (its batch: "
                                 "KL %.2f)", self.iteration + 1, self.stopped["mean_kl_last_2"], cfg.kl_budget,
                                 self.stopped["policy_iteration"], self.stopped["policy_kl"])
                        if logger:
                            logger.log(self.iteration, {"phase": "stop", **metrics})
                    self.save_checkpoint(run_dir)
                    break
                last = metrics
                if logger:
                    logger.log(self.iteration, {"phase": "ppo", **metrics})
                    with open(samples_path, "a") as fh:
                        # Each sample's KL to the reference: the report's reward-vs-KL picture.
                        rows = zip(ro.prompts, ro.completions, ro.scores.tolist(), ro.kl.sum(1).tolist())
                        for p, c, s, kl in list(rows)[: cfg.log_samples]:
                            fh.write(json.dumps({"iteration": self.iteration, "prompt": p, "completion": c,
                                                 "score": s, "kl": kl}) + "\n")
                if self.accelerator.is_main_process:
                    log.info("iter %d/%d reward %.3f kl %.2f beta %.4f clipfrac %.3f %.0f tok/s",
                             self.iteration, cfg.iterations, metrics["objective/reward"], metrics["objective/kl"],
                             metrics["objective/kl_coef"], metrics["ppo/clipfrac"], metrics["charts/tokens_per_s"])
                if self.iteration % cfg.save_every == 0 or self.iteration == cfg.iterations:
                    self.save_checkpoint(run_dir)
        finally:
            if logger:
                logger.close()
        self.save_model(run_dir / "model")
        summary = {"iterations": self.iteration, "final": last, "kl_coef": self.kl_ctl.kl_coef,
                   "stopped": self.stopped,
                   "num_processes": self.accelerator.num_processes, "wall_s": time.perf_counter() - start_time}
        if self.accelerator.is_main_process:
            atomic_write_json(run_dir / "summary.json", summary)
        self.accelerator.wait_for_everyone()  # the run is complete on disk before any process returns
        return summary

    @property
    def stopped(self) -> dict[str, Any] | None:
        """Why and where training stopped before ``iterations`` (the KL budget), or None."""
        return self.kl_budget.stopped


def __getattr__(name: str) -> Any:
    """``build_trainer``, ``train_ppo`` and ``load_ptx_blocks`` live in :mod:`palate.lm.ppo_build`
    (which imports this module); reached from here too, where users have always found them."""
    if name in ("build_trainer", "train_ppo", "load_ptx_blocks"):
        from palate.lm import ppo_build

        return getattr(ppo_build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
