"""What PPO and TRPO share: the training loop and ``predict``, with rollout collection
(:class:`palate.rl.rollout.RolloutMixin`) and checkpoints (:class:`palate.rl.checkpoint.CheckpointMixin`).

The loop of both algorithms is the same four lines (see :meth:`OnPolicyAlgorithm.learn`)::

    rollout = self.collect_rollout()      # N envs x T steps with the current policy, then GAE
    metrics = self.update(batch, ...)     # the algorithm: PPO's clipped epochs or TRPO's step
    self.logger.log(...)                  # CleanRL's metric names
    self.save(...)                        # every checkpoint_every steps

so each algorithm file holds only its update rule.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from palate.config import config_to_dict, unknown_fields_message
from palate.errors import CheckpointError, ConfigError, EnvError
from palate.rl import curves
from palate.rl.buffer import Batch, RewardFn, RolloutBuffer, RolloutCallback, episode_stats
from palate.rl.callbacks import Callback, CallbackLike, CallbackList, EvalCallback, as_callback
from palate.rl.checkpoint import CheckpointMixin
from palate.rl.config import OnPolicyConfig
from palate.rl.envs import EnvSource, env_name, make_vec_env, restore_envs, snapshot_envs, uses_atari_wrappers
from palate.rl.normalize import ObsNormalizer, PartsNormalizer, RewardNormalizer
from palate.rl.policies import ActorCritic, EncoderActorCritic, action_kind
from palate.rl.rollout import RolloutMixin
from palate.rl.spaces import (
    ObsLayout,
    is_flat_box,
    space_to_dict,
    tree_len,
    tree_map,
)
from palate.runs import MetricsLogger, atomic_write_json

log = logging.getLogger(__name__)

Self = TypeVar("Self", bound="OnPolicyAlgorithm")


def _env_action_fn(space: gym.Space) -> Any:
    """What turns a sampled action into the env's (a start offset, MultiBinary's int8), or None
    where the sample is the env's action already (Discrete from 0; Box is clipped separately)."""
    start = getattr(space, "start", None)
    if isinstance(space, gym.spaces.MultiBinary):
        return lambda a: a.astype(np.int8)
    if isinstance(space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)) and np.any(start != 0):
        return lambda a: a + start
    return None


