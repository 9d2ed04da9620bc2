"""Vector environments: creation from an id, a factory or an instance; validation; snapshots.

Gymnasium 1.x autoresets on the *next* step by default; we ask for SAME_STEP autoreset so that the
step that ends an episode already returns the reset observation and puts the final observation in
``info["final_obs"]``. That is what lets a truncated step bootstrap with V(final observation)
while the rollout stays a dense ``[T, N]`` array with no dummy reset steps.

Snapshots let a run continue bit-for-bit after ``save``/``load`` or ``resume``: pure-Python
environments (CartPole, Pendulum, ...) are pickled whole; MuJoCo environments, whose pickling
rebuilds a fresh simulator, additionally carry their full integration state and RNG. Other
environments restart their episodes on resume (see :func:`snapshot_envs`).

A user's environment comes in two ways: ``"module:attr"`` names a class or a zero-argument
factory to import (or, as in ``gymnasium.make``, ``"module:Env-v0"`` a registered id that the
module registers), and ``env_module`` names a module to import first so that its
``gymnasium.register`` calls run (the config's ``env_module`` field).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import logging
import pickle
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from palate.errors import EnvError
from palate.rl import atari
from palate.rl.spaces import check_spaces

log = logging.getLogger(__name__)

EnvSource = str | gym.Env | gym.vector.VectorEnv | Callable[[], gym.Env]
"""What ``learn`` accepts: an env id, a single env, a vector env, or a zero-argument env factory."""

SAME_STEP = gym.vector.AutoresetMode.SAME_STEP


def import_env_module(name: str) -> None:
    """Import ``name`` (or several, comma-separated) so its ``gymnasium.register`` calls run."""
    for module in (m.strip() for m in name.split(",")):
        if module:
            _import(module, f"--env-module {module}")


def _import(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(err.name + ".")):
            raise EnvError(f"{what}: no module named '{err.name}'; install the package that provides it or "
                           f"run from the directory that holds it (or add that directory to PYTHONPATH)") from err
        raise EnvError(f"{what}: importing '{module}' failed because it needs the missing module "
                       f"'{err.name}'; install it") from err
    except Exception as err:  # the user's module raised while being imported
        raise EnvError(f"{what}: importing '{module}' raised {type(err).__name__}: {err}") from err


def _resolve(env_id: str) -> Callable[..., gym.Env] | str:
    """``"module:attr"`` -> the class or factory ``attr``, or the registered id ``attr`` (gymnasium's form)."""
    module_name, _, attr = env_id.partition(":")
    if not module_name or not attr:
        raise EnvError(f"--env {env_id}: write a user env as module:attr, e.g. mypkg.envs:MyEnv")
    module = _import(module_name, f"--env {env_id}")
    target = getattr(module, attr, None)
    if target is None:
        if attr in gym.envs.registry:
            return attr
        public = [n for n in dir(module) if not n.startswith("_")]
        matches = difflib.get_close_matches(attr, public, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(f'{module_name}:{m}' for m in matches)}?" if matches else \
            "name an env class or a zero-argument function that returns an env"
        raise EnvError(f"--env {env_id}: module '{module_name}' has no attribute '{attr}' and registers no "
                       f"env id '{attr}'; {hint}")
    if not callable(target):
        raise EnvError(f"--env {env_id}: {attr} is a {type(target).__name__}, not an env class or factory")
    return target


def _takes_render_mode(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "render_mode" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def check_env_id(env_id: str, env_module: str | None = None) -> None:
    """Raise EnvError naming ``env_id`` and the closest registered ids when it is unknown.

    ``"module:attr"`` ids are imported and checked; ``env_module`` is imported first.
    """
    if env_module:
        import_env_module(env_module)
    if ":" in env_id:
        _resolve(env_id)
        return
    if env_id in gym.envs.registry:
        return
    if atari.looks_like_ale(env_id):
        if not atari.register_ale():
            raise EnvError(f"environment '{env_id}' is an Atari game; {atari.ATARI_INSTALL_HINT}")
        if env_id in gym.envs.registry:
            return
    matches = difflib.get_close_matches(env_id, list(gym.envs.registry.keys()), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(matches)}?" if matches else "; see gymnasium.envs.registry for the ids"
    module_hint = "" if env_module else (
        " (an env registered by your own module: add --env-module MODULE, or pass --env module:Class)")
    raise EnvError(f"unknown environment id '{env_id}'{hint}{module_hint}")


def make_env(env_id: str, render_mode: str | None = None, env_module: str | None = None,
             atari_wrappers: bool | None = None, training: bool = True) -> gym.Env:
    """``gym.make`` with palate's errors; also ``"module:attr"`` user envs and an ``env_module`` to import.

    ``atari_wrappers`` (None: for ALE ids) applies :mod:`palate.rl.atari`'s preprocessing, with
    its training-only wrappers when ``training``.
    """
    check_env_id(env_id, env_module)
    if uses_atari_wrappers(env_id, atari_wrappers):
        return atari.make_atari_env(env_id, render_mode, training)
    target = _resolve(env_id) if ":" in env_id else env_id
    if not isinstance(target, str):
        kwargs = {} if render_mode is None else {"render_mode": render_mode}
        if kwargs and not _takes_render_mode(target):
            raise EnvError(f"{env_id} takes no render_mode argument, so it cannot be filmed; "
                           "add render_mode=None to its signature and return frames from render()")
        try:
            env = target(**kwargs)
        except Exception as err:
            raise EnvError(f"--env {env_id}: calling {target.__name__ if hasattr(target, '__name__') else target}"
                           f"() raised {type(err).__name__}: {err}") from err
        if not isinstance(env, gym.Env):
            raise EnvError(f"--env {env_id} returned a {type(env).__name__}, not a gymnasium.Env")
        return env
    try:
        # render_mode only when asked for: an entry point without that argument still builds.
        return gym.make(target) if render_mode is None else gym.make(target, render_mode=render_mode)
    except gym.error.Error as err:
        raise EnvError(f"cannot build environment '{env_id}': {err}") from err
    except ImportError as err:
        raise EnvError(f"environment '{env_id}' needs a missing package: {err}") from err
    except TypeError as err:
        raise EnvError(f"cannot build environment '{env_id}': {err}") from err


def uses_atari_wrappers(source: EnvSource, atari_wrappers: bool | None) -> bool:
    """The config's ``atari`` field: True/False as set; None means yes for an ALE id (and only for an id)."""
    if atari_wrappers is not None:
        if atari_wrappers and not isinstance(source, str):
            raise EnvError("atari: true applies to an env id (e.g. ALE/Pong-v5); an env object or factory "
                           "passed to learn must come wrapped already (palate.rl.atari.wrap_atari)")
        return atari_wrappers
    return isinstance(source, str) and ":" not in source and atari.is_ale_id(source)


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
    env_module: str | None = None,
    atari_wrappers: bool | None = None,
) -> tuple[gym.vector.VectorEnv, bool]:
    """Build a SAME_STEP-autoreset vector env of ``n_envs`` copies of ``source``.

    Returns ``(envs, owned)``; ``owned`` is False for a vector env the caller passed in, which
    palate must then neither close nor snapshot. ``sub_envs`` (restored by
    :func:`restore_envs`) replace freshly made environments in a sync vector env.
    ``env_module`` is imported first (in each subprocess too) for ids it registers;
    ``atari_wrappers`` as in :func:`make_env` (training wrappers on).

    ``vec_env="envpool"`` runs an ALE id in envpool's C++ pool (:class:`palate.rl.atari.EnvpoolAtari`),
    when envpool is installed; a factory may ask for it with an ``envpool_options`` attribute
    (the keywords of ``EnvpoolAtari``, its ``env_id`` included), as preference runs' do.
    """
    if vec_env == "envpool":
        return _envpool(source, n_envs, env_module, atari_wrappers), True
    wrap = uses_atari_wrappers(source, atari_wrappers)
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
        check_env_id(source, env_module)
        fns = [functools.partial(make_env, source, None, env_module, wrap) for _ in range(n_envs)]
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


def _envpool(source: EnvSource, n_envs: int, env_module: str | None, atari_wrappers: bool | None) -> gym.vector.VectorEnv:
    """The envpool vector env for an ALE id (training stack) or a factory's ``envpool_options``."""
    options = getattr(source, "envpool_options", None)
    if options is not None:
        options = dict(options)
        return atari.EnvpoolAtari(options.pop("env_id"), n_envs, **options)
    if isinstance(source, str):
        check_env_id(source, env_module)
        if uses_atari_wrappers(source, atari_wrappers):
            return atari.EnvpoolAtari(source, n_envs)
    raise EnvError(f"vec_env: envpool runs Atari games only (ALE ids such as PongNoFrameskip-v4 with the Atari "
                   f"preprocessing), not {env_name(source)}; use vec_env: sync or subprocess")


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
