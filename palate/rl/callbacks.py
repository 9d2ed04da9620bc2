"""Callbacks with Stable-Baselines3's shape: hooks into :meth:`OnPolicyAlgorithm.learn`.

    learn()
      on_training_start()
      for each rollout:
        on_rollout_start()
        for each vector step:  on_step()      -> False stops training at once
        on_rollout_end()                      (before the update)
        ... the update ...
      on_training_end()

Write a callback by subclassing :class:`Callback` and overriding the ``_on_*`` methods, as in
SB3 (``_on_step`` returning ``False`` stops training; returning nothing continues). Inside, the
callback sees ``self.model`` (the trainer), ``self.training_env`` (its vector env),
``self.num_timesteps`` (environment steps so far, summed over the envs), ``self.n_calls``
(``on_step`` calls so far), ``self.locals`` (the rollout's variables at this step) and
``self.run_dir``. ``learn(callback=...)`` takes a :class:`Callback`, a list of them, or a plain
function ``f(locals, model)``.

Without a callback the rollout loop pays one ``is None`` test per step: the fast path stays fast.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym

from palate.errors import ConfigError
from palate.runs import atomic_write_text

if TYPE_CHECKING:
    from palate.rl.envs import EnvSource
    from palate.rl.on_policy import OnPolicyAlgorithm

log = logging.getLogger(__name__)


class Callback:
    """Base class: every hook does nothing and training continues.

    Args:
        verbose: 0 silent, 1 log what the callback does (evaluations, saves, stops).
    """

    def __init__(self, verbose: int = 0) -> None:
        self.verbose = verbose
        self.model: OnPolicyAlgorithm | None = None
        self.training_env: Any = None
        self.run_dir: Path | None = None
        self.n_calls = 0
        self.num_timesteps = 0
        self.locals: dict[str, Any] = {}
        self.parent: Callback | None = None  # the EvalCallback that calls this one, if any

    # ---------------------------------------------------------------- called by the trainer
    def init_callback(self, model: OnPolicyAlgorithm) -> None:
        """Bind the callback to ``model`` (at the start of each ``learn``)."""
        self.model = model
        self._init_callback()

    def on_training_start(self, locals_: dict[str, Any]) -> None:
        self.locals = locals_
        self.training_env = locals_.get("envs")
        run_dir = locals_.get("run_dir")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.num_timesteps = self.model.global_step
        self._on_training_start()

    def on_rollout_start(self) -> None:
        self.num_timesteps = self.model.global_step
        self._on_rollout_start()

    def on_step(self) -> bool:
        """Called after every vector step; ``False`` stops training (the partial rollout is dropped)."""
        self.n_calls += 1
        self.num_timesteps = self.model.global_step
        return self._on_step() is not False

    def on_rollout_end(self) -> None:
        self.num_timesteps = self.model.global_step
        self._on_rollout_end()

    def on_training_end(self) -> None:
        self.num_timesteps = self.model.global_step
        self._on_training_end()

    def update_locals(self, locals_: dict[str, Any]) -> None:
        """Refresh :attr:`locals` (the trainer does this before each ``on_step``)."""
        self.locals.update(locals_)

    # ---------------------------------------------------------------- to override
    def _init_callback(self) -> None:
        pass

    def _on_training_start(self) -> None:
        pass

    def _on_rollout_start(self) -> None:
        pass

    def _on_step(self) -> bool | None:
        return True

    def _on_rollout_end(self) -> None:
        pass

    def _on_training_end(self) -> None:
        pass

    # ---------------------------------------------------------------- helpers
    def record(self, key: str, value: float) -> None:
        """Add a scalar to the next record of metrics.jsonl and TensorBoard."""
        self.model.record(key, value)


class CallbackList(Callback):
    """Several callbacks called in order; training stops when any ``on_step`` returns False."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        super().__init__()
        self.callbacks = [as_callback(c) for c in callbacks]

    def _init_callback(self) -> None:
        for c in self.callbacks:
            c.init_callback(self.model)

    def _on_training_start(self) -> None:
        for c in self.callbacks:
            c.on_training_start(self.locals)

    def _on_rollout_start(self) -> None:
        for c in self.callbacks:
            c.on_rollout_start()

    def _on_step(self) -> bool:
        go_on = True
        for c in self.callbacks:
            go_on = c.on_step() and go_on  # every callback sees every step, as in SB3
        return go_on

    def _on_rollout_end(self) -> None:
        for c in self.callbacks:
            c.on_rollout_end()

    def _on_training_end(self) -> None:
        for c in self.callbacks:
            c.on_training_end()

    def update_locals(self, locals_: dict[str, Any]) -> None:
        super().update_locals(locals_)
        for c in self.callbacks:
            c.update_locals(locals_)


class FunctionCallback(Callback):
    """``fn(locals, model)`` called at every step; returning ``False`` stops training."""

    def __init__(self, fn: Callable[[dict[str, Any], Any], bool | None]) -> None:
        super().__init__()
        self.fn = fn

    def _on_step(self) -> bool | None:
        return self.fn(self.locals, self.model)


