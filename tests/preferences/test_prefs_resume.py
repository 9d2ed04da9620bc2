"""Resuming a preference run: `palate prefs resume` continues where a crash or Ctrl-C stopped it."""

import json
import random

import numpy as np
import pytest
import torch

from palate.cli import main
from palate.errors import CheckpointError, PreferenceError
from palate.preferences.checkpoint import CHECKPOINT_FILE
from palate.preferences.config import PreferenceConfig
from palate.preferences.labellers import HumanLabeller
from palate.preferences.segments import TrajectoryPool
from palate.preferences.storage import load_labels
from palate.preferences.trainer import PreferenceTrainer, resume_preferences


def _cfg(tmp_path, name, **kw):
    # temperature 1 and error rate 0.5: the oracle's answers hang on its RNG, so a resume that
    # lost the RNG (or its return scale) would give other labels, not the same ones by luck.
    base = dict(env="Pendulum-v1", labels=40, steps=1024, chunk_steps=256, segment_length=10, random_steps=600,
                rm_epochs=1, rm_initial_epochs=2, temperature=1.0, oracle_error_rate=0.5, eval_episodes=0,
                progress=False, runs_dir=str(tmp_path), run_name=name,
                rl={"n_envs": 2, "n_steps": 64, "batch_size": 64, "n_epochs": 2})
    base.update(kw)
    return PreferenceConfig(**base)


class CrashInRollout(PreferenceTrainer):
    """Raises KeyboardInterrupt inside PPO's ``crash_at``-th rollout: mid-round, after a checkpoint."""

    crash_at = 6  # two rollouts per round: the second rollout of the third round

    def _build_policy(self):
        policy = super()._build_policy()
        feed, seen = policy.rollout_callback, [0]

        def callback(batch):
            feed(batch)
            seen[0] += 1
            if seen[0] == self.crash_at:
                raise KeyboardInterrupt

        policy.rollout_callback = callback
        return policy


class CrashBeforeCheckpoint(PreferenceTrainer):
    """Raises at the ``crash_at``-th checkpoint, before writing it: the round's labels and metrics are out."""

    crash_at = 4  # rounds end at steps 0, 256, 512, 768: crash after labelling at 768

    def save_checkpoint(self, store, channel):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt
        return super().save_checkpoint(store, channel)


def _scramble_global_rngs():
    """A resume runs in a new process: the global RNGs hold anything."""
    torch.manual_seed(12345)
    np.random.seed(54321)
    random.seed(99)


def _label_lines(run_dir):
    return [json.loads(x) for x in (run_dir / "labels.jsonl").read_text().splitlines()]


def _metrics(path, drop=("time", "charts/SPS")):
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in path.read_text().splitlines()]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """Crash mid-round, resume: bit-for-bit the run that never stopped.

    Compared exactly: the policy's and the reward ensemble's parameters, optimiser and
    normalisation states, every label and its segments, metrics.jsonl of the loop and of PPO
    (but wall-clock fields). labels.jsonl differs only in ``id`` and ``time``: comparison ids
    are uuid4, unique across runs by design so that labels from several runs can be pooled, and
    ``time`` is the wall clock.
    """
    full = PreferenceTrainer(_cfg(tmp_path, "full"))
    full_summary = full.train()

    with pytest.raises(KeyboardInterrupt):
        CrashInRollout(_cfg(tmp_path, "cut")).train()
    cut = tmp_path / "cut"
    before = (cut / "labels.jsonl").read_bytes()
    assert not (cut / "summary.json").exists()
    assert max(m["step"] for m in _metrics(cut / "policy" / "metrics.jsonl")) > 512  # past the checkpoint

    _scramble_global_rngs()
    resumed = PreferenceTrainer.resume(cut)
    summary = resumed.train()

    # The labels written before the crash are kept byte for byte; the rest follow them.
    after = (cut / "labels.jsonl").read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    lines_full, lines_cut = _label_lines(tmp_path / "full"), _label_lines(cut)
    strip = ("id", "time", "run")
    assert [{k: v for k, v in x.items() if k not in strip} for x in lines_cut] == \
        [{k: v for k, v in x.items() if k not in strip} for x in lines_full]
    assert len({x["id"] for x in lines_cut}) == len(lines_cut) == 40
    for a, b in zip(load_labels(tmp_path / "full"), load_labels(cut)):
        for side in ("left", "right"):
            sa, sb = getattr(a.pair, side), getattr(b.pair, side)
            assert np.array_equal(sa.obs, sb.obs) and np.array_equal(sa.actions, sb.actions)

    for key in ("policy", "optimizers", "obs_norm", "reward_norm", "global_step", "iteration"):
        assert repr(resumed.policy.state_dict()[key]) == repr(full.policy.state_dict()[key]), key
    ours, theirs = resumed.model.state_dict(), full.model.state_dict()
    assert repr(ours) == repr(theirs)  # members, optimisers, L2 coefficients, output stats, n_fits, RNG
    for m_ours, m_theirs in zip(ours["members"], theirs["members"]):
        assert all(torch.equal(m_ours[k], m_theirs[k]) for k in m_ours)

    assert _metrics(cut / "metrics.jsonl") == _metrics(tmp_path / "full" / "metrics.jsonl")
    assert _metrics(cut / "policy" / "metrics.jsonl") == _metrics(tmp_path / "full" / "policy" / "metrics.jsonl")
    same = ("policy_steps", "random_steps", "labels_asked", "answers", "labels_used", "dropped_clips")
    assert {k: summary[k] for k in same} == {k: full_summary[k] for k in same}


