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

Human labellers answer asynchronously: a background thread submits queries from a bounded queue
and records answers as they come. When the queue is full the loop drops new clips (they were
never shown, nothing is lost); an answer, whenever it arrives, is written to labels.jsonl before
anything else happens to it, so labels are never dropped.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from palate.config import config_from_dict, config_to_dict, doc_field
from palate.errors import ConfigError, PreferenceError

log = logging.getLogger(__name__)

#: MuJoCo locomotion tasks whose early termination can be switched off (fixed-length episodes).
_TERMINATING_MUJOCO = ("Hopper", "Walker2d", "Ant", "Humanoid", "HumanoidStandup", "InvertedPendulum",
                       "InvertedDoublePendulum")
#: Environments that keep simulating, with zero reward, after they report termination; with
#: fixed-length episodes their termination is ignored until the time limit.
_CONTINUE_AFTER_TERMINATION = ("CartPole",)


@dataclass
class PreferenceConfig:
    """Deep RL from human preferences: the reward is learned from segment comparisons."""

    env: str = doc_field("Hopper-v5", "gymnasium environment id")
    algo: Literal["ppo", "trpo"] = doc_field("ppo", "policy optimiser for the learned reward")
    labels: int = doc_field(700, "label budget: comparisons asked over the whole run")
    steps: int = doc_field(1_000_000, "policy environment steps (the random-policy warm-up is extra)")
    segment_length: int = doc_field(25, "k, steps per clip (25 MuJoCo steps is about 1.5 s of play)")
    ensemble_size: int = doc_field(3, "reward predictors in the ensemble, each on a bootstrap sample")
    initial_label_fraction: float = doc_field(0.25, "share of the budget labelled on random-policy clips first")
    label_schedule_t0: float = doc_field(2e6, "T0 of the labelling rate 1/(1 + T/T0) (paper: 2e6 on MuJoCo)")
    error_rate: float = doc_field(0.1, "epsilon of the reward model's error model (answers at random)")
    labeller: Literal["synthetic", "human"] = doc_field("synthetic", "who answers the comparisons")
    temperature: float = doc_field(0.1, "synthetic oracle: Boltzmann temperature on normalised segment returns")
    oracle_error_rate: float = doc_field(0.1, "synthetic oracle: chance of a uniformly random answer")
    oracle_equal_margin: float = doc_field(
        0.0, "synthetic oracle: answer 'equal' when the normalised return gap is below this")
    selector: Literal["random", "disagreement"] = doc_field("disagreement", "query selection")
    oversample: int = doc_field(10, "disagreement selector: candidate pairs drawn per pair kept")
    random_steps: int = doc_field(0, "random-policy warm-up steps (0: 4 x segment_length x initial pairs)")
    chunk_steps: int = doc_field(10_000, "policy steps between labelling/fitting rounds (whole rollouts)")
    pool_steps: int = doc_field(100_000, "recent steps kept in the trajectory pool that clips are cut from")
    fixed_length_episodes: bool = doc_field(
        True, "switch off early termination where the env allows it, so episode ends leak no reward")
    fall_penalty: float = doc_field(
        10.0, "fixed-length MuJoCo episodes: reward subtracted per step spent fallen (replaces termination)")
    rm_hidden_sizes: list[int] = doc_field([64, 64], "hidden widths of each reward predictor")
    rm_dropout: float = doc_field(0.2, "dropout in the reward predictors")
    rm_lr: float = doc_field(1e-3, "reward-model Adam step size")
    rm_batch_size: int = doc_field(32, "comparisons per reward-model gradient step")
    rm_l2_coef: float = doc_field(1e-4, "initial L2 coefficient, adapted to keep val/train loss in 1.1-1.5")
    rm_epochs: int = doc_field(5, "reward-model epochs per round")
    rm_initial_epochs: int = doc_field(50, "reward-model epochs after the random-policy labels")
    rm_stats_steps: int = doc_field(10_000, "recent states used to normalise r_hat and measure its correlation")
    rl: dict[str, Any] = doc_field({}, "PPO/TRPO config fields (YAML mapping), e.g. {n_envs: 4, n_steps: 512}")
    labels_from: str | None = doc_field(None, "reuse the labels of an earlier run (run dir or labels.jsonl)")
    max_pending: int = doc_field(64, "async labelling: most clip pairs waiting for a human; more are dropped")
    label_wait_s: float = doc_field(0.0, "human labeller: seconds to wait for outstanding answers at the end")
    initial_wait_s: float = doc_field(
        3600.0, "human labeller: longest wait for the random-policy labels before the policy starts")
    feedback_url: str = doc_field("http://127.0.0.1:8000", "human labeller: the feedback service")
    feedback_token_env: str = doc_field("PALATE_FEEDBACK_TOKEN", "human labeller: env var holding the admin token")
    feedback_project: str | None = doc_field(None, "human labeller: feedback project (default: the run name)")
    eval_episodes: int = doc_field(5, "episodes of the final deterministic evaluation on the true reward")
    seed: int = doc_field(0, "seeds numpy, torch, environments, oracle and query sampling")
    run_name: str | None = doc_field(None, "run directory name under runs_dir (default: prefs-<env>-<algo>-<seed>)")
    runs_dir: str = doc_field("runs", "parent directory of run directories")
    overwrite: bool = doc_field(False, "replace an existing run directory of the same name")
    torch_threads: int = doc_field(1, "torch threads (1 is fastest for these small MLPs)")
    progress: bool = doc_field(True, "show a progress bar")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
        for name in ("labels", "steps", "segment_length", "ensemble_size", "oversample", "chunk_steps",
                     "pool_steps", "rm_batch_size", "rm_stats_steps", "max_pending"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field '{name}' must be > 0, got {getattr(self, name)}")
        for name in ("random_steps", "rm_epochs", "rm_initial_epochs", "eval_episodes", "label_wait_s",
                     "initial_wait_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config field '{name}' must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.initial_label_fraction <= 1.0:
            raise ConfigError(f"initial_label_fraction must be in [0, 1], got {self.initial_label_fraction}")
        if not 0.0 <= self.error_rate < 1.0 or not 0.0 <= self.oracle_error_rate <= 1.0:
            raise ConfigError("error_rate must be in [0, 1) and oracle_error_rate in [0, 1]")
        if self.label_schedule_t0 <= 0 or self.temperature < 0:
            raise ConfigError("label_schedule_t0 must be > 0 and temperature >= 0")

    @property
    def name(self) -> str:
        return self.run_name or f"prefs-{self.env}-{self.algo}-{self.seed}"


def labels_wanted(step: int, cfg: PreferenceConfig) -> int:
    """Labels the schedule wants answered by policy step ``step`` (see the module docstring)."""
    n0 = initial_labels(cfg)
    frac = math.log1p(step / cfg.label_schedule_t0) / math.log1p(cfg.steps / cfg.label_schedule_t0)
    return min(cfg.labels, n0 + int(round((cfg.labels - n0) * min(frac, 1.0))))


def initial_labels(cfg: PreferenceConfig) -> int:
    """Labels asked on random-policy clips before any policy training."""
    return int(round(cfg.initial_label_fraction * cfg.labels))


def make_env_factory(cfg: PreferenceConfig) -> Callable[[], Any]:
    """A zero-argument env factory; fixed-length episodes where the env supports it.

    MuJoCo locomotion tasks end an episode when the robot falls; that end tells the agent it did
    badly without any reward. Like the paper, palate makes such episodes fixed length and puts a
    penalty where the termination was: with ``fixed_length_episodes``, ``terminate_when_unhealthy``
    is off and every step spent unhealthy (fallen) costs ``fall_penalty``, so the true reward the
    oracle judges by still says that falling is bad. Without the penalty a robot lying on the
    ground and sliding forward scores well, and the policy learns exactly that. Other
    environments keep their natural episodes, and segments are cut within episodes (see
    :mod:`palate.preferences.segments`).
    """
    from palate.rl.envs import check_env_id

    check_env_id(cfg.env)
    kwargs: dict[str, Any] = {}
    family = cfg.env.split("-")[0]
    penalise = cfg.fixed_length_episodes and family in _TERMINATING_MUJOCO
    if penalise:
        kwargs["terminate_when_unhealthy"] = False
    ignore_termination = cfg.fixed_length_episodes and family in _CONTINUE_AFTER_TERMINATION

    def factory() -> Any:
        import gymnasium as gym

        env = gym.make(cfg.env, **kwargs)
        if ignore_termination:
            return IgnoreTermination(env)
        if penalise and cfg.fall_penalty and hasattr(env.unwrapped, "is_healthy"):
            return FallPenalty(env, cfg.fall_penalty)
        return env

    factory.__name__ = cfg.env
    factory.env_kwargs = kwargs  # type: ignore[attr-defined]
    return factory


class FallPenalty:
    """Subtract ``penalty`` from the reward of every step the robot is unhealthy (has fallen)."""

    def __new__(cls, env: Any, penalty: float) -> Any:
        import gymnasium as gym

        class _Penalty(gym.Wrapper):
            def step(self, action: Any) -> Any:
                obs, reward, terminated, truncated, info = self.env.step(action)
                if not self.env.unwrapped.is_healthy:
                    reward = float(reward) - penalty
                return obs, reward, terminated, truncated, info

        return _Penalty(env)


class IgnoreTermination:
    """Fixed-length episodes for an env that keeps running after it terminates (CartPole).

    CartPole pays +1 per step until the pole falls, then 0 while the physics carry on; its
    reward is constant while upright, so two clips of equal length would compare as equal. Run to
    the time limit instead, and a clip where the pole falls scores less, which is what a person
    comparing them sees. Built as a ``gymnasium.Wrapper`` subclass lazily to keep this module's
    import light.
    """

    def __new__(cls, env: Any) -> Any:
        import warnings

        import gymnasium as gym

        class _Ignore(gym.Wrapper):
            def step(self, action: Any) -> Any:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "step() called after terminated": intended
                    obs, reward, _terminated, truncated, info = self.env.step(action)
                return obs, reward, False, truncated, info

        return _Ignore(env)


# --------------------------------------------------------------------------- labelling channels


class _SyncChannel:
    """Labels on the spot (synthetic oracle): submit, then collect at once."""

    def __init__(self, labeller: Any, store: Any) -> None:
        self.labeller, self.store = labeller, store
        self.dropped = 0

    def offer(self, queries: list[Any]) -> int:
        self.store.save_queries(queries)
        self.labeller.submit(queries)
        return len(queries)

    def answers(self) -> list[Any]:
        return [self.store.record(a) for a in self.labeller.collect()]

    def outstanding(self) -> int:
        return self.store.pending

    def close(self, wait_s: float = 0.0) -> list[Any]:
        self.labeller.close()
        return []


class _AsyncChannel:
    """A background thread between the loop and a slow (human) labeller.

    ``offer`` puts queries in a bounded queue and drops those that do not fit; the thread
    submits queued queries and polls for answers, recording each one in the store at once.
    """

    def __init__(self, labeller: Any, store: Any, max_pending: int, poll_s: float = 1.0) -> None:
        self.labeller, self.store = labeller, store
        self.max_pending = max_pending
        self.poll_s = poll_s
        self.dropped = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._results: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="palate-labeller", daemon=True)
        self._thread.start()

    def offer(self, queries: list[Any]) -> int:
        self._raise()
        room = max(0, self.max_pending - self.store.pending)
        keep, drop = queries[:room], queries[room:]
        if drop:
            self.dropped += len(drop)
            log.info("labeller busy (%d pending): dropped %d clip pairs", self.store.pending, len(drop))
        if keep:
            # Segments on disk before the labeller sees the query: any answer can be recorded.
            self.store.save_queries(keep)
            self._queue.put(keep)
        return len(keep)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batch = self._queue.get(timeout=0.05)
                    self.labeller.submit(batch)
                except queue.Empty:
                    pass
                got = self.labeller.collect(timeout=0.0)
                recorded = [self.store.record(a) for a in got]
                if recorded:
                    with self._lock:
                        self._results.extend(recorded)
                elif self._queue.empty():
                    self._stop.wait(self.poll_s)
        except BaseException as err:  # surfaced in the training thread
            self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def answers(self) -> list[Any]:
        self._raise()
        with self._lock:
            out, self._results = self._results, []
        return out

    def outstanding(self) -> int:
        return self.store.pending

    def close(self, wait_s: float = 0.0) -> list[Any]:
        deadline = time.monotonic() + wait_s
        while self.store.pending and time.monotonic() < deadline and self._error is None:
            time.sleep(min(self.poll_s, 0.2))
        self._stop.set()
        self._thread.join(timeout=30)
        self.labeller.close()
        out = self.answers()
        return out


# --------------------------------------------------------------------------- the trainer


class PreferenceTrainer:
    """Owns the parts (pool, ensemble, selector, labeller, store) and runs the loop.

    Every part may be injected (tests pass a fake labeller; a custom selector plugs in here);
    anything left None is built from the config.
    """

    def __init__(self, cfg: PreferenceConfig, *, labeller: Any | None = None, selector: Any | None = None,
                 run_dir: str | Path | None = None) -> None:
        import gymnasium as gym

        from palate.preferences.reward_model import PreferenceDataset, RewardEnsemble
        from palate.preferences.segments import TrajectoryPool
        from palate.preferences.selection import make_selector

        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg.runs_dir) / cfg.name
        self.env_factory = make_env_factory(cfg)
        probe = self.env_factory()
        try:
            self.observation_space, self.action_space = probe.observation_space, probe.action_space
            self._env_spec = probe.spec
        finally:
            probe.close()
        if not isinstance(self.observation_space, gym.spaces.Box):
            raise PreferenceError(f"{cfg.env}: preference learning needs Box observations, got {self.observation_space}")
        self.rng = np.random.default_rng(cfg.seed)
        self.pool = TrajectoryPool(max_steps=cfg.pool_steps)
        self.model = RewardEnsemble(
            self.observation_space, self.action_space, n_members=cfg.ensemble_size,
            hidden_sizes=cfg.rm_hidden_sizes, dropout=cfg.rm_dropout, lr=cfg.rm_lr,
            batch_size=cfg.rm_batch_size, l2_coef=cfg.rm_l2_coef, error_rate=cfg.error_rate, seed=cfg.seed,
        )
        self.dataset = PreferenceDataset()
        self.selector = selector if selector is not None else make_selector(cfg.selector, cfg.oversample)
        self._labeller = labeller
        self.asked = 0  # comparisons sent to the labeller (the budget counts these)
        self.answered = 0  # answers recorded, "can't tell" included
        self.policy: Any = None
        self._vec_env: Any = None
        self.random_steps = 0

    # ------------------------------------------------------------------ parts
    def _build_labeller(self) -> Any:
        from palate.preferences.labellers import SyntheticOracle

        cfg = self.cfg
        if cfg.labeller == "synthetic":
            return SyntheticOracle(cfg.temperature, cfg.oracle_error_rate, np.random.default_rng(cfg.seed + 1),
                                   equal_margin=cfg.oracle_equal_margin)
        import os

        from palate.feedback.client import FeedbackClient
        from palate.preferences.labellers import HumanLabeller
        from palate.preferences.render import SegmentRenderer

        token = os.environ.get(cfg.feedback_token_env)
        if not token:
            raise PreferenceError(
                f"the human labeller needs the feedback service's admin token in ${cfg.feedback_token_env}; "
                "create one with `palate feedback create-token --db DB --name trainer --role admin --all-projects` "
                "and export it"
            )
        client = FeedbackClient(cfg.feedback_url, token)
        return HumanLabeller(client, SegmentRenderer(cfg.env, self.env_factory), project=cfg.feedback_project or cfg.name)

    def _build_policy(self) -> Any:
        from palate import rl

        cfg = self.cfg
        if cfg.algo == "trpo":
            if not hasattr(rl, "TRPO"):
                raise PreferenceError("algo 'trpo' needs palate.rl.TRPO, which this install lacks; use --algo ppo")
            algo_cls, config_cls = rl.TRPO, rl.TRPOConfig
        else:
            algo_cls, config_cls = rl.PPO, rl.PPOConfig
        fields = {"env": cfg.env, "seed": cfg.seed, "torch_threads": cfg.torch_threads, **cfg.rl,
                  "total_steps": cfg.steps}
        rl_cfg = config_from_dict(config_cls, fields, source="PreferenceConfig.rl")
        return algo_cls(rl_cfg, reward_fn=self.model.predict, rollout_callback=self.pool.add_rollout)

    def _channel(self, store: Any) -> Any:
        labeller = self._labeller if self._labeller is not None else self._build_labeller()
        if getattr(labeller, "asynchronous", False):
            return _AsyncChannel(labeller, store, self.cfg.max_pending)
        return _SyncChannel(labeller, store)

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
            if buf["obs"]:
                self.pool.add_trajectory(np.asarray(buf["obs"]), np.asarray(buf["actions"]),
                                         np.asarray(buf["rewards"]), finished=False)
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
        pairs = selector.select(lambda k: self.pool.sample_pairs(k, self.cfg.segment_length, self.rng), n, scorer)
        sent = channel.offer([Query.new(p) for p in pairs])
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
        """Run the whole loop; returns (and writes) the run summary."""
        import torch

        from palate.preferences.selection import RandomSelector
        from palate.preferences.storage import LabelStore, load_labels
        from palate.runs import MetricsLogger, atomic_write_json, prepare_run_dir, seed_everything

        cfg = self.cfg
        start = time.perf_counter()
        seed_everything(cfg.seed)
        # Read reused labels first: a bad --labels-from fails before anything is written.
        reused = load_labels(cfg.labels_from, obs_shape=tuple(self.observation_space.shape),
                             include_cant_tell=True) if cfg.labels_from else []
        run_dir = prepare_run_dir(self.run_dir, config_to_dict(cfg), overwrite=cfg.overwrite)
        if cfg.overwrite:
            for stale in (run_dir / "labels.jsonl", *run_dir.glob("segments/*.npz")):
                stale.unlink(missing_ok=True)
        store = LabelStore(run_dir, meta={"env": cfg.env, "run": cfg.name})
        logger = MetricsLogger(run_dir)
        channel = self._channel(store)
        prev_threads = torch.get_num_threads()
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        try:
            if reused:
                store.import_comparisons(reused, source=str(cfg.labels_from))
                self.absorb(reused)
                self.asked = min(cfg.labels, len(reused))
                log.info("reusing %d labels from %s (%d usable)", len(reused), cfg.labels_from, len(self.dataset))

            # 1. The random policy: its clips get the first share of the labels.
            n0 = initial_labels(cfg)
            n_random = cfg.random_steps or 4 * cfg.segment_length * max(n0, 1)
            self.collect_random(n_random)
            random_returns, _ = self.pool.drain_episode_stats()
            if self.asked < n0:
                # No reward model yet, so nothing to disagree about: random pairs.
                self.ask(channel, n0 - self.asked, RandomSelector())
            self.absorb(channel.answers())
            if isinstance(channel, _AsyncChannel):
                # A reward model fitted on nothing would send the policy anywhere: wait for people.
                deadline = time.monotonic() + cfg.initial_wait_s
                while self.answered < min(n0, self.asked) and time.monotonic() < deadline:
                    time.sleep(0.5)
                    self.absorb(channel.answers())
            metrics = self.fit(cfg.rm_initial_epochs)
            if random_returns:
                metrics["prefs/random_policy_return"] = float(np.mean(random_returns))
            self._log(logger, 0, metrics, channel)

            # 2. Policy training interleaved with labelling and fitting.
            self.policy = self._build_policy()
            policy_dir = run_dir / "policy"
            # One vector env for the whole run, owned here: the trainer then continues its
            # episodes across learn() calls, so the pool's open episodes stay contiguous.
            from palate.rl.envs import make_vec_env

            vec_env, _ = make_vec_env(self.env_factory, self.policy.config.n_envs, self.policy.config.vec_env)
            vec_env.spec = self._env_spec  # so checkpoints name the env id, not "SyncVectorEnv"
            self._vec_env = vec_env
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
                if returns:
                    metrics["charts/episodic_return"] = float(np.mean(returns))
                    metrics["charts/episodic_length"] = float(np.mean(lengths))
                metrics["charts/SPS"] = chunk / max(policy_s, 1e-9)
                self._log(logger, step, metrics, channel)
            self.absorb(channel.close(cfg.label_wait_s))
        except BaseException:
            channel.close(0.0)
            raise
        finally:
            logger.close()
            torch.set_num_threads(prev_threads)
            if self._vec_env is not None:
                self._vec_env.close()

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


def config_from_mapping(data: dict[str, Any]) -> PreferenceConfig:
    """A validated :class:`PreferenceConfig` from a plain mapping (YAML)."""
    return config_from_dict(PreferenceConfig, data, source="preference config")
