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

import pickle
from pathlib import Path
from typing import Any, TypeVar

import gymnasium as gym
import numpy as np
import torch

from palate.config import config_from_dict, config_to_dict
from palate.errors import CheckpointError
from palate.rl.spaces import space_from_dict, space_to_dict
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


Self = TypeVar("Self", bound="CheckpointMixin")


class CheckpointMixin:
    """``state_dict`` / ``save`` / ``load`` of :class:`palate.rl.on_policy.OnPolicyAlgorithm`, and
    the resume state (RNG, environments, running episodes) that ``learn`` restores."""

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load` needs to rebuild the model and continue training."""
        if self.policy is None:
            raise CheckpointError("nothing to save: the model has not been trained or loaded")
        resume_blob = self._resume_blob if self._resume_blob is not None else pickle.dumps({
            "generator": self.generator.get_state(),
            "env_snapshot": self._env_snapshot,
            "raw_obs": self._raw_obs,
            "obs": getattr(self, "_obs", None),
            "ep_return": self._ep_return,
            "ep_length": self._ep_length,
            "all_returns": self._all_returns[-100:],
            "episodes": self.episodes,
        })
        return {
            "algo": self.algo,
            "config": config_to_dict(self.config),
            "spaces": {"observation_shape": list(self.observation_space.shape or ()),
                       "observation": space_to_dict(self.observation_space),
                       "action": space_to_dict(self.action_space)},
            "policy": self.policy.state_dict(),
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "obs_norm": self.obs_norm.state_dict(),
            "reward_norm": self.reward_norm.state_dict(),
            "global_step": self.global_step,
            "iteration": self.iteration,
            "algo_state": self._algo_state(),
            "resume": resume_blob,
        }

    def save(self, path: str | Path) -> Path:
        """Write checkpoint.pt (``path`` is a run directory or a file name), atomically.

        Called during ``learn`` (from a callback), it saves the environments where they stand.
        """
        if self._live_envs is not None:
            self._snapshot(*self._live_envs)
        path = Path(path)
        if path.suffix == "":
            path.mkdir(parents=True, exist_ok=True)
        return save_checkpoint(self.state_dict(), path)

    @classmethod
    def load(cls: type[Self], path: str | Path, **kwargs: Any) -> Self:
        """Rebuild a model from a checkpoint (file or run directory), normalisation included.

        ``kwargs`` go to the constructor (``reward_fn``, ``rollout_callback``). ``learn`` on the
        loaded model continues training where the checkpoint stopped.
        """
        return cls.from_state_dict(load_checkpoint(path), source=str(path), **kwargs)

    @classmethod
    def from_state_dict(cls: type[Self], state: dict[str, Any], *, source: str = "state dict",
                        **kwargs: Any) -> Self:
        """:meth:`load` from a :meth:`state_dict` held in memory (one embedded in a larger checkpoint).

        ``source`` names where ``state`` came from in error messages.
        """
        if state["algo"] != cls.algo:
            raise CheckpointError(f"{source} holds a {state['algo']} model; load it with that class "
                                  f"(palate.rl.{state['algo'].upper()}.load)")
        config = config_from_dict(cls.config_class, state["config"], source=source)
        model = cls(config, **kwargs)
        spaces = state["spaces"]
        obs_space = space_from_dict(spaces["observation"]) if "observation" in spaces else \
            gym.spaces.Box(-np.inf, np.inf, tuple(spaces["observation_shape"]), np.float32)
        model._setup_model(obs_space, space_from_dict(spaces["action"]))
        model.policy.load_state_dict(state["policy"])
        for name, opt in model.optimizers.items():
            model._load_optimizer_state(name, opt, state["optimizers"][name])
        model.obs_norm.load_state_dict(state["obs_norm"])
        model.reward_norm.load_state_dict(state["reward_norm"])
        model.global_step = int(state["global_step"])
        model.iteration = int(state["iteration"])
        model._load_algo_state(state["algo_state"])
        model._resume_blob = state["resume"]
        return model

    def attach_envs(self, envs: gym.vector.VectorEnv) -> None:
        """Declare that ``envs``, a vector env the caller owns, stands where the last rollout stopped.

        ``learn`` continues the episodes in progress only in a vector env it stepped itself, and
        starts new ones in any other. A caller that rebuilt its envs from a snapshot after
        :meth:`load` (:func:`palate.rl.envs.restore_envs`) calls this so they continue instead.
        """
        self._env_object = envs

    def _restore_resume_state(self) -> None:
        """Unpickle the RNG and environment state saved with the checkpoint (trusted files only)."""
        resume = pickle.loads(self._resume_blob)
        self._resume_blob = None
        self.generator.set_state(resume["generator"])
        self._env_snapshot = resume["env_snapshot"]
        self._raw_obs, self._obs = resume["raw_obs"], resume["obs"]
        self._ep_return, self._ep_length = resume["ep_return"], resume["ep_length"]
        self._all_returns = list(resume["all_returns"])
        self.episodes = int(resume["episodes"])