def test_crash_after_labelling_keeps_those_labels_and_asks_no_more(tmp_path):
    """Labels recorded after the last checkpoint are learned from, not asked again, not rewritten.

    The run cannot be bit-for-bit the uninterrupted one here: it stopped after its oracle and
    selector drew the round's queries, and the checkpoint it resumes from holds their RNGs from
    before those draws. What must hold is what the labeller sees: no label lost, none repeated.
    """
    with pytest.raises(KeyboardInterrupt):
        CrashBeforeCheckpoint(_cfg(tmp_path, "cut")).train()
    run = tmp_path / "cut"
    assert max(m["step"] for m in _metrics(run / "metrics.jsonl")) == 768  # logged, then the crash
    with open(run / "labels.jsonl", "a") as fh:
        fh.write('{"id": "torn-by-the-cr')  # a crash in the middle of an append
    before = _label_lines_tolerant(run)

    summary = resume_preferences(run)

    lines = _label_lines(run)
    assert lines[:len(before)] == before
    assert len(lines) == len({x["id"] for x in lines}) == 40 == summary["labels_asked"] == summary["labels_used"]
    steps = [m["step"] for m in _metrics(run / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 1024


def _label_lines_tolerant(run_dir):
    return [json.loads(x) for x in (run_dir / "labels.jsonl").read_text().splitlines() if x.endswith("}")]


def _files(run_dir):
    return {p.relative_to(run_dir): (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}


def test_resume_without_checkpoint_is_one_clear_error_and_writes_nothing(tmp_path, capsys):
    class CrashInWarmUp(PreferenceTrainer):
        def save_checkpoint(self, store, channel):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        CrashInWarmUp(_cfg(tmp_path, "early")).train()
    run = tmp_path / "early"
    files = _files(run)
    assert not (run / CHECKPOINT_FILE).exists() and (run / "labels.jsonl").is_file()

    with pytest.raises(CheckpointError, match=f"no preference checkpoint at {run / CHECKPOINT_FILE}.*--overwrite"):
        resume_preferences(run)
    assert main(["prefs", "resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no preference checkpoint" in err and err.count("\n") == 1
    assert _files(run) == files

    (run / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read the preference checkpoint"):
        PreferenceTrainer.resume(run)
    (run / "config.yaml").write_text("algo: ppo\nenv: CartPole-v1\ntotal_steps: 1000\n")
    with pytest.raises(PreferenceError, match="no preference-learning run.*palate rl resume"):
        PreferenceTrainer.resume(run)
    with pytest.raises(CheckpointError, match="not a palate run directory"):
        PreferenceTrainer.resume(tmp_path / "nowhere")


def test_cli_resume_goes_on_to_more_steps(tmp_path, capsys):
    PreferenceTrainer(_cfg(tmp_path, "done", steps=512, labels=12)).train()
    run = tmp_path / "done"
    assert main(["prefs", "resume", str(run)]) == 2
    assert "finished at policy step 512; pass --steps above it" in capsys.readouterr().err
    assert main(["prefs", "resume", str(run), "--steps", "1e3", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["policy_steps"] == 1024 and summary["labels_asked"] == 12
    assert "steps: 1000" in (run / "config.yaml").read_text()
    assert len(_label_lines(run)) == 12


class SilentHuman:
    """An asynchronous labeller nobody answers, which cannot adopt a previous process's queries."""

    name, asynchronous = "silent", True

    def submit(self, queries):
        pass

    def collect(self, timeout=0.0):
        return []

    def close(self):
        pass


def test_resume_drops_open_queries_a_labeller_cannot_adopt(tmp_path):
    """A labeller without ``adopt`` (the human one has it: test_prefs_resume_human.py) loses its open queries."""
    class CrashInSecondRound(CrashInRollout):
        crash_at = 3

    cfg = _cfg(tmp_path, "human", initial_wait_s=0.0, steps=512)
    with pytest.raises(KeyboardInterrupt):
        CrashInSecondRound(cfg, labeller=SilentHuman()).train()
    run = tmp_path / "human"
    old = _saved_ids(run)
    assert 0 < len(old) < 40
    summary = PreferenceTrainer.resume(run, labeller=SilentHuman()).train()
    # The old queries no longer count as asked: the whole budget went to new ones.
    assert summary["labels_asked"] == 40 and summary["answers"] == 0
    assert len(_saved_ids(run) - old) == 40


def _saved_ids(run_dir):
    ids = set()
    for shard in (run_dir / "segments").glob("*.npz"):
        with np.load(shard) as npz:
            ids |= {k.split("/")[0] for k in npz.files}
    return ids


def test_human_labeller_adopts_a_previous_process_tasks_and_skips_what_labels_hold():
    class Client:
        def ensure_project(self, name, description=""):
            pass

        def find_tasks(self, project, ids):
            return {"old": {"id": 7, "status": "open", "n_answers": 1, "redundancy": 2},
                    "gone": {"id": 8, "status": "cancelled", "n_answers": 0, "redundancy": 1}}

        def answers_since(self, project, cursor=0, limit=500):
            every = [{"id": 1, "task_id": 3, "external_id": "earlier-run", "labeller": "bob", "answer": {"choice": "left"}},
                     {"id": 2, "task_id": 7, "external_id": "old", "labeller": "bob", "answer": {"choice": "left"}},
                     {"id": 3, "task_id": 7, "external_id": "old", "labeller": "eve", "answer": {"choice": "right"}},
                     {"id": 4, "task_id": 9, "external_id": "foreign", "labeller": "eve", "answer": {"choice": "left"}}]
            limit_id = 3 if not hasattr(self, "later") else 4
            got = [a for a in every if cursor < a["id"] <= limit_id]
            return got, max([cursor] + [a["id"] for a in got])

    client = Client()
    labeller = HumanLabeller(client, render=lambda seg: b"", project="p")
    # Bob's answer to "old" is in labels.jsonl already; "gone" was cancelled unanswered.
    assert labeller.adopt({"old", "gone", "never-created"}, recorded=[(7, "bob")]) == {"old": 1}
    got = labeller.collect()
    assert [(a.id, a.label, a.meta["labeller_id"], a.meta["answer_id"]) for a in got] == [("old", "right", "eve", 3)]
    client.later = True  # an answer to a task of another run, after this labeller started
    with pytest.raises(PreferenceError, match="task 9 \\(comparison 'foreign'\\).*never created"):
        labeller.collect()


def test_trajectory_pool_state_round_trips_with_open_episodes():
    rng = np.random.default_rng(0)

    def rollout(t=7):
        done = rng.random((t, 2)) < 0.2
        return {"obs": rng.normal(size=(t, 2, 3)).astype(np.float32), "actions": rng.normal(size=(t, 2, 1)),
                "true_rewards": rng.normal(size=(t, 2)), "terminated": done, "truncated": np.zeros_like(done)}

    pool = TrajectoryPool(max_steps=30)
    for _ in range(5):
        pool.add_rollout(rollout())
    copy = TrajectoryPool(max_steps=1)
    copy.load_state_dict(pool.state_dict())
    nxt = rollout()
    pool.add_rollout(nxt)
    copy.add_rollout(nxt)
    for a, b in zip(pool.trajectories(), copy.trajectories(), strict=True):
        assert (a.episode_id, a.start, a.finished) == (b.episode_id, b.start, b.finished)
        assert np.array_equal(a.obs, b.obs) and np.array_equal(a.true_rewards, b.true_rewards)
    assert pool.drain_episode_stats() == copy.drain_episode_stats()
