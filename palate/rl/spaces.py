"""Which gymnasium spaces the control policies take, and how structured observations are held.

A flat 1-D Box observation is an array, as it always was: that path (the NumPy actor, the fused
update) stays exactly as fast. Every other observation space (images, Dict, Tuple, Discrete,
MultiDiscrete, MultiBinary and their nestings) is laid out by :class:`ObsLayout` as a flat dict
of named parts, one array per leaf space, so the rollout buffer, the minibatches and the encoder
index every part the same way. Each part keeps its own dtype: images stay uint8 in the buffer
(4 x 84 x 84 Atari frames take a quarter of the memory, and the /255 happens inside the network,
as in Stable-Baselines3), discrete parts stay integers and become one-hot inside the encoder.

The helpers ``tree_*`` take either form (an array or a dict of arrays), so code that handles
observations is written once for both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from palate.errors import EnvError

Obs = np.ndarray | dict[str, np.ndarray]
"""An observation batch as palate holds it: an array (flat Box) or a dict of named parts."""

_UNSUPPORTED_HINT = {
    "Sequence": "pad it to a fixed length and use a Box (or a Dict of Boxes)",
    "Graph": "encode the graph as fixed-size Box arrays (e.g. a padded adjacency matrix)",
    "Text": "encode the text as a MultiDiscrete of token ids of fixed length",
    "OneOf": "use a Dict holding every alternative and a Discrete that says which one is set",
}


def tree_map(fn: Callable[..., Any], *trees: Any) -> Any:
    """``fn`` applied to each part (or to the arrays themselves when they are not dicts)."""
    if isinstance(trees[0], dict):
        return {k: fn(*(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)


def tree_concat(trees: list[Any]) -> Any:
    """Row-wise concatenation of a list of arrays or of dicts of arrays."""
    if isinstance(trees[0], dict):
        return {k: np.concatenate([t[k] for t in trees]) for k in trees[0]}
    return np.concatenate(trees)


def tree_len(tree: Any) -> int:
    """Rows of a batch (the length of its first part)."""
    return len(next(iter(tree.values()))) if isinstance(tree, dict) else len(tree)


def is_image_space(space: gym.Space) -> bool:
    """SB3's rule: a uint8 Box of 0..255 with 3 dims (H, W, C or C, H, W), or 2 (H, W: one grey channel)."""
    return (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) in (2, 3)
            and bool(np.all(space.low == 0)) and bool(np.all(space.high == 255)))


def is_flat_box(space: gym.Space) -> bool:
    """The original fast path: one 1-D Box of numbers."""
    return isinstance(space, gym.spaces.Box) and len(space.shape) == 1


@dataclass(frozen=True)
class Part:
    """One leaf of an observation space.

    Attributes:
        key: its name in the parts dict ("obs" for a lone space, "image", "0", "pos/x" for nested).
        kind: image, box (any float Box), discrete, multidiscrete or multibinary.
        shape: the shape of one observation of it.
        dtype: how the buffer stores it.
        path: the keys (Dict) and indices (Tuple) that reach it in the env's observation.
        sizes: category counts (discrete: one; multidiscrete: per component) for the one-hot.
    """

    key: str
    kind: str
    shape: tuple[int, ...]
    dtype: Any
    path: tuple[Any, ...]
    sizes: tuple[int, ...] = ()

    @property
    def channels_first(self) -> bool:
        """An image whose smallest dim comes first is C x H x W (SB3's rule); 2-D images have no channel dim."""
        return len(self.shape) == 3 and int(np.argmin(self.shape)) == 0


