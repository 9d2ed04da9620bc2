"""Checkpoint and resume of a preference run.

After the random-policy labels (step 0) and after every round, the trainer rewrites one file,
``prefs_state.pt``, atomically (a crash leaves the previous checkpoint or the new one):

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
resumed run rebuilds its dataset from them (:meth:`TrainerCheckpoint._restore`). With the
synthetic oracle and picklable environments, a run resumed from a round's end is bit-for-bit the
uninterrupted run (``tests/preferences/test_prefs_resume.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Self

import numpy as np

from palate.config import config_from_dict
from palate.errors import CheckpointError, ConfigError, PreferenceError
from palate.preferences.config import PreferenceConfig, algo_classes

log = logging.getLogger(__name__)

#: The loop's checkpoint in the run directory, rewritten after every round.
CHECKPOINT_FILE = "prefs_state.pt"
CHECKPOINT_FORMAT = "palate.prefs/1"
#: config.yaml keys only a preference run has (tells it from a `palate rl` run).
_PREFS_KEYS = frozenset({"labels", "segment_length", "labeller"})


class TrainerCheckpoint:
    """:meth:`save_checkpoint`, :meth:`resume` and :meth:`_restore` of :class:`~palate.preferences.trainer.PreferenceTrainer`."""

    # Parts of the trainer the checkpoint saves and puts back (set in PreferenceTrainer.__init__).
    cfg: PreferenceConfig
    run_dir: Path
    rng: np.random.Generator
    policy: Any
    _vec_env: Any
    _resume_state: dict[str, Any] | None

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
               selector: Any | None = None) -> Self:
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
        Queries still waiting for a human (asked before the checkpoint or after it) are adopted
        where the labeller can (:meth:`_adopt_open_queries`): they stay asked, and their answers,
        those given while the run was down included, are recorded as they come. The others
        (a labeller without ``adopt``, a task cancelled unanswered) are dropped and leave the
        budget free for new queries.
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
        waiting = self._adopt_open_queries(recorded, store, channel)
        # Queries first saved after the checkpoint (in a newer shard) were asked after it, too.
        newer = int(labels["next_shard"])
        asked_since = {c.id for c in late if shard_number(c.shard) >= newer}
        asked_since |= {cid for cid, shard in waiting.items() if shard_number(shard) >= newer}
        dropped = set(labels["pending"]) - {c.id for c in late} - set(waiting)
        self.asked += len(asked_since) - len(dropped)
        if late:
            log.info("%d answers recorded after the checkpoint are kept", len(late))
        if waiting:
            log.info("%d queries still open in the labelling service are adopted", len(waiting))
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

    def _adopt_open_queries(self, recorded: list[Any], store: Any, channel: Any) -> dict[str, str]:
        """Hand the interrupted process's open queries to this one; returns ``{id: shard}`` of those waiting.

        Every comparison the run saved (``segments/``) is offered to the labeller's ``adopt``
        with the answers labels.jsonl already holds; the labeller says which still have a task
        that is open or answered, and the store takes their segments back from disk, so any
        answer to them (given while the run was down, or later) is recorded exactly once. The
        channel has not started yet, so nothing is collected before this is done.
        """
        adopt = getattr(channel.labeller, "adopt", None)
        if not callable(adopt):
            return {}
        from palate.preferences.storage import label_lines, load_query_segments, saved_comparison_ids

        seen = []
        for line in label_lines(self.run_dir):
            meta = line.get("answer_meta") or {}
            if "task_id" in meta:
                seen.append((int(meta["task_id"]), str(meta.get("labeller_id"))))
        alive = adopt(saved_comparison_ids(self.run_dir), seen)
        waiting = load_query_segments(self.run_dir, set(alive) - {c.id for c in recorded})
        store.adopt(waiting, recorded)
        return {cid: shard for cid, (_, shard) in waiting.items()}


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
