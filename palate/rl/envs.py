"""Vector environments: creation from an id, a factory or an instance; validation; snapshots.

Gymnasium 1.x autoresets on the *next* step by default; we ask for SAME_STEP autoreset so that the
step that ends an episode already returns the reset observation and puts the final observation in
``info["final_obs"]``. That is what lets a truncated step bootstrap with V(final observation)
while the rollout stays a dense ``[T, N]`` array with no dummy reset steps.

Snapshots let a run continue bit-for-bit after ``save``/``load`` or ``resume``: pure-Python
environments (CartPole, Pendulum, ...) are pickled whole; MuJoCo environments, whose pickling
rebuilds a fresh simulator, additionally carry their full integration state and RNG. Other
environments restart their episodes on resume (see :func:`snapshot_envs`).
"""

from __future__ import annotations

import difflib
import logging
import pickle
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from palate.errors import EnvError

log = logging.getLogger(__name__)

EnvSource = str | gym.Env | gym.vector.VectorEnv | Callable[[], gym.Env]
"""What ``learn`` accepts: an env id, a single env, a vector env, or a zero-argument env factory."""

SAME_STEP = gym.vector.AutoresetMode.SAME_STEP


def check_env_id(env_id: str) -> None:
    """Raise EnvError naming ``env_id`` and the closest registered ids when it is unknown."""
    if env_id in gym.envs.registry:
        return
    matches = difflib.get_close_matches(env_id, list(gym.envs.registry.keys()), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(matches)}?" if matches else "; see gymnasium.envs.registry for the ids"
    raise EnvError(f"unknown environment id '{env_id}'{hint}")


def make_env(env_id: str, render_mode: str | None = None) -> gym.Env:
    """``gym.make`` with palate's errors."""
    check_env_id(env_id)
    try:
        return gym.make(env_id, render_mode=render_mode)
    except gym.error.Error as err:
        raise EnvError(f"cannot build environment '{env_id}': {err}") from err
    except ImportError as err:
        raise EnvError(f"environment '{env_id}' needs a missing package: {err}") from err


def check_spaces(observation_space: gym.Space, action_space: gym.Space, name: str) -> None:
    """Control policies here take flat Box observations and Discrete or Box actions."""
    if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        raise EnvError(f"{name}: observations must be a 1-D Box, got {observation_space}; "
                       "wrap the env with gymnasium.wrappers.FlattenObservation")
    if not isinstance(action_space, (gym.spaces.Discrete, gym.spaces.Box)):
        raise EnvError(f"{name}: actions must be Discrete or Box, got {action_space}")
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) != 1:
        raise EnvError(f"{name}: Box actions must be 1-D, got shape {action_space.shape}")


class LeanSyncVectorEnv(gym.vector.SyncVectorEnv):
    """``SyncVectorEnv`` whose SAME_STEP ``step`` does not merge every step's info dicts.

    Gymnasium's sync vector env folds each sub-env's ``info`` into arrays on every step; for a
    MuJoCo env (eight info keys) that bookkeeping costs more than palate's whole policy forward.
    palate's loop reads only ``final_obs``, so this class builds ``infos`` (``final_obs`` and
    ``final_info``, in gymnasium's layout) only on the steps where an episode ends and returns an
    empty dict otherwise. Everything else is the parent's. To see per-step infos, pass your own
    ``gymnasium.vector.SyncVectorEnv`` to ``learn``.
    """

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if self.autoreset_mode != SAME_STEP or not isinstance(self.single_observation_space, gym.spaces.Box):
            return super().step(actions)
        infos: dict[str, Any] = {}
        env_obs = self._env_obs
        for i, env in enumerate(self.envs):
            obs, self._rewards[i], self._terminations[i], self._truncations[i], info = env.step(actions[i])
            if self._terminations[i] or self._truncations[i]:
                infos = self._add_info(infos, {"final_obs": obs, "final_info": info}, i)
                obs, _ = env.reset()
            env_obs[i] = obs
        self._observations = np.stack(env_obs).astype(self.single_observation_space.dtype, copy=False)
        self._autoreset_envs = np.logical_or(self._terminations, self._truncations)
        return self._observations, self._rewards.copy(), self._terminations.copy(), self._truncations.copy(), infos