def _leaves(space: gym.Space, path: tuple[Any, ...], where: str) -> list[Part]:
    key = "/".join(str(p) for p in path) or "obs"
    if isinstance(space, gym.spaces.Dict):
        return [p for name, sub in space.spaces.items() for p in _leaves(sub, (*path, name), f"{where}['{name}']")]
    if isinstance(space, gym.spaces.Tuple):
        return [p for i, sub in enumerate(space.spaces) for p in _leaves(sub, (*path, i), f"{where}[{i}]")]
    if is_image_space(space):
        return [Part(key, "image", tuple(space.shape), np.uint8, path)]
    if isinstance(space, gym.spaces.Box):
        return [Part(key, "box", tuple(space.shape), np.float32, path)]
    if isinstance(space, gym.spaces.Discrete):
        return [Part(key, "discrete", (), np.int64, path, (int(space.n),))]
    if isinstance(space, gym.spaces.MultiDiscrete):
        if space.nvec.ndim != 1:
            raise EnvError(f"{where}: MultiDiscrete observations must have a 1-D nvec, got shape {space.nvec.shape}; "
                           "flatten it with gymnasium.wrappers.FlattenObservation")
        return [Part(key, "multidiscrete", tuple(space.shape), np.int64, path, tuple(int(n) for n in space.nvec))]
    if isinstance(space, gym.spaces.MultiBinary):
        return [Part(key, "multibinary", tuple(space.shape), np.float32, path)]
    name = type(space).__name__
    hint = _UNSUPPORTED_HINT.get(name, "use Box, Discrete, MultiDiscrete, MultiBinary, Dict or Tuple")
    raise EnvError(f"{where}: {name} observations are not supported ({space}); {hint}")


class ObsLayout:
    """An observation space other than a flat Box, as named parts (see the module docstring).

    Args:
        space: the env's (single, unbatched) observation space.
        name: what to call the env in errors.
    """

    def __init__(self, space: gym.Space, name: str = "observation space") -> None:
        self.space = space
        self.parts = _leaves(space, (), name)
        self.structured = isinstance(space, (gym.spaces.Dict, gym.spaces.Tuple))

    def __repr__(self) -> str:
        return f"ObsLayout({', '.join(f'{p.key}: {p.kind}{p.shape}' for p in self.parts)})"

    @property
    def has_image(self) -> bool:
        return any(p.kind == "image" for p in self.parts)

    @property
    def lone_image(self) -> bool:
        """A single image and nothing else (Atari): SB3's CnnPolicy puts linear heads straight on its features."""
        return len(self.parts) == 1 and self.parts[0].kind == "image"

    def zeros(self, prefix: tuple[int, ...]) -> dict[str, np.ndarray]:
        """Preallocated storage, ``prefix + part shape`` per part, in each part's dtype."""
        return {p.key: np.zeros(prefix + p.shape, p.dtype) for p in self.parts}

    def split(self, obs: Any) -> dict[str, np.ndarray]:
        """A (batched or single) observation as the env returns it -> the parts dict, in storage dtypes.

        No copy where the env's array already has the storage dtype (uint8 frames, float32 boxes).
        """
        out = {}
        for p in self.parts:
            x = obs
            for step in p.path:
                x = x[step]
            out[p.key] = np.asarray(x, dtype=p.dtype)
        return out

    def stack(self, observations: list[Any]) -> dict[str, np.ndarray]:
        """Single observations (e.g. ``info["final_obs"][i]``) -> one batched parts dict."""
        parts = [self.split(o) for o in observations]
        return {p.key: np.stack([x[p.key] for x in parts]) for p in self.parts}

    def external(self, parts: dict[str, np.ndarray]) -> Any:
        """What user hooks see (``reward_fn``, ``rollout_callback``): the array itself for a lone
        space, the parts dict for a Dict or Tuple space."""
        return parts if self.structured or len(self.parts) != 1 else parts[self.parts[0].key]

    def check(self, obs: Any, what: str) -> tuple[dict[str, np.ndarray], bool]:
        """``(parts, single)`` for ``predict``'s input (one observation or a batch), or EnvError."""
        try:
            parts = self.split(obs)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise EnvError(f"{what}: the observation does not match the model's observation space "
                           f"{self.space} ({type(err).__name__}: {err}); pass the env's observation, e.g. "
                           "obs from env.reset() or env.step()") from err
        single = None
        for p in self.parts:
            shape = parts[p.key].shape
            this = shape == p.shape
            if not this and shape[1:] != p.shape:
                raise EnvError(f"{what}: observation part '{p.key}' has shape {shape}, but the model takes "
                               f"{p.shape} or [batch, {', '.join(map(str, p.shape))}]; pass the env's observation")
            if single is not None and this != single:
                raise EnvError(f"{what}: some observation parts are batched and some are not; pass one "
                               "observation or a batch of them")
            single = this
            if p.kind == "box" and not np.isfinite(parts[p.key]).all():
                raise EnvError(f"{what}: observation part '{p.key}' holds NaN or inf; the policy's action would "
                               "be meaningless; check the env or the code that built it")
        if single:
            parts = {k: v[None] for k, v in parts.items()}
        return parts, bool(single)


