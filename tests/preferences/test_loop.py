"""End-to-end: the agent learns Pendulum from synthetic comparisons alone."""

import json

import numpy as np
import pytest

from palate.errors import PreferenceError
from palate.preferences.channels import AsyncChannel as _AsyncChannel
from palate.preferences.config import PreferenceConfig
from palate.preferences.labellers import Answer, Query
from palate.preferences.storage import LabelStore, load_labels
from palate.preferences.trainer import PreferenceTrainer, labels_wanted

PENDULUM_RL = {"n_envs": 4, "n_steps": 256, "batch_size": 64, "gamma": 0.9, "learning_rate": 1e-3, "n_epochs": 10}


def _random_policy_return(episodes: int = 5) -> float:
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    env.action_space.seed(0)
    returns = []
    for k in range(episodes):
        env.reset(seed=10_000 + k)
        total, done = 0.0, False
        while not done:
            _, r, terminated, truncated, _ = env.step(env.action_space.sample())
            total += r
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


@pytest.mark.slow
def test_pendulum_learns_from_synthetic_preferences(tmp_path):
    cfg = PreferenceConfig(
        env="Pendulum-v1", algo="ppo", labels=150, steps=40_000, chunk_steps=4096, label_schedule_t0=20_000,
        rm_epochs=10, rl=PENDULUM_RL, runs_dir=str(tmp_path), run_name="e2e", progress=False, seed=0,
    )
    summary = PreferenceTrainer(cfg).train()
    random_return = _random_policy_return()
    # Random play scores about -1250; the true-reward PPO reaches about -450 in the same steps.
    assert summary["eval_true_return_mean"] > random_return + 300, (summary, random_return)
    assert summary["labels_used"] == 150
    metrics = [json.loads(x) for x in (tmp_path / "e2e" / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    for key in ("prefs/labels", "prefs/rm_val_accuracy", "prefs/rm_val_loss", "prefs/reward_correlation",
                "charts/episodic_return"):
        assert key in last, key
    assert last["prefs/reward_correlation"] > 0.7
    # The labelling schedule: a quarter up front, then decaying.
    assert metrics[0]["prefs/labels"] == 38
    counts = [m["prefs/labels"] for m in metrics]
    gains = np.diff(counts)
    assert np.all(gains >= 0) and gains[0] > gains[-1]
    assert (tmp_path / "e2e" / "reward_model.pt").is_file()
    assert (tmp_path / "e2e" / "policy" / "checkpoint.pt").is_file()


def test_label_schedule_spends_budget_with_decaying_rate():
    cfg = PreferenceConfig(labels=700, steps=1_000_000, label_schedule_t0=2e6)
    assert labels_wanted(0, cfg) == 175
    assert labels_wanted(1_000_000, cfg) == 700
    first = labels_wanted(100_000, cfg) - labels_wanted(0, cfg)
    last = labels_wanted(1_000_000, cfg) - labels_wanted(900_000, cfg)
    assert first > last > 0


def _tiny(tmp_path, name, **kw):
    base = dict(env="Pendulum-v1", labels=20, steps=1024, chunk_steps=512, segment_length=10, random_steps=600,
                rm_epochs=1, rm_initial_epochs=2, eval_episodes=0, progress=False, runs_dir=str(tmp_path),
                run_name=name, rl={"n_envs": 1, "n_steps": 512, "batch_size": 64, "n_epochs": 1})
    base.update(kw)
    return PreferenceConfig(**base)


def test_labels_persist_and_are_reused_by_a_later_run(tmp_path):
    first = PreferenceTrainer(_tiny(tmp_path, "a")).train()
    assert first["labels_asked"] == 20
    lines = (tmp_path / "a" / "labels.jsonl").read_text().splitlines()
    assert len(lines) == 20 and all(json.loads(x)["env"] == "Pendulum-v1" for x in lines)

    second = PreferenceTrainer(_tiny(tmp_path, "b", labels=30, labels_from=str(tmp_path / "a"))).train()
    assert second["labels_used"] == 30
    reused = load_labels(tmp_path / "b")
    assert len(reused) == 30
    assert {c.id for c in load_labels(tmp_path / "a")} <= {c.id for c in reused}

    with pytest.raises(PreferenceError, match="no labels at"):
        PreferenceTrainer(_tiny(tmp_path, "c", labels_from=str(tmp_path / "missing"))).train()


class SlowLabeller:
    """Answers each query only after a few polls, like a person; says "can't tell" to some."""

    name, asynchronous = "slow", True

    def __init__(self):
        self.waiting, self.polls = [], 0

    def submit(self, queries):
        self.waiting.extend(queries)

    def collect(self, timeout=0.0):
        self.polls += 1
        if self.polls % 3 or not self.waiting:
            return []
        q = self.waiting.pop(0)
        return [Answer(q.id, "cant_tell" if q.id.endswith(("0", "1", "2", "3")) else "left", self.name)]

    def close(self):
        pass


def test_async_channel_drops_clips_but_never_labels(tmp_path, linear):
    store = LabelStore(tmp_path)
    channel = _AsyncChannel(SlowLabeller(), store, max_pending=3, poll_s=0.01)
    queries = [Query.new(p) for p in linear.pairs(np.random.default_rng(0), 5, length=4)]
    assert channel.offer(queries) == 3
    assert channel.dropped == 2
    late = channel.close(wait_s=10.0)
    assert store.pending == 0
    assert sorted(c.id for c in late) == sorted(q.id for q in queries[:3])
    lines = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    # "Can't tell" is on disk, but the reward model never trains on it.
    usable = load_labels(tmp_path)
    assert len(usable) == sum(x["label"] != "cant_tell" for x in lines)


def test_async_channel_surfaces_unknown_labels(tmp_path, linear):
    class Rogue(SlowLabeller):
        def collect(self, timeout=0.0):
            return [Answer("not-ours", "left")]

    channel = _AsyncChannel(Rogue(), LabelStore(tmp_path), max_pending=3, poll_s=0.01)
    import time

    deadline = time.monotonic() + 5
    with pytest.raises(PreferenceError, match="'not-ours'"):
        while time.monotonic() < deadline:
            channel.answers()
            time.sleep(0.01)
    channel.close()


def test_fixed_length_episodes_where_the_env_allows():
    from palate.preferences.wrappers import make_env_factory

    hopper = make_env_factory(PreferenceConfig(env="Hopper-v5"))
    assert hopper.env_kwargs == {"terminate_when_unhealthy": False}
    assert make_env_factory(PreferenceConfig(env="Hopper-v5", fixed_length_episodes=False)).env_kwargs == {}
    env = hopper()
    env.reset(seed=0)
    env.action_space.seed(0)
    rewards = []
    for _ in range(200):
        _, r, terminated, _, _ = env.step(env.action_space.sample())
        assert not terminated
        rewards.append(r)
    # A random hopper falls within a few dozen steps; every step on the ground costs fall_penalty.
    assert sum(r < -5 for r in rewards) > 100
    cartpole = make_env_factory(PreferenceConfig(env="CartPole-v1"))()
    cartpole.reset(seed=0)
    steps, rewards = 0, []
    while True:
        _, r, terminated, truncated, _ = cartpole.step(0)
        steps += 1
        rewards.append(r)
        if terminated or truncated:
            break
    # The pole falls within a few dozen steps, yet the episode runs to the time limit, paying 0.
    assert steps == 500 and truncated and 5 < sum(rewards) < 50


def test_reward_offset_shifts_only_what_the_policy_sees(tmp_path):
    trainer = PreferenceTrainer(_tiny(tmp_path, "off", reward_offset=0.5))
    obs = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    actions = np.zeros((7, 1), np.float32)
    base = trainer.model.predict(obs, actions)
    np.testing.assert_allclose(trainer._policy_reward(obs, actions), base + 0.5, rtol=1e-6)
    assert trainer._build_policy().reward_fn == trainer._policy_reward
