"""The preference-learning loop of Christiano et al. 2017, for control.

    random-policy warm-up -> first 25% of the labels -> fit r_hat
    repeat until `steps` policy steps:
        learn(chunk) with reward_fn = r_hat (normalised), rollouts -> trajectory pool
        label up to the schedule: pairs from the pool, picked by the selector
        fit r_hat on every label so far; re-normalise its output on recent states

The agent never sees the environment's reward: PPO/TRPO get ``reward_fn = RewardEnsemble.predict``;
the true reward is only read by the synthetic oracle and by the metrics
(``charts/episodic_return``, ``prefs/reward_correlation``).

Labelling rate. The paper labels at a rate proportional to 2e6 / (T + 2e6) on MuJoCo; with
T0 = ``label_schedule_t0`` the number of labels wanted by policy step T is
n0 + (B - n0) * ln(1 + T/T0) / ln(1 + S/T0), the integral of a 1/(1 + T/T0) rate scaled to
spend the whole budget B by the last step S (n0: the random-policy share).

The parts: :mod:`~palate.preferences.config` (the config and what it builds),
:mod:`~palate.preferences.channels` (where labels come from, synchronously or from people),
:mod:`~palate.preferences.checkpoint` (``prefs_state.pt`` and resume), and the pool, reward model,
selector, labellers and label store in their own modules.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from palate.config import config_to_dict
from palate.errors import PreferenceError
from palate.preferences.channels import AsyncChannel, SyncChannel
from palate.preferences.checkpoint import CHECKPOINT_FILE, TrainerCheckpoint
from palate.preferences.config import PreferenceConfig, algo_classes, policy_config, reward_model

log = logging.getLogger(__name__)


def labels_wanted(step: int, cfg: PreferenceConfig) -> int:
    """Labels the schedule wants answered by policy step ``step`` (see the module docstring)."""
    n0 = initial_labels(cfg)
    frac = math.log1p(step / cfg.label_schedule_t0) / math.log1p(cfg.steps / cfg.label_schedule_t0)
    return min(cfg.labels, n0 + int(round((cfg.labels - n0) * min(frac, 1.0))))


def initial_labels(cfg: PreferenceConfig) -> int:
    """Labels asked on random-policy clips before any policy training."""
    return int(round(cfg.initial_label_fraction * cfg.labels))


class PreferenceTrainer(TrainerCheckpoint):
    """Owns the parts (pool, ensemble, selector, labeller, store) and runs the loop.

    Every part may be injected (tests pass a fake labeller; a custom selector plugs in here);
    anything left None is built from the config.
    """

    def __init__(self, cfg: PreferenceConfig, *, labeller: Any | None = None, selector: Any | None = None,
                 run_dir: str | Path | None = None) -> None:
        import gymnasium as gym

        from palate.preferences.reward_model import PreferenceDataset
        from palate.preferences.segments import TrajectoryPool
        from palate.preferences.selection import make_selector
        from palate.preferences.wrappers import make_env_factory

        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.runs_dir) / cfg.name
        self.env_factory = make_env_factory(cfg)
        # Atari: episodes are not games (continuous games, or lives), so game scores come from the env.
        self.atari = bool(getattr(self.env_factory, "atari", False))
        probe = self.env_factory()
        try:
            self.observation_space, self.action_space = probe.observation_space, probe.action_space
            self._env_spec = probe.spec
        finally:
            probe.close()
        if not isinstance(self.observation_space, gym.spaces.Box):
            raise PreferenceError(f"{cfg.env}: preference learning needs Box observations, got {self.observation_space}")
        self.rng = np.random.default_rng(cfg.seed)
        # Continuous Atari games never end: each env slot's running game goes to the pool in pieces
        # of pool_steps / (4 n_envs), so the pool holds about 1.25 x pool_steps steps (plus one rollout per slot).
        open_steps = max(cfg.segment_length, cfg.pool_steps // (4 * policy_config(cfg).n_envs)) if self.atari else None
        self.pool = TrajectoryPool(max_steps=cfg.pool_steps, max_open_steps=open_steps)
        self.model = reward_model(cfg, self.observation_space, self.action_space)
        self.dataset = PreferenceDataset()
        self.selector = selector if selector is not None else make_selector(cfg.selector, cfg.oversample)
        self._labeller = labeller
        self.asked = 0  # comparisons sent to the labeller (the budget counts these)
        self.answered = 0  # answers recorded, "can't tell" included
        self.policy: Any = None
        self._vec_env: Any = None
        self.random_steps = 0
        self._resume_state: dict[str, Any] | None = None  # set by resume(): train() continues it
        self._random_games: tuple[list[float], list[int]] = ([], [])  # Atari: games of the warm-up

    # ------------------------------------------------------------------ parts
    def _build_labeller(self) -> Any:
        from palate.preferences.labellers import SyntheticOracle

        cfg = self.cfg
        if cfg.labeller == "synthetic":
            return SyntheticOracle(cfg.temperature, cfg.oracle_error_rate, np.random.default_rng(cfg.seed + 1),
                                   equal_margin=cfg.oracle_equal_margin)

        from palate.feedback.client import client_from_env
        from palate.preferences.labellers import HumanLabeller
        from palate.preferences.render import SegmentRenderer

        client = client_from_env(cfg.feedback_url, cfg.feedback_token_env, "the human labeller", PreferenceError)
        return HumanLabeller(client, SegmentRenderer(cfg.env, self.env_factory), project=cfg.feedback_project or cfg.name)

    def _build_policy(self) -> Any:
        algo_cls, _ = algo_classes(self.cfg.algo)
        return algo_cls(policy_config(self.cfg), reward_fn=self._policy_reward,
                        rollout_callback=self.pool.add_rollout)

    def _policy_reward(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """What PPO/TRPO optimise: the normalised r_hat, plus ``reward_offset``."""
        r = self.model.predict(obs, actions)
        return r + np.float32(self.cfg.reward_offset) if self.cfg.reward_offset else r

    def _make_vec_env(self, sub_envs: list[Any] | None = None) -> Any:
        """The run's one vector env (``sub_envs``: environments restored from a checkpoint)."""
        from palate.rl.envs import make_vec_env

        vec_env, _ = make_vec_env(self.env_factory, self.policy.config.n_envs, self.policy.config.vec_env, sub_envs)
        vec_env.spec = self._env_spec  # so checkpoints name the env id, not "SyncVectorEnv"
        return vec_env

    def _channel(self, store: Any) -> Any:
        """The channel to the labeller, not yet started: a resume first adopts its open queries."""
        labeller = self._labeller if self._labeller is not None else self._build_labeller()
        if getattr(labeller, "asynchronous", False):
            return AsyncChannel(labeller, store, self.cfg.max_pending, start=False)
        return SyncChannel(labeller, store)

    # ------------------------------------------------------------------ steps of the loop
    def collect_random(self, n_steps: int) -> None:
        """Warm-up experience from the uniformly random policy, into the pool."""
        env = self.env_factory()
        try:
            env.action_space.seed(self.cfg.seed)
            obs, _ = env.reset(seed=self.cfg.seed)
            buf: dict[str, list[Any]] = {"obs": [], "actions": [], "rewards": []}
            for _ in range(n_steps):
                action = env.action_space.sample()
                nxt, reward, terminated, truncated, _ = env.step(action)
                buf["obs"].append(obs)
                buf["actions"].append(action)
                buf["rewards"].append(reward)
                obs = nxt
                if terminated or truncated:
                    self.pool.add_trajectory(np.asarray(buf["obs"]), np.asarray(buf["actions"]),
                                             np.asarray(buf["rewards"]), finished=True)
                    buf = {"obs": [], "actions": [], "rewards": []}
                    obs, _ = env.reset()
                elif len(buf["obs"]) >= self.pool.max_open_steps:
                    # An episode longer than the pool keeps (continuous Atari games): hand it over
                    # in pieces, so the warm-up never holds more than the pool would.
                    self.pool.add_trajectory(np.asarray(buf["obs"]), np.asarray(buf["actions"]),
                                             np.asarray(buf["rewards"]), finished=False)
                    buf = {"obs": [], "actions": [], "rewards": []}
            if buf["obs"]:
                self.pool.add_trajectory(np.asarray(buf["obs"]), np.asarray(buf["actions"]),
                                         np.asarray(buf["rewards"]), finished=False)
            if self.atari:
                self._random_games = env.get_wrapper_attr("pop_game_scores")()
        finally:
            env.close()
        self.random_steps += n_steps

    def ask(self, channel: Any, n: int, selector: Any) -> int:
        """Select ``n`` pairs from the pool and offer them to the labeller; returns how many went."""
        from palate.preferences.labellers import Query

        n = min(n, self.cfg.labels - self.asked)
        if n <= 0:
            return 0
        scorer = self.model if self.model.n_fits > 0 else None
        # Candidates are views into the pool; only the pairs kept get arrays of their own.
        pairs = selector.select(lambda k: self.pool.sample_pairs(k, self.cfg.segment_length, self.rng, copy=False),
                                n, scorer)
        sent = channel.offer([Query.new(p.copy()) for p in pairs])
        self.asked += sent
        return sent

    def absorb(self, comparisons: list[Any]) -> None:
        """Add recorded answers to the dataset; "can't tell" ones are counted and dropped."""
        for c in comparisons:
            self.answered += 1
            if c.mu is not None:
                self.dataset.add(c.pair, c.mu, c.id)

    def fit(self, epochs: int) -> dict[str, float]:
        """Fit r_hat on every label so far, then re-normalise it on recent states."""
        metrics: dict[str, float] = {}
        if len(self.dataset) == 0:
            return metrics
        stats = self.model.fit(self.dataset, epochs=epochs)
        metrics.update(stats.as_metrics())
        obs, actions, true_r = self.pool.recent_transitions(self.cfg.rm_stats_steps, self.rng)
        self.model.update_output_stats(obs, actions)
        pred = self.model.predict(obs, actions)
        if np.std(true_r) > 0 and np.std(pred) > 0:
            metrics["prefs/reward_correlation"] = float(np.corrcoef(pred, true_r)[0, 1])
        return metrics

    def evaluate(self, episodes: int) -> list[float]:
        """True returns of the deterministic policy on the *unmodified* environment.

        Measured with the standard episode rules (early termination included) so that the figure
        compares directly with PPO/TRPO trained on the true reward; never shown to the agent.
        """
        from palate.rl.evaluate import evaluate

        return list(evaluate(self.policy, env_id=self.cfg.env, episodes=episodes, seed=self.cfg.seed + 10_000).returns)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Run the whole loop, or continue it after :meth:`resume`; returns (and writes) the run summary."""
        import torch

        from palate.preferences.selection import RandomSelector
        from palate.preferences.storage import LabelStore, drop_torn_tail, load_labels
        from palate.runs import (
            MetricsLogger,
            atomic_write_json,
            atomic_write_text,
            prepare_run_dir,
            read_run_config,
            seed_everything,
            truncate_metrics,
        )

        cfg = self.cfg
        start = time.perf_counter()
        resume = self._resume_state
        if resume is None:
            seed_everything(cfg.seed)
            # Read reused labels first: a bad --labels-from fails before anything is written.
            reused = load_labels(cfg.labels_from, obs_shape=tuple(self.observation_space.shape),
                                 include_cant_tell=True) if cfg.labels_from else []
            run_dir = prepare_run_dir(self.run_dir, config_to_dict(cfg), overwrite=cfg.overwrite)
            if cfg.overwrite:
                for stale in (run_dir / "labels.jsonl", run_dir / CHECKPOINT_FILE, *run_dir.glob("segments/*.npz")):
                    stale.unlink(missing_ok=True)
        else:
            import yaml

            run_dir = self.run_dir
            drop_torn_tail(run_dir)
            # Records past the checkpoint are logged again as the loop repeats those steps.
            truncate_metrics(run_dir, resume["step"])
            truncate_metrics(run_dir / "policy", resume["step"])
            saved = read_run_config(run_dir)
            if saved.get("steps") != cfg.steps:  # a new target (--steps) is the run's from now on
                atomic_write_text(run_dir / "config.yaml", yaml.safe_dump({**saved, "steps": cfg.steps}, sort_keys=False))
            log.info("resuming %s at policy step %d of %d", run_dir, resume["step"], cfg.steps)
        store = LabelStore(run_dir, meta={"env": cfg.env, "run": cfg.name})
        logger = MetricsLogger(run_dir)
        channel = self._channel(store)
        if resume is None:
            channel.start()
        prev_threads = torch.get_num_threads()
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        try:
            if resume is None:
                if reused:
                    store.import_comparisons(reused, source=str(cfg.labels_from))
                    self.absorb(reused)
                    self.asked = min(cfg.labels, len(reused))
                    log.info("reusing %d labels from %s (%d usable)", len(reused), cfg.labels_from,
                             len(self.dataset))

                # 1. The random policy: its clips get the first share of the labels.
                n0 = initial_labels(cfg)
                n_random = cfg.random_steps or 4 * cfg.segment_length * max(n0, 1)
                self.collect_random(n_random)
                random_returns, _ = self.pool.drain_episode_stats()
                if self.atari:
                    random_returns = self._random_games[0]
                if self.asked < n0:
                    # No reward model yet, so nothing to disagree about: random pairs.
                    self.ask(channel, n0 - self.asked, RandomSelector())
                self.absorb(channel.answers())
                if isinstance(channel, AsyncChannel):
                    # A reward model fitted on nothing would send the policy anywhere: wait for people.
                    deadline = time.monotonic() + cfg.initial_wait_s
                    while self.answered < min(n0, self.asked) and time.monotonic() < deadline:
                        time.sleep(0.5)
                        self.absorb(channel.answers())
                metrics = self.fit(cfg.rm_initial_epochs)
                if random_returns:
                    metrics["prefs/random_policy_return"] = float(np.mean(random_returns))
                self._log(logger, 0, metrics, channel)
                self.save_checkpoint(store, channel)
            else:
                self._restore(resume, store, channel)
                self._resume_state = None
                channel.start()

            # 2. Policy training interleaved with labelling and fitting.
            if self.policy is None:
                self.policy = self._build_policy()
            policy_dir = run_dir / "policy"
            # One vector env for the whole run, owned here: the trainer then continues its
            # episodes across learn() calls, so the pool's open episodes stay contiguous.
            if self._vec_env is None:
                self._vec_env = self._make_vec_env()
            vec_env = self._vec_env
            while self.policy.global_step < cfg.steps:
                chunk = min(cfg.chunk_steps, cfg.steps - self.policy.global_step)
                t0 = time.perf_counter()
                self.policy.learn(vec_env, chunk, run_dir=policy_dir, progress=cfg.progress)
                policy_s = time.perf_counter() - t0
                step = self.policy.global_step
                want = labels_wanted(step, cfg) - self.asked
                if want > 0:
                    self.ask(channel, want, self.selector)
                self.absorb(channel.answers())
                metrics = self.fit(cfg.rm_epochs)
                returns, lengths = self.pool.drain_episode_stats()
                if self.atari:
                    returns, lengths = self._game_scores(vec_env)
                if returns:
                    metrics["charts/episodic_return"] = float(np.mean(returns))
                    metrics["charts/episodic_length"] = float(np.mean(lengths))
                metrics["charts/SPS"] = chunk / max(policy_s, 1e-9)
                self._log(logger, step, metrics, channel)
                self.save_checkpoint(store, channel)
            self.absorb(channel.close(cfg.label_wait_s))
        except BaseException:
            channel.close(0.0)
            raise
        finally:
            logger.close()
            torch.set_num_threads(prev_threads)
            if self._vec_env is not None:
                self._vec_env.close()
                self._vec_env = None

        self.model.save(run_dir / "reward_model.pt")
        eval_returns = self.evaluate(cfg.eval_episodes) if cfg.eval_episodes else []
        summary = {
            "env": cfg.env, "algo": cfg.algo, "seed": cfg.seed, "policy_steps": self.policy.global_step,
            "random_steps": self.random_steps, "labels_asked": self.asked, "answers": self.answered,
            "labels_used": len(self.dataset), "dropped_clips": channel.dropped,
            "eval_true_return_mean": float(np.mean(eval_returns)) if eval_returns else None,
            "eval_true_returns": eval_returns, "wall_time_s": time.perf_counter() - start,
            "run_dir": str(run_dir),
        }
        atomic_write_json(run_dir / "summary.json", summary)
        log.info("prefs %s: %d policy steps, %d labels, eval true return %s", cfg.env, summary["policy_steps"],
                 summary["labels_used"], summary["eval_true_return_mean"])
        return summary

    @staticmethod
    def _game_scores(vec_env: Any) -> tuple[list[float], list[int]]:
        """Unclipped scores and lengths of the Atari games finished in ``vec_env`` since the last call."""
        returns: list[float] = []
        lengths: list[int] = []
        for scores, steps in vec_env.call("pop_game_scores"):
            returns.extend(scores)
            lengths.extend(steps)
        return returns, lengths

    def _log(self, logger: Any, step: int, metrics: dict[str, Any], channel: Any) -> None:
        metrics.update({
            "prefs/labels": len(self.dataset),
            "prefs/labels_asked": self.asked,
            "prefs/answers": self.answered,
            "prefs/pending": channel.outstanding(),
            "prefs/dropped_clips": channel.dropped,
            "prefs/random_steps": self.random_steps,
        })
        logger.log(step, metrics)
        log.info("step %d: %d labels, val acc %s, corr %s, true return %s", step, len(self.dataset),
                 _fmt(metrics.get("prefs/rm_val_accuracy")), _fmt(metrics.get("prefs/reward_correlation")),
                 _fmt(metrics.get("charts/episodic_return")))


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def train_preferences(cfg: PreferenceConfig, **parts: Any) -> dict[str, Any]:
    """Build a :class:`PreferenceTrainer` from ``cfg`` (``parts`` override its components) and train."""
    return PreferenceTrainer(cfg, **parts).train()


def resume_preferences(run_dir: str | Path, steps: int | None = None, **parts: Any) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its last checkpoint to ``steps`` (default: its own).

    ``parts`` (``labeller``, ``selector``) override the components, as in :func:`train_preferences`.
    See :meth:`PreferenceTrainer.resume`.
    """
    return PreferenceTrainer.resume(run_dir, steps=steps, **parts).train()