def check_action_space(space: gym.Space, name: str) -> None:
    """Discrete, 1-D Box, 1-D MultiDiscrete and 1-D MultiBinary actions, or EnvError saying which is not."""
    if isinstance(space, gym.spaces.Discrete):
        return
    if isinstance(space, (gym.spaces.Box, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)):
        if len(space.shape) != 1:
            raise EnvError(f"{name}: {type(space).__name__} actions must be 1-D, got shape {space.shape}; "
                           "flatten the action in a gymnasium.ActionWrapper")
        return
    raise EnvError(f"{name}: actions must be Discrete, Box, MultiDiscrete or MultiBinary, got {space}; "
                   "for a Dict or Tuple of actions, wrap the env so it takes one MultiDiscrete or Box action")


def check_spaces(observation_space: gym.Space, action_space: gym.Space, name: str) -> None:
    """Raise EnvError naming the space palate's policies cannot take, and what to do instead."""
    if not is_flat_box(observation_space):
        ObsLayout(observation_space, f"{name}: observation space")
    check_action_space(action_space, name)


def space_to_dict(space: gym.Space) -> dict[str, Any]:
    """A space as plain data for the checkpoint (loads with ``torch.load(weights_only=True)``)."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.Box):
        def bound(x: np.ndarray) -> Any:  # a uniform bound as one number: an 84x84x4 image is 28k of them
            return x.flat[0].item() if x.size and np.all(x == x.flat[0]) else x.tolist()

        return {"type": "box", "low": bound(space.low), "high": bound(space.high), "shape": list(space.shape),
                "dtype": str(space.dtype)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "multidiscrete", "nvec": space.nvec.tolist(), "start": space.start.tolist()}
    if isinstance(space, gym.spaces.MultiBinary):
        return {"type": "multibinary", "n": [int(n) for n in np.atleast_1d(space.n)]}
    if isinstance(space, gym.spaces.Dict):
        return {"type": "dict", "spaces": {k: space_to_dict(s) for k, s in space.spaces.items()}}
    if isinstance(space, gym.spaces.Tuple):
        return {"type": "tuple", "spaces": [space_to_dict(s) for s in space.spaces]}
    raise EnvError(f"cannot save a model for the space {space}")


def space_from_dict(d: dict[str, Any]) -> gym.Space:
    """Inverse of :func:`space_to_dict` (also reads checkpoints written before shape/dtype were saved)."""
    kind = d["type"]
    if kind == "discrete":
        return gym.spaces.Discrete(d["n"], start=d.get("start", 0))
    if kind == "box":
        dtype = np.dtype(d.get("dtype", "float32"))
        shape = tuple(d["shape"]) if "shape" in d else None
        low, high = np.array(d["low"], dtype), np.array(d["high"], dtype)
        if shape is not None:
            low, high = np.broadcast_to(low, shape).copy(), np.broadcast_to(high, shape).copy()
        return gym.spaces.Box(low, high, dtype=dtype)
    if kind == "multidiscrete":
        return gym.spaces.MultiDiscrete(d["nvec"], start=d["start"])
    if kind == "multibinary":
        n = d["n"]
        return gym.spaces.MultiBinary(n[0] if len(n) == 1 else n)
    if kind == "dict":
        return gym.spaces.Dict({k: space_from_dict(s) for k, s in d["spaces"].items()})
    if kind == "tuple":
        return gym.spaces.Tuple([space_from_dict(s) for s in d["spaces"]])
    raise EnvError(f"unknown space type '{kind}' in the checkpoint")
