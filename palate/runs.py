"""Run directories: config.yaml, metrics.jsonl, TensorBoard events, checkpoints, summary.json.

Everything written here is written atomically (temporary file in the same directory, fsync,
rename), so a crash or a full disk leaves the previous file intact, never a torn one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from palate.errors import CheckpointError

log = logging.getLogger(__name__)


def atomic_write(path: str | Path, writer: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``writer(fileobj)`` on a temporary file, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_dir(directory: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_dir)`` on a fresh sibling directory, then swap it in for ``directory``.

    The old directory is moved aside before the new one takes its name and removed only after,
    so a failure at any point leaves either the old or the new directory complete, never a mix.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        writer(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text), mode="w")


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save, atomically."""
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one integer."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, for checkpoints that resume bit-for-bit."""
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLogger:
    """Appends one JSON object per log step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except Exception as err:  # TensorBoard is optional at run time
                log.warning("TensorBoard disabled: %s", err)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write one record; non-finite floats become null so the file stays valid JSON."""
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        for k, v in metrics.items():
            v = float(v) if isinstance(v, (np.floating, np.integer)) else v
            if hasattr(v, "item"):
                v = v.item()
            if isinstance(v, float) and not np.isfinite(v):
                v = None
            record[k] = v
            if self._tb is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(k, v, step)
        self._fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl_records(path: str | Path) -> list[dict[str, Any]]:
    """A run's JSONL log (metrics, samples) as records; [] if absent. A line torn by a crash is skipped,
    so a report or resume reads what was written whole."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(run_dir: str | Path, after_step: int) -> None:
    """Drop metrics records past ``after_step`` (a resumed run re-logs them), atomically."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= after_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash: drop it
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def prepare_run_dir(run_dir: str | Path, config: dict[str, Any], overwrite: bool = False) -> Path:
    """Create a run directory and write config.yaml; refuse to clobber an existing run."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").exists() and not overwrite:
        raise CheckpointError(
            f"run directory {run_dir} already holds a run; use `resume` to continue it, "
            "another --run-name, or --overwrite to start again"
        )
    if overwrite and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    return run_dir


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The config.yaml of an existing run, with a clear error when it is missing."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a palate run directory (no config.yaml); pass runs/<name>")
    return yaml.safe_load(path.read_text()) or {}
