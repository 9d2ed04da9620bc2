"""checkpoint.pt: one file per run that ``load``, ``eval`` and ``resume`` all read.

Layout (a dict; every entry loads under ``torch.load(weights_only=True)``)::

    format        "palate.rl/1"
    algo          "ppo" | "trpo"
    config        the config dataclass as a dict
    spaces        observation shape and action space (to rebuild the policy without an env)
    policy        state_dict of the actor-critic
    optimizers    {name: optimiser state_dict}
    obs_norm, reward_norm   normalisation statistics (plain lists)
    global_step, iteration
    algo_state    algorithm extras: the KL coefficient, line-search counters
    resume        bytes: a pickle of the RNG generator, the environments' snapshot, the last
                  observation and the running episode returns; only ``resume``/``learn`` open it

Keeping the pickled part as an opaque blob means loading a policy for ``predict`` never unpickles
arbitrary objects; continuing training does, so only resume runs you trust.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from palate.errors import CheckpointError
from palate.runs import atomic_torch_save

FORMAT = "palate.rl/1"
FILENAME = "checkpoint.pt"


#: Where a preference-learning run (``palate prefs train``) keeps its policy's run directory.
POLICY_SUBDIR = "policy"


def checkpoint_path(path: str | Path) -> Path:
    """Accept a run directory or a checkpoint file; a run directory whose policy lives in
    ``policy/`` (a preference-learning run) gives ``policy/checkpoint.pt``."""
    path = Path(path)
    if not path.is_dir():
        return path
    nested = path / POLICY_SUBDIR / FILENAME
    if not (path / FILENAME).exists() and nested.exists():
        return nested
    return path / FILENAME


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically (a crash leaves the previous checkpoint intact)."""
    path = checkpoint_path(path)
    atomic_torch_save({"format": FORMAT, **state}, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with errors that name the file."""
    path = checkpoint_path(path)
    if not path.is_file():
        if (path.parent / POLICY_SUBDIR).is_dir():
            raise CheckpointError(f"no checkpoint at {path}: this looks like a preference-learning run, whose policy "
                                  f"checkpoint is {path.parent / POLICY_SUBDIR / FILENAME}, not written yet (the "
                                  "run stopped before its first policy chunk); resume it with `palate prefs resume`")
        raise CheckpointError(f"no checkpoint at {path}; train first (`palate rl train`) or pass runs/<name>")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a palate control checkpoint (format {FORMAT})")
    return state
