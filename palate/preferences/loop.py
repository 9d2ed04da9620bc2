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

Resuming. After the random-policy labels (step 0) and after every round, the loop rewrites one
file, ``prefs_state.pt``, atomically (a crash leaves the previous checkpoint or the new one):

    format, step, env, algo   "palate.prefs/1", the policy step, what the run is
    policy                    the palate.rl checkpoint dict of PPO/TRPO (weights, optimisers,
                              normalisation statistics, its RNG, the last observations); None at step 0
    counters                  asked, answered, random_steps, dropped_clips
    labels                    how many lines of labels.jsonl the reward model has absorbed, the
                              queries still waiting for an answer, the next segment shard number
    resume                    bytes, a pickle of: the reward ensemble's state_dict, the trajectory
                              pool (open episodes included), the loop's RNG, the global RNGs
                              (torch draws dropout masks from them), the selector's and the
                              labeller's state_dict (the oracle's RNG and return scale), and a
                              snapshot of the vector env (None where it cannot be pickled)

The labels themselves are not copied into it: labels.jsonl + segments/ are the record, and a
resumed run rebuilds its dataset from them (:meth:`PreferenceTrainer._restore`). With the
synthetic oracle and picklable environments, a run resumed from a round's end is bit-for-bit the
uninterrupted run (``tests/preferences/test_prefs_resume.py``).
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
from palate.errors import CheckpointError, ConfigError, PreferenceError

log = logging.getLogger(__name__)

#: MuJoCo locomotion tasks whose early termination can be switched off (fixed-length episodes).
_TERMINATING_MUJOCO = ("Hopper", "Walker2d", "Ant", "Humanoid", "HumanoidStandup", "InvertedPendulum",
                       "InvertedDoublePendulum")
#: The loop's checkpoint in the run directory, rewritten after every round.
CHECKPOINT_FILE = "prefs_state.pt"
CHECKPOINT_FORMAT = "palate.prefs/1"
#: config.yaml keys only a preference run has (tells it from a `palate rl` run).
_PREFS_KEYS = frozenset({"labels", "segment_length", "labeller"})
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
    reward_offset: float = doc_field(
        0.0, "added to the normalised r_hat the policy optimises; > 0 makes staying alive worth something when "
        "episodes can end early (zero-mean rewards make ending an episode free); "
        "python -m palate.bench.prefs_offset RUN says what it is worth in true-reward units")
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
        from palate.preferences.wrappers import FallPenaltyWrapper

        return FallPenaltyWrapper(env, penalty)


class IgnoreTermination:
    """Fixed-length episodes for an env that keeps running after it terminates (CartPole).

    CartPole pays +1 per step until the pole falls, then 0 while the physics carry on; its
    reward is constant while upright, so two clips of equal length would compare as equal. Run to
    the time limit instead, and a clip where the pole falls scores less, which is what a person
    comparing them sees. The wrapper lives in :mod:`palate.preferences.wrappers` (picklable, so
    a resumed run can continue its episodes) and is imported lazily to keep this module light.
    """

    def __new__(cls, env: Any) -> Any:
        from palate.preferences.wrappers import IgnoreTerminationWrapper

        return IgnoreTerminationWrapper(env)


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


def algo_classes(algo: str) -> tuple[Any, Any]:
    """The policy optimiser class and its config class for ``algo`` ("ppo" or "trpo")."""
    from palate import rl

    if algo == "trpo":
        if not hasattr(rl, "TRPO"):
            raise PreferenceError("algo 'trpo' needs palate.rl.TRPO, which this install lacks; use --algo ppo")
        return rl.TRPO, rl.TRPOConfig
    return rl.PPO, rl.PPOConfig


def policy_config(cfg: PreferenceConfig) -> Any:
    """The PPO/TRPO config the run's policy trains with: ``cfg.rl`` over the run's env, seed and steps.

    A module function, not only part of building the policy, so that a preset's ``rl`` block can be
    checked without making environments (tests/preferences/test_presets.py).
    """
    _, config_cls = algo_classes(cfg.algo)
    fields = {"env": cfg.env, "seed": cfg.seed, "torch_threads": cfg.torch_threads, **cfg.rl,
              "total_steps": cfg.steps}
    return config_from_dict(config_cls, fields, source="PreferenceConfig.rl")


def reward_model(cfg: PreferenceConfig, observation_space: Any, action_space: Any) -> Any:
    """The run's (untrained) r_hat ensemble, built from ``cfg``.

    A module function so that whatever loads a finished run's ``reward_model.pt`` builds the same
    architecture (palate.bench.prefs_offset).
    """
    from palate.preferences.reward_model import RewardEnsemble

    return RewardEnsemble(
        observation_space, action_space, n_members=cfg.ensemble_size,
        hidden_sizes=cfg.rm_hidden_sizes, dropout=cfg.rm_dropout, lr=cfg.rm_lr,
        batch_size=cfg.rm_batch_size, l2_coef=cfg.rm_l2_coef, error_rate=cfg.error_rate, seed=cfg.seed,
    )


