"""Language models: loading, SFT, reward models, PPO with a KL penalty, the InstructGPT pipeline."""

from palate.lm.models import LoraSettings, load_model

load = load_model

__all__ = ["LoraSettings", "load", "load_model"]
