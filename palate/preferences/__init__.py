"""Deep RL from human preferences for control (Christiano et al. 2017).

The agent never sees the environment's reward. It learns r_hat(o, a) from comparisons of pairs
of trajectory segments and optimises it with PPO or TRPO::

    from palate.preferences import PreferenceConfig, resume_preferences, train_preferences
    summary = train_preferences(PreferenceConfig(env="Pendulum-v1", labels=200, steps=60_000))
    # After a crash or Ctrl-C: continue from the last round (here also on to more steps).
    summary = resume_preferences("runs/prefs-Pendulum-v1-ppo-0", steps=100_000)

The parts are injected into one loop and each can be used alone: :class:`TrajectoryPool` and
:class:`Segment` (segments), :class:`RewardEnsemble` (reward model), :class:`RandomSelector` /
:class:`DisagreementSelector` (query selection), :class:`SyntheticOracle` /
:class:`HumanLabeller` (labellers), :class:`LabelStore` / :func:`load_labels` (durable labels).
Names resolve lazily, so importing this package (as ``palate --help`` does) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Segment": "segments", "SegmentPair": "segments", "Trajectory": "segments", "TrajectoryPool": "segments",
    "RewardEnsemble": "reward_model", "PreferenceDataset": "reward_model", "FitStats": "reward_model",
    "QuerySelector": "selection", "RandomSelector": "selection", "DisagreementSelector": "selection",
    "make_selector": "selection",
    "Labeller": "labellers", "SyntheticOracle": "labellers", "HumanLabeller": "labellers",
    "Query": "labellers", "Answer": "labellers",
    "LabelStore": "storage", "LabelledComparison": "storage", "load_labels": "storage",
    "PreferenceConfig": "config", "PreferenceTrainer": "trainer", "train_preferences": "trainer",
    "resume_preferences": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'palate.preferences' has no attribute {name!r}")
    return getattr(importlib.import_module(f"palate.preferences.{module}"), name)