class PreferenceTrainer:
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
        labeller = self._labeller if self._labeller is not None else self._build_labeller()
        if self._resume_state is not None and hasattr(labeller, "skip_earlier"):
            from palate.preferences.storage import saved_comparison_ids

            # Tasks of the interrupted run may still be answered; this labeller never made them.
            labeller.skip_earlier(saved_comparison_ids(self.run_dir))
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
                self.save_checkpoint(store, channel)
            else:
                self._restore(resume, store, channel)
                self._resume_state = None

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

    # ------------------------------------------------------------------ checkpoint and resume
    def save_checkpoint(self, store: Any, channel: Any) -> Path:
        """Write ``prefs_state.pt``: everything the loop needs to continue from this point.

        Called at the end of every round (and once after the random-policy labels, at step 0).
        One file, written atomically, so a crash leaves the previous checkpoint or this one,
        never a mix. What it holds is in the module docstring; the labels themselves are not in
        it: they are in labels.jsonl, which the checkpoint counts (see :meth:`_restore`).
        """
        import pickle

        from palate.rl.envs import snapshot_envs
        from palate.runs import atomic_torch_save, rng_state

        step = self.policy.global_step if self.policy is not None else 0
        blob = pickle.dumps({
            "reward_model": self.model.state_dict(),
            "pool": self.pool.state_dict(),
            "rng": self.rng.bit_generator.state,
            "global_rng": rng_state(),  # dropout in the reward model draws from torch's global RNG
            "selector": _state_of(self.selector),
            "labeller": _state_of(channel.labeller),
            # None when the envs cannot be pickled: a resume then starts new episodes.
            "env_snapshot": snapshot_envs(self._vec_env) if self._vec_env is not None else None,
        })
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "env": self.cfg.env,
            "algo": self.cfg.algo,
            # The palate.rl checkpoint dict (weights, optimisers, normalisation, RNG, last obs).
            "policy": self.policy.state_dict() if self.policy is not None else None,
            "counters": {"asked": self.asked, "answered": self.answered, "random_steps": self.random_steps,
                         "dropped_clips": channel.dropped},
            # The first `absorbed` lines of labels.jsonl are the reward model's dataset.
            "labels": {"absorbed": self.answered, "pending": store.pending_ids, "next_shard": store.next_shard},
            "resume": blob,
        }
        path = self.run_dir / CHECKPOINT_FILE
        atomic_torch_save(state, path)
        return path

    @classmethod
    def resume(cls, run_dir: str | Path, *, steps: int | None = None, labeller: Any | None = None,
               selector: Any | None = None) -> PreferenceTrainer:
        """A trainer that continues the run in ``run_dir`` from its last round when ``train()`` is called.

        Reads ``run_dir/config.yaml`` and ``run_dir/prefs_state.pt`` and writes nothing (``train``
        does). ``steps`` raises the run's policy-step target (``PreferenceConfig.steps``); the
        labelling schedule then spreads the rest of the budget up to the new last step.
        Injected ``labeller``/``selector`` replace the ones the config would build, as in
        :class:`PreferenceTrainer`.

        Raises:
            CheckpointError: no config.yaml, or no readable checkpoint (the run stopped before
                its first round ended: start it again).
            PreferenceError: the directory holds a run of another kind.
            ConfigError: ``steps`` is not above the checkpoint's step, or the run is finished.
        """
        from palate.runs import read_run_config

        run_dir = Path(run_dir)
        data = read_run_config(run_dir)
        if not _PREFS_KEYS <= set(data):
            raise PreferenceError(
                f"{run_dir} holds no preference-learning run (its config.yaml lacks "
                f"{sorted(_PREFS_KEYS - set(data))}); resume control runs with `palate rl resume {run_dir}`")
        cfg = config_from_dict(PreferenceConfig, data, source=str(run_dir / "config.yaml"))
        state = load_checkpoint(run_dir)
        if state["env"] != cfg.env or state["algo"] != cfg.algo:
            raise CheckpointError(
                f"{run_dir / CHECKPOINT_FILE} is a {state['algo']} run on {state['env']} but config.yaml says "
                f"{cfg.algo} on {cfg.env}; restore the run's own config.yaml")
        if steps is not None:
            if steps <= state["step"]:
                raise ConfigError(f"{run_dir} is already at policy step {state['step']}; pass --steps above it")
            cfg.steps = int(steps)
        elif state["step"] >= cfg.steps and (run_dir / "summary.json").is_file():
            raise ConfigError(f"{run_dir} finished at policy step {state['step']}; pass --steps above it to go on")
        trainer = cls(cfg, labeller=labeller, selector=selector, run_dir=run_dir)
        trainer._resume_state = state
        return trainer

    def _restore(self, state: dict[str, Any], store: Any, channel: Any) -> None:
        """Put every part back as :meth:`save_checkpoint` found it; rebuild the dataset from labels.jsonl.

        Answers recorded after the checkpoint (a human's late answers, or a round cut short by
        a crash) are in labels.jsonl too: they are kept and learned from, never asked again.
        Queries still waiting for a human at the checkpoint and unanswered since are dropped:
        they leave the budget free for new ones.
        """
        import pickle

        from palate.preferences.storage import load_labels, shard_number
        from palate.rl.envs import restore_envs
        from palate.runs import set_rng_state

        path = self.run_dir / CHECKPOINT_FILE
        blob = pickle.loads(state["resume"])  # trusted: the run's own file
        self.model.load_state_dict(blob["reward_model"])
        self.pool.load_state_dict(blob["pool"])
        self.rng.bit_generator.state = blob["rng"]
        _load_state(self.selector, blob["selector"])
        _load_state(channel.labeller, blob["labeller"])
        counters = state["counters"]
        self.asked, self.random_steps = int(counters["asked"]), int(counters["random_steps"])
        channel.dropped = int(counters["dropped_clips"])

        labels = state["labels"]
        recorded = load_labels(self.run_dir, obs_shape=tuple(self.observation_space.shape), include_cant_tell=True) \
            if (self.run_dir / "labels.jsonl").is_file() else []
        absorbed = int(labels["absorbed"])
        if len(recorded) < absorbed:
            raise CheckpointError(
                f"{self.run_dir / 'labels.jsonl'} holds {len(recorded)} answers but {path} was written after "
                f"{absorbed}; the labels were edited or lost: restore them, or start the run again")
        self.answered = 0
        self.absorb(recorded)
        late = recorded[absorbed:]
        # Queries first saved after the checkpoint (in a newer shard) were asked after it, too.
        asked_since = {c.id for c in late if shard_number(c.shard) >= int(labels["next_shard"])}
        dropped = set(labels["pending"]) - {c.id for c in late}
        self.asked += len(asked_since) - len(dropped)
        if late:
            log.info("%d answers recorded after the checkpoint are kept", len(late))
        if dropped:
            log.info("%d queries unanswered when the run stopped are dropped (no longer counted as asked)",
                     len(dropped))

        if state["policy"] is not None:
            algo_cls, _ = algo_classes(self.cfg.algo)
            self.policy = algo_cls.from_state_dict(state["policy"], source=str(path), reward_fn=self._policy_reward,
                                                   rollout_callback=self.pool.add_rollout)
            self.policy.config.total_steps = self.cfg.steps
            snapshot = blob["env_snapshot"]
            if snapshot is not None and self.policy.config.vec_env == "sync":
                self._vec_env = self._make_vec_env(restore_envs(snapshot))
                self.policy.attach_envs(self._vec_env)  # the episodes in progress go on
            else:
                # As `palate rl resume` does: new episodes, seeded by the step. The pool's running
                # episodes end here, so no segment spans the seam.
                self._vec_env = self._make_vec_env()
                self.pool.close_open_episodes()
                log.info("the environments could not be restored: new episodes start at step %d", state["step"])
        set_rng_state(blob["global_rng"])

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


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """Read ``run_dir/prefs_state.pt`` with errors that name the file and the fix.

    Only the outer dict is read here (``weights_only``: no arbitrary objects); its pickled
    ``resume`` part is opened by the resumed trainer.
    """
    import torch

    path = Path(run_dir) / CHECKPOINT_FILE
    again = f"start it again with `palate prefs train --config {Path(run_dir) / 'config.yaml'} --overwrite`"
    if not path.is_file():
        raise CheckpointError(f"no preference checkpoint at {path}: the run stopped before its first round "
                              f"ended, so there is nothing to resume; {again}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read the preference checkpoint {path} ({err}); {again}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a palate preference checkpoint (format {CHECKPOINT_FORMAT}); {again}")
    return state


def _state_of(part: Any) -> Any:
    """A part's ``state_dict()`` where it has one (the synthetic oracle's RNG, a custom selector's)."""
    get = getattr(part, "state_dict", None)
    return get() if callable(get) else None


def _load_state(part: Any, state: Any) -> None:
    if state is not None and callable(getattr(part, "load_state_dict", None)):
        part.load_state_dict(state)


def config_from_mapping(data: dict[str, Any]) -> PreferenceConfig:
    """A validated :class:`PreferenceConfig` from a plain mapping (YAML)."""
    return config_from_dict(PreferenceConfig, data, source="preference config")
