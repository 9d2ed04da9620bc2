"""What PPO and TRPO share: the training loop, rollout collection, checkpoints and ``predict``.

The loop of both algorithms is the same four lines (see :meth:`OnPolicyAlgorithm.learn`)::

    rollout = self.collect_rollout()      # N envs x T steps with the current policy, then GAE
    metrics = self.update(batch, ...)     # the algorithm: PPO's clipped epochs or TRPO's step
    self.logger.log(...)                  # CleanRL's metric names
    self.save(...)                        # every checkpoint_every steps

so each algorithm file holds only its update rule.
"""

from __future__ import annotations

import logging
import pickle
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from palate.config import config_from_dict, config_to_dict, unknown_fields_message
from palate.errors import CheckpointError, ConfigError, EnvError
from palate.rl import curves
from palate.rl.buffer import Batch, RewardFn, RolloutBuffer, RolloutCallback, episode_stats
from palate.rl.callbacks import Callback, CallbackLike, CallbackList, EvalCallback, as_callback
from palate.rl.checkpoint import load_checkpoint, save_checkpoint
from palate.rl.config import OnPolicyConfig
from palate.rl.envs import EnvSource, env_name, make_vec_env, restore_envs, snapshot_envs, uses_atari_wrappers
from palate.rl.normalize import ObsNormalizer, PartsNormalizer, RewardNormalizer
from palate.rl.policies import ActorCritic, EncoderActorCritic, action_kind
from palate.rl.spaces import (
    ObsLayout,
    is_flat_box,
    space_from_dict,
    space_to_dict,
    tree_concat,
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


VALUE_CHUNK = 2048
"""Rows per critic forward after a rollout of images (bounds the CNN's activation memory)."""


def _game_over(info: dict[str, Any], ended: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(envs whose game is over, scores, lengths)`` from RecordEpisodeStatistics' ``final_info``.

    Under the Atari training wrappers a lost life ends the learner's episode; the game's own
    (unclipped) score comes only with the step that ends the game.
    """
    final = info.get("final_info", {})
    mask = final.get("_episode")
    if mask is None:
        return ended[:0], np.zeros(0), np.zeros(0)
    stats = final["episode"]
    return ended[np.asarray(mask)[ended]], np.asarray(stats["r"], np.float64), np.asarray(stats["l"], np.int64)


class OnPolicyAlgorithm:
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

    # ------------------------------------------------------------------ rollouts
    def collect_rollout(self, envs: gym.vector.VectorEnv, buffer: RolloutBuffer,
                        callback: Callback | None = None) -> Batch | None:
        """Run the policy for T steps in N envs and return the GAE'd batch.

        With a ``callback``, its ``on_step`` runs after every vector step, with the model's
        ``global_step`` and last observation up to date; None comes back when it asks to stop.

        The hot loop does only what acting needs: one actor forward per step under
        ``inference_mode``, NumPy writes into the preallocated buffer, no ``.item()``. The
        critic is not needed to act, so V(s_t) for the whole rollout (and V of truncated
        episodes' final observations) is one batched forward afterwards: the same numbers for a
        fraction of the cost of T single-row forwards.
        """
        cfg, policy = self.config, self.policy
        assert policy is not None and self.obs_norm is not None and self.reward_norm is not None
        box = None if policy.discrete else self.action_space
        layout, to_env = self.obs_layout, self._to_env_action
        obs, raw_obs = self._obs, self._raw_obs
        ep_return, ep_length = self._ep_return, self._ep_length
        finals: list[tuple[int, np.ndarray, Any]] = []  # (t, env indices, normalised final obs)
        start_step = self.global_step
        if callback is not None:
            callback.on_rollout_start()  # before the noise is drawn: a checkpoint saved here resumes exactly
        # All sampling noise at once: one generator call per rollout instead of one per step.
        noise = policy.noise((cfg.n_steps, cfg.n_envs), self.generator).numpy()
        actor = policy.rollout_actor()  # for an MLP NumPy: on a few rows its per-op cost is a fifth of torch's
        with torch.inference_mode():
            for t in range(cfg.n_steps):
                action_np, logp = actor.act(obs, noise[t])
                # Gaussian samples are unbounded; the env gets them clipped, the buffer keeps the
                # sample so its log-probability stays exact (as SB3 does).
                env_action = action_np if box is None else np.minimum(np.maximum(action_np, box.low), box.high)
                if to_env is not None:
                    env_action = to_env(env_action)
                next_raw, reward, terminated, truncated, info = envs.step(env_action)
                if layout is None:
                    buffer.obs[t] = obs
                    buffer.raw_obs[t] = raw_obs
                else:
                    buffer.store_obs(t, obs, raw_obs)
                    next_raw = layout.split(next_raw)
                    if actor.value is not None:  # V(s_t) from the acting forward (shared encoder)
                        buffer.values[t] = actor.value
                buffer.actions[t] = action_np
                buffer.env_actions[t] = env_action
                buffer.logp[t] = logp
                buffer.true_rewards[t] = reward
                buffer.terminated[t] = terminated
                buffer.truncated[t] = truncated
                ep_return += reward
                ep_length += 1
                raw_obs = next_raw
                obs = self.obs_norm(raw_obs, update=True)
                done = terminated | truncated
                if done.any():
                    # Truncated, not terminated: the episode had a future, worth V(final observation),
                    # normalised with the statistics that include this step's observations, as SB3's
                    # VecNormalize does for its terminal observations.
                    cut = np.flatnonzero(truncated & ~terminated)
                    if cut.size:
                        final = [info["final_obs"][i] for i in cut]
                        finals.append((t, cut, self.obs_norm(np.stack(final) if layout is None else layout.stack(final))))
                    ended = np.flatnonzero(done)
                    scores, lengths = ep_return, ep_length
                    if self._game_scores:  # Atari: whole games' unclipped scores, not the lives' clipped ones
                        ended, scores, lengths = _game_over(info, ended)
                    for i in ended:
                        self._finished_returns.append(float(scores[i]))
                        self._finished_lengths.append(int(lengths[i]))
                        self._all_returns.append(float(scores[i]))
                    self.episodes += len(ended)
                    ep_return[done] = 0.0
                    ep_length[done] = 0
                if callback is not None:  # the one test a step pays without a callback
                    self._obs, self._raw_obs = obs, raw_obs
                    self.global_step = start_step + (t + 1) * cfg.n_envs
                    callback.update_locals({"t": t, "obs": tree_map(lambda x, t=t: x[t], buffer.raw_obs),
                                            "actions": env_action,
                                            "new_obs": raw_obs, "rewards": reward, "terminated": terminated,
                                            "truncated": truncated, "dones": done, "infos": info})
                    if not callback.on_step():
                        return None
            if layout is None:
                flat_obs = buffer.obs.reshape(cfg.rollout_size, -1)
                rows = [flat_obs, obs] + [f[2] for f in finals]
                values = policy.value(torch.from_numpy(np.concatenate(rows))).numpy()
            else:
                rest = self._values(tree_concat([obs] + [f[2] for f in finals]))
                if actor.value is not None:
                    values = np.concatenate([buffer.values.reshape(-1), rest])
                else:
                    flat_obs = tree_map(lambda x: x.reshape(cfg.rollout_size, *x.shape[2:]), buffer.obs)
                    values = np.concatenate([self._values(flat_obs), rest])
        buffer.values[:] = values[:cfg.rollout_size].reshape(cfg.n_steps, cfg.n_envs)
        buffer.last_value[:] = values[cfg.rollout_size:cfg.rollout_size + cfg.n_envs]
        offset = cfg.rollout_size + cfg.n_envs
        for t, cut, _final in finals:
            buffer.bootstrap[t, cut] = values[offset:offset + len(cut)]
            offset += len(cut)
        self._obs, self._raw_obs = obs, raw_obs
        self.global_step = start_step + cfg.rollout_size
        del self._all_returns[:-1000]

        rewards = buffer.true_rewards
        if self.reward_fn is not None:
            flat = cfg.rollout_size
            predicted = self.reward_fn(buffer.external_raw_obs((flat,)),
                                       buffer.env_actions.reshape(flat, *buffer.env_actions.shape[2:]))
            predicted = np.asarray(predicted, np.float32)
            if predicted.shape not in ((flat,), (flat, 1)):
                raise ConfigError(f"reward_fn returned shape {predicted.shape}; expected ({flat},)")
            rewards = predicted.reshape(cfg.n_steps, cfg.n_envs)
        if self.rollout_callback is not None:
            self.rollout_callback(buffer.raw_dict())
        rewards = self.reward_norm(rewards, buffer.terminated | buffer.truncated)
        return buffer.compute_batch(rewards, cfg.gamma, cfg.gae_lambda)

    def _values(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """V(s) of a parts batch, in chunks of :data:`VALUE_CHUNK` rows (inside ``inference_mode``)."""
        n = tree_len(obs)
        out = [self.policy.value(tree_map(lambda x, s=s: torch.from_numpy(x[s:s + VALUE_CHUNK]), obs)).numpy()
               for s in range(0, n, VALUE_CHUNK)]
        return np.concatenate(out)

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

    # ------------------------------------------------------------------ save / load
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