class OnPolicyAlgorithm(RolloutMixin, CheckpointMixin):
    """Base of :class:`~palate.rl.PPO` and :class:`~palate.rl.TRPO`; subclasses define ``update``.

    Args:
        config: the algorithm's config dataclass (defaults when None).
        reward_fn: ``f(obs [B, obs_dim], actions [B, ...]) -> rewards [B]``. When set, it replaces
            the environment's reward (before reward normalisation and GAE), as preference
            learning needs; ``charts/episodic_return`` still reports the true env return.
        rollout_callback: called after every rollout with a dict of NumPy arrays ``obs``,
            ``actions``, ``true_rewards``, ``terminated``, ``truncated``, each ``[T, N, ...]``,
            observations raw (unnormalised) and actions as executed.
        **overrides: config fields to change, e.g. ``PPO(n_envs=8)``.
    """

    algo: ClassVar[str] = ""
    config_class: ClassVar[type[OnPolicyConfig]] = OnPolicyConfig
    share_encoder: ClassVar[bool] = True
    """Whether actor and critic share one encoder of image/Dict observations (TRPO: no)."""

    def __init__(self, config: OnPolicyConfig | None = None, *, reward_fn: RewardFn | None = None,
                 rollout_callback: RolloutCallback | None = None, **overrides: Any) -> None:
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if overrides:
            unknown = sorted(set(overrides) - set(config_to_dict(config)))
            if unknown:
                raise ConfigError(f"{self.config_class.__name__}: "
                                  f"{unknown_fields_message(unknown, set(config_to_dict(config)))}")
            config = config.replace(**overrides)
        self.config = config
        self.reward_fn = reward_fn
        self.rollout_callback = rollout_callback
        self.global_step = 0
        self.iteration = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.policy: ActorCritic | None = None
        self.observation_space: gym.Space | None = None
        self.action_space: gym.Space | None = None
        self.obs_layout: ObsLayout | None = None  # None: a flat Box observation, an array
        self._game_scores = False  # episodes and returns come from the Atari score wrapper
        self._to_env_action: Any = None  # sampled action -> env action, where they differ
        self.obs_norm: ObsNormalizer | PartsNormalizer | None = None
        self.reward_norm: RewardNormalizer | None = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        # Where the environments stand between learn() calls (and across save/load).
        self._env_snapshot: bytes | None = None
        self._env_object: EnvSource | None = None  # an env/vector env the caller owns
        self._raw_obs: np.ndarray | None = None
        self._obs: np.ndarray | None = None
        self._resume_blob: bytes | None = None  # loaded, unpickled only when training continues
        self._ep_return: np.ndarray | None = None
        self._ep_length: np.ndarray | None = None
        self._finished_returns: list[float] = []
        self._finished_lengths: list[int] = []
        self._all_returns: list[float] = []  # the last 1000, for summaries
        self.episodes = 0
        self._pending_metrics: dict[str, float] = {}  # from record(), logged with the next record
        self._live_envs: tuple[gym.vector.VectorEnv, bool] | None = None  # while learn() runs

    # ------------------------------------------------------------------ subclass hooks
    def _build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def update(self, batch: Batch, progress_remaining: float) -> dict[str, Any]:
        """One policy (and critic) update on a rollout; returns metrics to log.

        ``progress_remaining`` goes from 1 at step 0 to 0 at ``config.total_steps`` (annealing).
        """
        raise NotImplementedError

    def _algo_state(self) -> dict[str, Any]:
        return {}

    def _load_optimizer_state(self, name: str, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def _load_algo_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ setup
    def _setup_model(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        """Build policy, normalisers and optimisers the first time the spaces are known.

        A flat Box observation with Discrete or Box actions gets the MLP :class:`ActorCritic`
        (NumPy rollout actor, fused update); every other combination the
        :class:`EncoderActorCritic` over the observation's parts.
        """
        cfg = self.config
        self.observation_space, self.action_space = observation_space, action_space
        simple = is_flat_box(observation_space) and action_kind(action_space) in ("discrete", "box")
        self.obs_layout = None if simple else ObsLayout(observation_space)
        # Initialise from the config's seed without disturbing the caller's global torch RNG.
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            if self.obs_layout is None:
                self.policy = ActorCritic(int(observation_space.shape[0]), action_space, cfg.hidden_sizes,
                                          cfg.activation, cfg.ortho_init, cfg.log_std_init)
            else:
                self.policy = EncoderActorCritic(self.obs_layout, action_space, cfg.hidden_sizes, cfg.activation,
                                                 cfg.ortho_init, cfg.log_std_init, cfg.cnn, cfg.cnn_features,
                                                 self.share_encoder)
        self._to_env_action = _env_action_fn(action_space)
        self.obs_norm = ObsNormalizer(observation_space.shape, cfg.norm_obs, cfg.clip_obs) \
            if self.obs_layout is None else PartsNormalizer(self.obs_layout, cfg.norm_obs, cfg.clip_obs)
        self.reward_norm = RewardNormalizer(cfg.n_envs, cfg.gamma, cfg.norm_reward, cfg.clip_reward)
        self.optimizers = self._build_optimizers()

    def _check_spaces(self, envs: gym.vector.VectorEnv) -> None:
        obs_space, act_space = envs.single_observation_space, envs.single_action_space
        if self.policy is None:
            self._setup_model(obs_space, act_space)
            return
        assert self.observation_space is not None
        if self.obs_layout is None:
            same_obs = obs_space.shape == self.observation_space.shape
        else:
            same_obs = repr(ObsLayout(obs_space)) == repr(self.obs_layout)
        if not same_obs or space_to_dict(act_space) != space_to_dict(self.action_space):
            raise EnvError(f"environment spaces {obs_space}, {act_space} differ from the model's "
                           f"{self.observation_space}, {self.action_space}")

    def _open_envs(self, source: EnvSource) -> tuple[gym.vector.VectorEnv, bool]:
        """Make the vector env and put it where the last learn() (or the checkpoint) left it."""
        cfg = self.config
        sub_envs = None
        continuing = self._raw_obs is not None
        if continuing and isinstance(source, str) and self._env_snapshot is not None and cfg.vec_env == "sync":
            sub_envs = restore_envs(self._env_snapshot)
        envs, owned = make_vec_env(source, cfg.n_envs, cfg.vec_env, sub_envs, env_module=cfg.env_module,
                                   atari_wrappers=cfg.atari)
        self._game_scores = owned and uses_atari_wrappers(source, cfg.atari)
        try:
            self._check_spaces(envs)
        except Exception:
            if owned:
                envs.close()
            raise
        same_object = not owned and source is self._env_object
        if continuing and (sub_envs is not None or same_object):
            return envs, owned  # episodes continue exactly where they stopped
        if continuing:
            log.info("environment state could not be restored: starting new episodes at step %d", self.global_step)
        # A fresh start, or a resume without an env snapshot: new seeds so episodes differ.
        raw_obs, _ = envs.reset(seed=cfg.seed + self.global_step)
        assert self.obs_norm is not None
        if self.obs_layout is not None:
            raw_obs = self.obs_layout.split(raw_obs)
        self._raw_obs = raw_obs
        self._obs = self.obs_norm(raw_obs, update=True)
        self._ep_return = np.zeros(cfg.n_envs, np.float64)
        self._ep_length = np.zeros(cfg.n_envs, np.int64)
        if self.reward_norm is not None:
            self.reward_norm.returns[:] = 0.0
        return envs, owned

    # ------------------------------------------------------------------ the loop
    def learn(self: Self, env: EnvSource | None = None, total_steps: int | None = None,
              run_dir: str | Path | None = None, progress: bool = True, *, callback: CallbackLike = None,
              reward_fn: RewardFn | None = None, rollout_callback: RolloutCallback | None = None) -> Self:
        """Train for ``total_steps`` more environment steps (default: up to ``config.total_steps``).

        May be called repeatedly; each call continues the last (global step, optimiser,
        annealing schedule, and, for sync vector envs, the episodes in progress). The
        learning-rate schedule anneals over ``config.total_steps``; a call that trains past it
        raises ``config.total_steps`` to its own end. To learn in chunks on one schedule, set
        ``total_steps`` in the config to the whole budget.

        Args:
            env: an env id, a gymnasium env (``n_envs`` must be 1), a SAME_STEP-autoreset vector
                env, or a zero-argument env factory; default ``config.env``.
            total_steps: environment steps to add (rounded up to whole rollouts of N * T).
            run_dir: where to write metrics.jsonl, TensorBoard events, checkpoint.pt and
                summary.json; None writes nothing.
            progress: show a tqdm bar (only on a terminal).
            callback: a :class:`~palate.rl.callbacks.Callback`, a list of them, or a function
                ``f(locals, model)`` called after every vector step; ``False`` from ``on_step``
                stops training. With ``config.eval_every`` an
                :class:`~palate.rl.callbacks.EvalCallback` runs as well.
            reward_fn, rollout_callback: set the attributes of the same names (see the class).
        """
        cfg = self.config
        callback = self._callbacks(callback, env)
        if reward_fn is not None:
            self.reward_fn = reward_fn
        if rollout_callback is not None:
            self.rollout_callback = rollout_callback
        source: EnvSource = env if env is not None else cfg.env
        if isinstance(source, str) and source != cfg.env:
            self._env_snapshot = None  # the snapshot belongs to another env
            self._raw_obs = None
            cfg.env = source
        elif not isinstance(source, str):
            cfg.env = env_name(source)
        if total_steps is None:
            total_steps = max(cfg.total_steps - self.global_step, 0)
        elif isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) or total_steps < 0:
            raise ConfigError(f"learn(total_steps={total_steps!r}): give a whole number of additional environment "
                              "steps >= 0, or None to train on to config.total_steps")
        end = self.global_step + int(total_steps)
        if end > cfg.total_steps:
            cfg.total_steps = end
        prev_threads = torch.get_num_threads()
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        logger, envs, owned, bar, completed = None, None, False, None, False
        stopped = False
        try:
            if self._resume_blob is not None:
                self._restore_resume_state()
            envs, owned = self._open_envs(source)
            self._env_object = None if owned else source
            self._live_envs = (envs, owned)
            logger = MetricsLogger(run_dir) if run_dir is not None else None
            bar = tqdm(total=end, initial=self.global_step, unit="step", dynamic_ncols=True,
                       disable=not progress or not sys.stderr.isatty(), desc=f"{self.algo} {cfg.env}")
            buffer = RolloutBuffer(cfg.n_steps, cfg.n_envs, self.observation_space.shape,
                                   self.action_space.shape, self.policy.discrete, self.obs_layout)
            start_time, start_step = time.perf_counter(), self.global_step
            last_drawn = start_time
            next_checkpoint = (self.global_step // cfg.checkpoint_every + 1) * cfg.checkpoint_every \
                if cfg.checkpoint_every else None
            if callback is not None:
                callback.init_callback(self)
                callback.on_training_start({"self": self, "envs": envs, "run_dir": run_dir,
                                            "total_steps": end - self.global_step})
            while self.global_step < end:
                progress_remaining = max(1.0 - self.global_step / cfg.total_steps, 0.0)
                batch = self.collect_rollout(envs, buffer, callback)
                if batch is None:  # a callback's on_step said stop: the partial rollout is dropped
                    stopped = True
                    log.info("training stopped by a callback at step %d", self.global_step)
                    break
                if callback is not None:
                    callback.update_locals({"batch": batch})
                    callback.on_rollout_end()
                metrics = self.update(batch, progress_remaining)
                self.iteration += 1
                if self.iteration % cfg.log_interval == 0:
                    sps = (self.global_step - start_step) / (time.perf_counter() - start_time)
                    metrics.update(episode_stats(self._finished_returns, self._finished_lengths))
                    metrics["charts/SPS"] = sps
                    metrics.update(self._pending_metrics)
                    self._pending_metrics = {}
                    self._finished_returns, self._finished_lengths = [], []
                    if logger is not None:
                        logger.log(self.global_step, metrics)
                    if "charts/episodic_return" in metrics:
                        bar.set_postfix(ret=f"{metrics['charts/episodic_return']:.1f}", refresh=False)
                bar.update(cfg.rollout_size)
                if next_checkpoint is not None and run_dir is not None and self.global_step >= next_checkpoint:
                    self.save(run_dir)
                    # Redrawn at checkpoints now and then (the end of learn always draws): the
                    # plot costs ~0.1 s, matplotlib's import ~0.5 s, too much for every checkpoint.
                    if self.global_step < end and time.perf_counter() - last_drawn >= curves.REDRAW_EVERY_S:
                        curves.try_write_curves(run_dir, self._curves_title())
                        last_drawn = time.perf_counter()
                    next_checkpoint += cfg.checkpoint_every
            if callback is not None:
                callback.on_training_end()
            completed = True
        finally:
            self._live_envs = None
            if bar is not None:
                bar.close()
            if envs is not None and completed:
                self._snapshot(envs, owned)
            if envs is not None and owned:
                envs.close()
            if logger is not None:
                logger.close()
            torch.set_num_threads(prev_threads)
        elapsed = time.perf_counter() - start_time
        self.last_learn_sps = (self.global_step - start_step) / max(elapsed, 1e-9)
        if run_dir is not None:
            self.save(run_dir)
            atomic_write_json(Path(run_dir) / "summary.json", self.summary(elapsed))
            curves.try_write_curves(run_dir, self._curves_title())
        log.info("%s %s: %d steps%s, %.0f steps/s, mean return of the last 100 episodes %s",
                 self.algo, cfg.env, self.global_step, " (stopped by a callback)" if stopped else "",
                 self.last_learn_sps, self._recent_return())
        return self

    def _callbacks(self, callback: CallbackLike, env: EnvSource | None) -> Callback | None:
        """``learn``'s callback as one Callback, with the EvalCallback that ``eval_every`` asks for."""
        callback = as_callback(callback)
        cfg = self.config
        if not cfg.eval_every:
            return callback
        eval_env = env if env is not None else cfg.env
        if isinstance(eval_env, (gym.Env, gym.vector.VectorEnv)):
            raise ConfigError("eval_every evaluates on a separate env, which cannot be made from the env instance "
                              "passed to learn; pass an env id or a factory, or give "
                              "callback=EvalCallback(eval_env=...) and eval_every=0")
        evaluator = EvalCallback(eval_env, n_eval_episodes=cfg.eval_episodes, eval_freq=cfg.eval_every)
        return evaluator if callback is None else CallbackList([evaluator, callback])

    def record(self, key: str, value: float) -> None:
        """Add the scalar ``key`` to the next record of metrics.jsonl and TensorBoard (callbacks use this)."""
        self._pending_metrics[key] = float(value)

    def _curves_title(self) -> str:
        return f"{self.algo.upper()} on {self.config.env}, seed {self.config.seed}"

    def _snapshot(self, envs: gym.vector.VectorEnv, owned: bool) -> None:
        self._env_snapshot = snapshot_envs(envs) if owned else None

    def _recent_return(self) -> str:
        recent = self._all_returns[-100:]
        return f"{np.mean(recent):.1f}" if recent else "n/a (no episode finished)"

    def summary(self, elapsed: float | None = None) -> dict[str, Any]:
        """What summary.json holds."""
        recent = self._all_returns[-100:]
        out: dict[str, Any] = {"algo": self.algo, "env": self.config.env, "global_step": self.global_step,
                               "iterations": self.iteration, "episodes": self.episodes,
                               "mean_return_last_100": float(np.mean(recent)) if recent else None}
        if elapsed is not None:
            out.update(wall_time_s=elapsed, steps_per_s=self.last_learn_sps)
        return out

    # ------------------------------------------------------------------ inference
    def predict(self, obs: Any, deterministic: bool = True, *,
                generator: torch.Generator | None = None) -> np.ndarray:
        """Actions for raw observations ``[obs_dim]`` or ``[B, obs_dim]`` (normalised with the
        saved statistics, frozen); Box actions come back clipped to the action space.

        Image, Dict and Tuple observations are passed as the env returns them (one, or a batch
        as a vector env returns them). Stochastic actions draw from ``generator`` (default the
        model's own, which training uses).
        """
        if self.policy is None or self.obs_norm is None:
            raise CheckpointError("predict needs a trained or loaded model; call learn() or load() first")
        if self.obs_layout is None:
            obs = self._check_obs(obs)
            single = obs.ndim == len(self.observation_space.shape)
            norm = self.obs_norm(obs[None] if single else obs)
            torch_obs = torch.from_numpy(norm)
        else:
            parts, single = self.obs_layout.check(obs, "predict")
            torch_obs = tree_map(torch.from_numpy, self.obs_norm(parts))
        with torch.inference_mode():
            noise = None if deterministic else self.policy.noise((tree_len(torch_obs),), generator or self.generator)
            action = self.policy.act(torch_obs, noise)[0].numpy()
        if not self.policy.discrete:
            action = np.clip(action, self.action_space.low, self.action_space.high)
        if self._to_env_action is not None:
            action = self._to_env_action(action)
        return action[0] if single else action

    def _check_obs(self, obs: Any) -> np.ndarray:
        """``obs`` as float32 of the model's observation shape (one or a batch), finite, or EnvError."""
        shape = tuple(self.observation_space.shape)
        try:
            arr = np.asarray(obs, np.float32)
        except (TypeError, ValueError) as err:
            raise EnvError(f"predict: the observation is not an array of numbers ({err}); pass the env's "
                           f"observation, shape {shape} or [batch, {', '.join(map(str, shape))}]") from err
        if arr.shape != shape and arr.shape[1:] != shape:
            raise EnvError(f"predict: observation of shape {arr.shape}, but the model takes {shape} or "
                           f"[batch, {', '.join(map(str, shape))}] (it was trained on {self.config.env}); pass "
                           "that env's observation, e.g. obs from env.reset() or env.step()")
        if not np.isfinite(arr).all():
            raise EnvError(f"predict: the observation holds NaN or inf ({arr.tolist() if arr.size <= 8 else 'see obs'});"
                           " the policy's action would be meaningless; check the env or the code that built it")
        return arr