CallbackLike = Callback | Sequence[Callback] | Callable[[dict[str, Any], Any], bool | None] | None


def as_callback(callback: CallbackLike) -> Callback | None:
    """What ``learn(callback=...)`` accepts, as one :class:`Callback` (None stays None)."""
    if callback is None or isinstance(callback, Callback):
        return callback
    if isinstance(callback, (list, tuple)):
        return CallbackList(callback)
    if callable(callback):
        return FunctionCallback(callback)
    raise ConfigError(f"callback must be a palate.rl.callbacks.Callback, a list of them or a function "
                      f"f(locals, model), got {type(callback).__name__}")


class _EveryN:
    """Fires once each time ``num_timesteps`` crosses a multiple of ``every``."""

    def __init__(self, every: int, name: str) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
            raise ConfigError(f"{name} must be a whole number of environment steps > 0, got {every!r}")
        self.every = every
        self.next = every

    def start(self, step: int) -> None:
        """Count from ``step`` (where this learn call begins)."""
        self.next = (step // self.every + 1) * self.every

    def due(self, step: int) -> bool:
        if step < self.next:
            return False
        self.start(step)
        return True


class CheckpointCallback(Callback):
    """Save the model every ``save_freq`` environment steps to ``save_path/<name_prefix>_<step>_steps.pt``.

    Each file is a whole checkpoint (written atomically), so any of them resumes training:
    ``PPO.load(path).learn(...)``. The save happens at the start of the next rollout (or at the
    end of training), where the update of the rollout that crossed the interval is done: a run
    resumed from the file continues exactly as the uninterrupted one would.

    Args:
        save_freq: environment steps between saves, summed over the envs (SB3 counts vector
            steps; here it is the same unit as ``total_steps``).
        save_path: directory for the files; default ``<run_dir>/checkpoints``.
        name_prefix: file name prefix.
    """

    def __init__(self, save_freq: int, save_path: str | Path | None = None, name_prefix: str = "rl_model",
                 verbose: int = 0) -> None:
        super().__init__(verbose)
        self._every = _EveryN(save_freq, "CheckpointCallback save_freq")
        self.save_path = Path(save_path) if save_path is not None else None
        self.name_prefix = name_prefix
        self._due = False
        self.saved: list[Path] = []

    def _on_training_start(self) -> None:
        self._every.start(self.num_timesteps)
        if self.save_path is None:
            if self.run_dir is None:
                raise ConfigError("CheckpointCallback needs save_path when learn() has no run_dir")
            self.save_path = self.run_dir / "checkpoints"

    def _on_step(self) -> bool:
        if self._every.due(self.num_timesteps):
            self._due = True
        return True

    def _on_rollout_start(self) -> None:
        if self._due:
            self._save()

    def _on_training_end(self) -> None:
        if self._due:
            self._save()

    def _save(self) -> None:
        self._due = False
        path = self.save_path / f"{self.name_prefix}_{self.model.global_step}_steps.pt"
        self.model.save(path)
        self.saved.append(path)
        if self.verbose:
            log.info("checkpoint %s", path)


class EvalCallback(Callback):
    """Evaluate the policy every ``eval_freq`` environment steps on a separate env; keep the best.

    Each evaluation runs ``n_eval_episodes`` whole episodes (episode i reset with ``seed + i``,
    the same episodes every time, so evaluations compare like with like) with
    :func:`palate.rl.evaluate.evaluate`, which never touches the training RNG: a run with this
    callback trains exactly as one without it. It appends a record to
    ``<log_path>/evaluations.jsonl`` (step, returns, lengths, mean and std), adds
    ``eval/episodic_return`` and ``eval/episodic_length`` to the next metrics record, and when
    the mean return is the best so far, saves the model to ``<best_model_save_path>/checkpoint.pt``
    and calls ``callback_on_new_best`` (e.g. :class:`StopTrainingOnRewardThreshold`).

    Args:
        eval_env: an env id, a gymnasium env, or a zero-argument factory; default the
            training env's id.
        callback_on_new_best: called when a new best mean return is reached; its ``False``
            stops training.
        callback_after_eval: called after every evaluation; its ``False`` stops training.
        n_eval_episodes: episodes per evaluation.
        eval_freq: environment steps between evaluations, summed over the envs (SB3 counts
            vector steps).
        log_path: directory of evaluations.jsonl; default the run directory (None without one).
        best_model_save_path: directory of the best model's checkpoint.pt; default
            ``<run_dir>/best`` (None without a run directory: nothing saved).
        deterministic: take the mode of the policy (the default) or sample.
        seed: episode i of every evaluation is reset with ``seed + i``.
    """

    def __init__(self, eval_env: EnvSource | None = None, callback_on_new_best: Callback | None = None,
                 callback_after_eval: Callback | None = None, n_eval_episodes: int = 5, eval_freq: int = 10_000,
                 log_path: str | Path | None = None, best_model_save_path: str | Path | None = None,
                 deterministic: bool = True, seed: int = 10_000, verbose: int = 1) -> None:
        super().__init__(verbose)
        if not isinstance(n_eval_episodes, int) or n_eval_episodes <= 0:
            raise ConfigError(f"EvalCallback n_eval_episodes must be a whole number > 0, got {n_eval_episodes!r}")
        self.eval_env = eval_env
        self.callback_on_new_best = callback_on_new_best
        self.callback_after_eval = callback_after_eval
        for child in (callback_on_new_best, callback_after_eval):
            if child is not None:
                child.parent = self
        self.n_eval_episodes = n_eval_episodes
        self._every = _EveryN(eval_freq, "EvalCallback eval_freq")
        self.log_path = Path(log_path) if log_path is not None else None
        self.best_model_save_path = Path(best_model_save_path) if best_model_save_path is not None else None
        self.deterministic = deterministic
        self.seed = seed
        self.best_mean_reward = float("-inf")
        self.last_mean_reward = float("-inf")
        self.evaluations: list[dict[str, Any]] = []
        self._env: Any = None
        self._owns_env = False

    def _init_callback(self) -> None:
        for child in (self.callback_on_new_best, self.callback_after_eval):
            if child is not None:
                child.init_callback(self.model)

    def _on_training_start(self) -> None:
        from palate.rl.envs import make_env

        self._every.start(self.num_timesteps)
        if self.run_dir is not None:
            self.log_path = self.log_path or self.run_dir
            self.best_model_save_path = self.best_model_save_path or self.run_dir / "best"
        if self._env is None:
            source = self.eval_env if self.eval_env is not None else self.model.config.env
            if isinstance(source, str):
                self._env, self._owns_env = make_env(source, env_module=self.model.config.env_module,
                                                   atari_wrappers=self.model.config.atari, training=False), True
            elif isinstance(source, gym.Env):
                self._env = source  # the caller's: not closed here
            elif callable(source):
                self._env, self._owns_env = source(), True
            else:
                raise ConfigError(f"EvalCallback eval_env must be an env id, a gymnasium env or a factory, "
                                  f"got {type(source).__name__}")
        self._resume_log()
        for child in (self.callback_on_new_best, self.callback_after_eval):
            if child is not None:
                child.on_training_start(self.locals)

    def _resume_log(self) -> None:
        """A resumed run keeps the evaluations up to its checkpoint, and their best."""
        path = self.log_path / "evaluations.jsonl" if self.log_path is not None else None
        if path is None or not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
            if rec.get("step", 0) <= self.model.global_step:
                kept.append(rec)
        self.evaluations = kept
        self.best_mean_reward = max((r["mean_return"] for r in kept), default=float("-inf"))
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def _on_step(self) -> bool:
        if not self._every.due(self.num_timesteps):
            return True
        return self.evaluate_now()

    def evaluate_now(self) -> bool:
        """Run one evaluation now; False when a child callback asks to stop."""
        from palate.rl.evaluate import evaluate

        result = evaluate(self.model, self._env, episodes=self.n_eval_episodes,
                          deterministic=self.deterministic, seed=self.seed)
        record = {"step": self.num_timesteps, **result.to_dict()}
        self.evaluations.append(record)
        self.last_mean_reward = result.mean_return
        self.record("eval/episodic_return", result.mean_return)
        self.record("eval/episodic_length", record["mean_length"])
        if self.log_path is not None:
            self.log_path.mkdir(parents=True, exist_ok=True)
            with open(self.log_path / "evaluations.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.verbose:
            log.info("eval at step %d: return %.2f +- %.2f over %d episodes", self.num_timesteps,
                     result.mean_return, result.std_return, self.n_eval_episodes)
        go_on = True
        if result.mean_return > self.best_mean_reward:
            self.best_mean_reward = result.mean_return
            if self.best_model_save_path is not None:
                self.model.save(self.best_model_save_path)
                if self.verbose:
                    log.info("new best mean return %.2f -> %s", result.mean_return, self.best_model_save_path)
            if self.callback_on_new_best is not None:
                go_on = self.callback_on_new_best.on_step()
        if self.callback_after_eval is not None:
            go_on = self.callback_after_eval.on_step() and go_on
        return go_on

    def _on_training_end(self) -> None:
        if self._owns_env and self._env is not None:
            self._env.close()
            self._env = None
        for child in (self.callback_on_new_best, self.callback_after_eval):
            if child is not None:
                child.on_training_end()


class StopTrainingOnRewardThreshold(Callback):
    """Stop training once the best evaluation return reaches ``reward_threshold``.

    Use it as ``EvalCallback(callback_on_new_best=StopTrainingOnRewardThreshold(475))``.
    """

    def __init__(self, reward_threshold: float, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.reward_threshold = float(reward_threshold)

    def _on_step(self) -> bool:
        if not isinstance(self.parent, EvalCallback):
            raise ConfigError("StopTrainingOnRewardThreshold works inside an EvalCallback: "
                              "EvalCallback(callback_on_new_best=StopTrainingOnRewardThreshold(...))")
        go_on = self.parent.best_mean_reward < self.reward_threshold
        if not go_on and self.verbose:
            log.info("stopping: best mean return %.2f reached the threshold %.2f",
                     self.parent.best_mean_reward, self.reward_threshold)
        return go_on
