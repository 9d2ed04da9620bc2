"""Clips for human labellers: a segment rendered as an animated GIF.

The segment stores observations, not simulator states, so the renderer rebuilds each frame's
state from its observation:

* MuJoCo locomotion tasks observe ``qpos[1:]`` and ``qvel`` (the forward position is left out);
  the position is recovered by integrating the forward velocity, so the clip shows the robot
  moving, and the tracking camera follows it.
* Observations that are images (Atari's stacks of four 84 x 84 grey frames) are the frames: each
  step shows the newest frame of its stack, scaled up, at the game's own speed (60 Hz with a
  frame skip of 4 is 15 steps a second, so a 25-step clip plays for 1.7 s).
* Pendulum is drawn directly from (cos theta, sin theta) with Pillow (gymnasium's own renderer
  needs pygame, which palate does not install).
* Anything else is drawn as a bar chart of the observation vector: crude, but a person can still
  compare two clips of the same task.

GIF keeps the dependency list to Pillow and plays in every browser the feedback service supports.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from palate.errors import PreferenceError
from palate.preferences.segments import Segment

Frame = np.ndarray  # [H, W, 3] uint8

#: Agent steps per second of an Atari game: 60 emulator frames a second, 4 per step.
ATARI_STEPS_PER_SECOND = 15.0

#: Leading qpos entries MuJoCo tasks leave out of the observation (x, or x and y).
_EXCLUDED_POSITIONS = {"Ant": 2, "Humanoid": 2, "HumanoidStandup": 2, "Swimmer": 2}


def encode_gif(frames: list[Frame], fps: float) -> bytes:
    """Frames -> GIF bytes (looping), at ``fps`` frames per second."""
    from PIL import Image

    if not frames:
        raise PreferenceError("cannot encode an empty clip")
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    buf = io.BytesIO()
    duration = max(20, int(round(1000.0 / max(fps, 1e-3))))
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    return buf.getvalue()


def draw_pendulum(obs: np.ndarray, size: int = 160) -> Frame:
    """One frame of Pendulum from its observation (cos theta, sin theta, theta dot)."""
    from PIL import Image, ImageDraw

    cos_t, sin_t = float(obs[0]), float(obs[1])
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    c = size / 2
    length = size * 0.38
    # theta = 0 is upright; screen y grows downwards.
    tip = (c + length * sin_t, c - length * cos_t)
    draw.line([(c, c), tip], fill=(204, 77, 77), width=max(3, size // 16))
    r = size // 30
    draw.ellipse([c - r, c - r, c + r, c + r], fill=(0, 0, 0))
    return np.asarray(img)


def image_frame(obs: np.ndarray, size: int = 168) -> Frame:
    """One frame from an image observation: the newest frame of a stack, as RGB, scaled to ``size`` pixels high.

    ``C x H x W`` stacks (the channels-first layout of Atari's frame stack) show their last
    channel; ``H x W x 3`` is taken as colour; other ``H x W x C`` show their last channel.
    """
    from PIL import Image

    obs = np.asarray(obs)
    if obs.ndim == 2:
        grey = obs
    elif obs.ndim == 3 and int(np.argmin(obs.shape)) == 0:
        grey = obs[-1]
    elif obs.ndim == 3 and obs.shape[-1] == 3:
        grey = None
    elif obs.ndim == 3:
        grey = obs[..., -1]
    else:
        raise PreferenceError(f"cannot draw an observation of shape {obs.shape} as an image; "
                              "pass your own renderer to HumanLabeller")
    rgb = np.repeat(grey[..., None], 3, axis=-1) if grey is not None else obs
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    scale = size / img.height
    return np.asarray(img.resize((max(1, int(round(img.width * scale))), size), Image.Resampling.NEAREST))


def draw_bars(obs: np.ndarray, low: float = -3.0, high: float = 3.0, size: int = 160) -> Frame:
    """Fallback frame: the observation vector as a bar chart."""
    from PIL import Image, ImageDraw

    obs = np.asarray(obs, dtype=np.float64).reshape(-1)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    width = size / max(len(obs), 1)
    mid = size / 2
    for i, v in enumerate(np.clip(obs, low, high)):
        h = (v / (high - low)) * size
        draw.rectangle([i * width + 1, min(mid, mid - h), (i + 1) * width - 1, max(mid, mid - h)], fill=(60, 110, 200))
    draw.line([(0, mid), (size, mid)], fill=(0, 0, 0))
    return np.asarray(img)


class SegmentRenderer:
    """Renders a :class:`Segment` of environment ``env_id`` to GIF bytes (the labeller's ``render``).

    Args:
        env_id: the environment the segment came from.
        env_factory: builds it (kwargs such as fixed-length episodes included); MuJoCo
            environments are rebuilt with ``render_mode="rgb_array"``.
        size: frame width and height in pixels.
        clip_seconds: how long each clip plays. The paper shows clips of 1-2 s; 25 Hopper steps
            are 0.2 s of simulated time, far too quick to judge, so playback is slowed to fit.
            Atari clips ignore it and play at the game's speed (:data:`ATARI_STEPS_PER_SECOND`).
    """

    def __init__(self, env_id: str, env_factory: Callable[[], Any] | None = None, size: int = 160,
                 clip_seconds: float = 1.5) -> None:
        self.env_id = env_id
        self.size = size
        self.clip_seconds = clip_seconds
        self._env: Any = None
        self._kwargs = dict(getattr(env_factory, "env_kwargs", {}) or {})
        family = env_id.split("-")[0]
        if getattr(env_factory, "atari", False) or self._is_ale():
            self.kind = "atari"
        else:
            self.kind = "pendulum" if family == "Pendulum" else "mujoco" if self._is_mujoco() else "bars"

    def _is_ale(self) -> bool:
        from palate.rl.atari import is_ale_id

        return ":" not in self.env_id and is_ale_id(self.env_id)

    def _is_mujoco(self) -> bool:
        import gymnasium as gym

        spec = gym.spec(self.env_id)
        return "mujoco" in str(spec.entry_point)

    def _mujoco_env(self) -> Any:
        if self._env is None:
            import gymnasium as gym

            os.environ.setdefault("MUJOCO_GL", "osmesa")
            self._env = gym.make(self.env_id, render_mode="rgb_array", width=self.size, height=self.size,
                                 **self._kwargs)
            self._env.reset(seed=0)
        return self._env

    def frames(self, segment: Segment) -> list[Frame]:
        """One frame per step of ``segment``."""
        if self.kind == "atari" or _is_image(segment.obs):
            return [image_frame(o, self.size) for o in segment.obs]
        if self.kind == "pendulum":
            return [draw_pendulum(o, self.size) for o in segment.obs]
        if self.kind == "bars":
            return [draw_bars(o, size=self.size) for o in segment.obs]
        import mujoco

        env = self._mujoco_env()
        base = env.unwrapped
        nq, nv = base.model.nq, base.model.nv
        skip = 0
        if getattr(base, "_exclude_current_positions_from_observation", False):
            skip = _EXCLUDED_POSITIONS.get(self.env_id.split("-")[0], 1)
        if segment.obs.shape[1] < nq - skip + nv:
            raise PreferenceError(
                f"cannot rebuild {self.env_id} states from {segment.obs.shape[1]}-dim observations "
                f"(qpos {nq}, qvel {nv}); pass your own renderer to HumanLabeller"
            )
        dt = float(base.dt)
        x = np.zeros(skip)
        out = []
        for o in segment.obs:
            qpos = np.concatenate([x, o[: nq - skip]])
            qvel = o[nq - skip : nq - skip + nv]
            base.data.qpos[:] = qpos
            base.data.qvel[:] = qvel
            mujoco.mj_forward(base.model, base.data)
            out.append(env.render())
            x = x + qvel[:skip] * dt  # the left-out positions, integrated from their velocities
        return out

    def __call__(self, segment: Segment) -> bytes:
        fps = ATARI_STEPS_PER_SECOND if self.kind == "atari" else len(segment) / self.clip_seconds
        return encode_gif(self.frames(segment), fps=fps)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None



def _is_image(obs: np.ndarray) -> bool:
    """Segment observations that are pictures: uint8 ``[L, H, W]``, ``[L, C, H, W]`` or ``[L, H, W, C]``."""
    return obs.dtype == np.uint8 and obs.ndim in (3, 4)