def make_vec_env(
    source: EnvSource,
    n_envs: int,
    vec_env: str = "sync",
    sub_envs: list[gym.Env] | None = None,
) -> tuple[gym.vector.VectorEnv, bool]:
    """Build a SAME_STEP-autoreset vector env of ``n_envs`` copies of ``source``.

    Returns ``(envs, owned)``; ``owned`` is False for a vector env the caller passed in, which
    palate must then neither close nor snapshot. ``sub_envs`` (restored by
    :func:`restore_envs`) replace freshly made environments in a sync vector env.
    """
    if isinstance(source, gym.vector.VectorEnv):
        mode = source.metadata.get("autoreset_mode")
        if mode != SAME_STEP:
            raise EnvError(
                f"the vector env passed to learn uses autoreset mode {mode}; build it with "
                "autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP so truncation can bootstrap")
        if source.num_envs != n_envs:
            raise EnvError(f"the vector env has {source.num_envs} envs but the config says n_envs={n_envs}")
        check_spaces(source.single_observation_space, source.single_action_space, "vector env")
        return source, False
    if isinstance(source, gym.Env):
        if n_envs != 1:
            raise EnvError(f"a single env instance was passed with n_envs={n_envs}; pass an env id or a "
                           "factory (a zero-argument callable returning an env) to run several")
        fns: list[Callable[[], gym.Env]] = [lambda: source]
        vec_env = "sync"  # an instance lives in this process
    elif isinstance(source, str):
        check_env_id(source)
        fns = [lambda: make_env(source) for _ in range(n_envs)]
    elif callable(source):
        fns = [source for _ in range(n_envs)]
    else:
        raise EnvError(f"cannot make environments from {source!r}; pass an env id, an env or a factory")
    if sub_envs is not None and vec_env == "sync":
        fns = [lambda e=e: e for e in sub_envs]
    try:
        if vec_env == "subprocess":
            envs: gym.vector.VectorEnv = gym.vector.AsyncVectorEnv(fns, autoreset_mode=SAME_STEP)
        else:
            envs = LeanSyncVectorEnv(fns, autoreset_mode=SAME_STEP)
    except gym.error.Error as err:
        raise EnvError(f"cannot build vector env from {source!r}: {err}") from err
    try:
        check_spaces(envs.single_observation_space, envs.single_action_space, env_name(source))
    except EnvError:
        envs.close()
        raise
    return envs, True


def env_name(source: EnvSource) -> str:
    """A readable id for logs and config.yaml."""
    if isinstance(source, str):
        return source
    spec = getattr(source, "spec", None)
    if spec is not None and getattr(spec, "id", None):
        return spec.id
    return getattr(source, "__name__", type(source).__name__)


def _mujoco_state(env: gym.Env) -> np.ndarray | None:
    base = env.unwrapped
    if not (hasattr(base, "model") and hasattr(base, "data")):
        return None
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    state = np.empty(mujoco.mj_stateSize(base.model, spec))
    mujoco.mj_getState(base.model, base.data, state, spec)
    return state


def snapshot_envs(envs: gym.vector.VectorEnv) -> bytes | None:
    """Serialise the sub-environments of a sync vector env, or None where that is impossible.

    Pickling an ``EzPickle`` environment re-runs its constructor and loses its state; MuJoCo
    environments are fixed up with their integration state (``mj_getState``) and RNG. Any other
    ``EzPickle`` environment, and every subprocess vector env, cannot be snapshotted: a resumed
    run then restarts its episodes and is not bit-for-bit identical to an uninterrupted one.
    """
    if not isinstance(envs, gym.vector.SyncVectorEnv):
        return None
    items: list[dict[str, Any]] = []
    for env in envs.envs:
        base = env.unwrapped
        mj_state = _mujoco_state(env)
        if isinstance(base, gym.utils.EzPickle) and mj_state is None:
            return None
        try:
            blob = pickle.dumps(env)
        except Exception as err:  # an env holding a lock, a socket, a renderer ...
            log.debug("environment %s cannot be pickled: %s", env, err)
            return None
        rng = base.np_random.bit_generator.state if base.np_random is not None else None
        items.append({"env": blob, "mujoco": mj_state, "np_random": rng})
    return pickle.dumps(items)


def restore_envs(blob: bytes) -> list[gym.Env]:
    """Inverse of :func:`snapshot_envs` (a trusted file: this unpickles)."""
    envs = []
    for item in pickle.loads(blob):
        env = pickle.loads(item["env"])
        base = env.unwrapped
        if item["mujoco"] is not None:
            import mujoco

            # No mj_forward: the next mj_step recomputes every derived quantity from this state.
            mujoco.mj_setState(base.model, base.data, item["mujoco"], mujoco.mjtState.mjSTATE_INTEGRATION)
        if item["np_random"] is not None:
            base.np_random.bit_generator.state = item["np_random"]
        envs.append(env)
    return envs
