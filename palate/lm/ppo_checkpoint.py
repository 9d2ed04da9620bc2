"""LM PPO's checkpoint: what a resumed run needs to continue exactly, written once, atomically.

``checkpoint.pt`` holds the trainable weights only (all of them, the LoRA adapters, or the last
blocks), the optimiser, beta's controller, the prompt sampler, the ptx batches, the update's
generator, the global RNG and the online collector; it holds no per-process state, so a run
resumes under any number of processes. A mixin of :class:`palate.lm.ppo.LMPPOTrainer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from palate.errors import CheckpointError
from palate.lm.sft import save_causal_lm
from palate.runs import atomic_torch_save, read_jsonl_records, rng_state, set_rng_state


class PPOCheckpointMixin:
    """``save_checkpoint`` / ``load_checkpoint`` / ``save_model`` of the LM PPO trainer."""

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.unwrapped.named_parameters() if p.requires_grad}

    def save_checkpoint(self, run_dir: Path) -> None:
        """Trainable weights (all, or adapters / last blocks), optimiser, beta, RNG, samplers; atomic."""
        if not self.accelerator.is_main_process:
            return
        state = {
            "iteration": self.iteration,
            "weights": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "sampler": self.sampler.state_dict(),
            "ptx": self.ptx.state_dict() if self.ptx is not None else None,
            "update_generator": self.update_generator.get_state(),
            "rng": rng_state(),
            "online": self.online.state_dict() if self.online is not None else None,
            "kl_budget": self.kl_budget.state_dict(),
            "within_budget": self._within_budget,
        }
        atomic_torch_save(state, run_dir / "checkpoint.pt")

    def load_checkpoint(self, run_dir: Path) -> None:
        path = run_dir / "checkpoint.pt"
        if not path.is_file():
            raise CheckpointError(f"{run_dir} has no checkpoint.pt to resume from; start it again without --resume")
        state = torch.load(path, map_location="cpu", weights_only=False)
        missing = set(self._trainable_state()) - set(state["weights"])
        if missing:
            raise CheckpointError(f"{path} does not match this model (missing {sorted(missing)[:3]}...); "
                                  "resume with the config the run was started with")
        self.unwrapped.load_state_dict(state["weights"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.sampler.load_state_dict(state["sampler"])
        if self.ptx is not None and state["ptx"] is not None:
            self.ptx.load_state_dict(state["ptx"])
        self.update_generator.set_state(state["update_generator"])
        set_rng_state(state["rng"])
        if self.online is not None and state.get("online") is not None:
            self.online.load_state_dict(state["online"])
        self.iteration = int(state["iteration"])
        self.kl_budget.load_state_dict(state.get("kl_budget", {}))
        self._within_budget = state.get("within_budget")

    def save_model(self, directory: Path) -> Path:
        """The trained policy as a plain transformers directory (LoRA merged) + tokenizer, atomically."""
        if not self.accelerator.is_main_process:
            return directory
        return save_causal_lm(self.unwrapped.policy, self.tokenizer, directory)


def read_metrics(run_dir: str | Path, phase: str | None = "ppo") -> list[dict[str, Any]]:
    """The run's metrics.jsonl records (of one phase), for reports and tests."""
    records = read_jsonl_records(Path(run_dir) / "metrics.jsonl")
    return [r for r in records if phase is None or r.get("phase", "ppo") == phase]
