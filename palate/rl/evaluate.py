"""Evaluation: N whole episodes in one environment with the frozen policy, optionally filmed.

Episodes run one after another in a single env (not a vector env), so short episodes are not
over-represented when the budget ends, and every episode uses the raw env reward.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from palate.errors import EnvError
from palate.rl.envs import EnvSource, env_name, make_env
from palate.rl.on_policy import OnPolicyAlgorithm

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Per-episode returns and lengths, with their summary."""

    returns: list[float]
    lengths: list[int]
    deterministic: bool

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std_return(self) -> float:
        return float(np.std(self.returns))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_return": self.mean_return, "std_return": self.std_return,
                "mean_length": float(np.mean(self.lengths)), "episodes": len(self.returns)}


def evaluate(model: OnPolicyAlgorithm, env_id: EnvSource | None = None, episodes: int = 10,
             deterministic: bool = True, seed: int = 10_000, video_path: str | Path | None = None) -> EvalResult:
    """Run ``episodes`` episodes of ``model`` on ``env_id`` (default: the model's env).

    ``env_id`` is an env id, a gymnasium env (used as it is and left open) or a zero-argument
    factory. Episode i is reset with ``seed + i``, and stochastic actions come from a generator
    seeded with ``seed``, so two evaluations of one model agree exactly and an evaluation during
    training leaves the training RNG alone. ``video_path`` (``.gif``, or ``.mp4`` when
    imageio-ffmpeg is installed) films the first episode.
    """
    if not isinstance(episodes, int) or episodes <= 0:
        raise EnvError(f"episodes must be a whole number > 0, got {episodes!r}")
    source = env_id if env_id is not None else model.config.env
    name = env_name(source)
    if video_path is not None:
        # MuJoCo needs an off-screen GL backend on a machine without a display.
        os.environ.setdefault("MUJOCO_GL", "egl" if os.environ.get("DISPLAY") is None else "glfw")
    owned = not isinstance(source, gym.Env)
    if isinstance(source, str):
        # Atari: the evaluation env plays whole games, unclipped (no episodic life, no reward sign).
        env = make_env(source, render_mode="rgb_array" if video_path is not None else None,
                       env_module=model.config.env_module, atari_wrappers=model.config.atari, training=False)
    elif owned:
        env = source()
    else:
        env = source
    generator = None if deterministic else torch.Generator().manual_seed(seed)
    returns, lengths, frames = [], [], []
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            total, length, done = 0.0, 0, False
            while not done:
                if video_path is not None and i == 0:
                    frames.append(_render(env, name))
                obs, reward, terminated, truncated, _ = env.step(model.predict(obs, deterministic, generator=generator))
                total += float(reward)
                length += 1
                done = terminated or truncated
            returns.append(total)
            lengths.append(length)
    finally:
        if owned:
            env.close()
    if video_path is not None:
        write_video(frames, Path(video_path), fps=int(env.metadata.get("render_fps", 30)))
    return EvalResult(returns, lengths, deterministic)


def _render(env: gym.Env, env_id: str) -> np.ndarray:
    try:
        frame = env.render()
    except gym.error.DependencyNotInstalled as err:
        raise EnvError(f"cannot film {env_id}: {err}") from err
    if not isinstance(frame, np.ndarray):
        raise EnvError(f"cannot film {env_id}: render() returned {type(frame).__name__}, not an RGB array; "
                       "the env must take render_mode='rgb_array'")
    return frame


def write_video(frames: list[np.ndarray], path: Path, fps: int = 30) -> Path:
    """Write frames as an animated GIF, or MP4 when the suffix asks and imageio-ffmpeg exists."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            path = path.with_suffix(".gif")
            log.info("imageio-ffmpeg is not installed; writing %s instead of an MP4", path)
    if path.suffix == ".gif":
        imageio.mimsave(path, frames, duration=1000 / fps, loop=0)
    else:
        imageio.mimsave(path, frames, fps=fps)
    return path
