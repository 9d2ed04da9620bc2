"""Callbacks: the hooks' order and counts, stopping, evaluation, checkpoints, and learn's arguments."""

from __future__ import annotations

import json

import pytest
import torch
from test_rl_checkpoint import assert_same_model  # tests/rl is on sys.path (pytest prepend mode)

from palate.cli import main
from palate.errors import ConfigError
from palate.rl import PPO, TRPO, PPOConfig, TRPOConfig
from palate.rl.callbacks import (
    Callback,
    CheckpointCallback,
    EvalCallback,
    StopTrainingOnRewardThreshold,
)
from palate.rl.evaluate import evaluate

CFG = PPOConfig(env="CartPole-v1", n_envs=2, n_steps=32, batch_size=64, n_epochs=1, total_steps=256)


class Recorder(Callback):
    """Writes down every hook with the step it saw."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []
        self.stop_at = stop_at

    def _on_training_start(self) -> None:
        self.events.append(("training_start", self.num_timesteps))

    def _on_rollout_start(self) -> None:
        self.events.append(("rollout_start", self.num_timesteps))

    def _on_step(self) -> bool | None:
        assert self.model.global_step == self.num_timesteps
        assert self.locals["rewards"].shape == (self.model.config.n_envs,)
        if self.stop_at is not None and self.num_timesteps >= self.stop_at:
            return False
        return None  # no return value: training goes on

    def _on_rollout_end(self) -> None:
        self.events.append(("rollout_end", self.num_timesteps))

    def _on_training_end(self) -> None:
        self.events.append(("training_end", self.num_timesteps))


def test_hooks_run_in_sb3_order_with_step_counts():
    rec = Recorder()
    model = PPO(CFG).learn(total_steps=128, progress=False, callback=rec)
    assert rec.model is model and rec.training_env is not None
    assert rec.n_calls == 128 // 2  # one on_step per vector step of 2 envs
    assert rec.num_timesteps == 128
    assert rec.events == [("training_start", 0), ("rollout_start", 0), ("rollout_end", 64),
                          ("rollout_start", 64), ("rollout_end", 128), ("training_end", 128)]


def test_on_step_false_stops_at_once_and_learn_can_go_on():
    rec = Recorder(stop_at=70)
    model = PPO(CFG).learn(progress=False, callback=rec)
    assert model.global_step == 70 and model.iteration == 1  # the partial second rollout is not trained on
    assert rec.events[-1] == ("training_end", 70)
    model.learn(total_steps=64, progress=False)
    assert model.global_step == 134 and model.iteration == 2


def test_a_callback_that_does_nothing_changes_nothing():
    plain = PPO(CFG).learn(progress=False)
    seen = []
    watched = PPO(CFG).learn(progress=False, callback=[Recorder(), lambda locals_, model: seen.append(1)])
    assert len(seen) == CFG.total_steps // CFG.n_envs
    assert_same_model(plain, watched)


def test_function_callback_returning_false_stops():
    model = PPO(CFG).learn(progress=False, callback=lambda locals_, model: locals_["t"] < 4)
    assert model.global_step == 10  # steps t = 0..4 of 2 envs


def test_bad_callback_is_a_config_error():
    with pytest.raises(ConfigError, match="callback must be"):
        PPO(CFG).learn(progress=False, callback=42)
    with pytest.raises(ConfigError, match="eval_freq"):
        EvalCallback(eval_freq=0)


def test_eval_callback_keeps_the_best_and_leaves_training_alone(tmp_path):
    plain = TRPO(TRPOConfig(env="CartPole-v1", n_envs=2, n_steps=32, batch_size=64, vf_iters=1,
                            total_steps=256)).learn(progress=False)
    evaluator = EvalCallback(n_eval_episodes=2, eval_freq=100)
    model = TRPO(plain.config.replace(total_steps=256)).learn(run_dir=tmp_path, progress=False, callback=evaluator)
    assert_same_model(plain, model)  # deterministic evaluation draws nothing from the training RNG
    records = [json.loads(line) for line in (tmp_path / "evaluations.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [100, 200]
    assert all(len(r["returns"]) == 2 and r["deterministic"] for r in records)
    assert evaluator.best_mean_reward == max(r["mean_return"] for r in records)
    best = TRPO.load(tmp_path / "best")
    assert best.global_step in (100, 200)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval/episodic_return" in m for m in metrics) == 2


def test_stop_on_reward_threshold_inside_eval_callback():
    stop = StopTrainingOnRewardThreshold(reward_threshold=1.0)  # CartPole scores >= 8: reached at once
    evaluator = EvalCallback(callback_on_new_best=stop, n_eval_episodes=1, eval_freq=64)
    model = PPO(CFG).learn(progress=False, callback=evaluator)
    assert model.global_step == 64 and evaluator.best_mean_reward >= 1.0


def test_checkpoint_callback_files_resume_exactly(tmp_path):
    cfg = CFG.replace(total_steps=256)
    saver = CheckpointCallback(save_freq=100, save_path=tmp_path / "ckpt", name_prefix="cp")
    full = PPO(cfg).learn(progress=False, callback=saver)
    # Saved at the first rollout boundary after each multiple of 100 (rollouts of 64 steps).
    assert [p.name for p in saver.saved] == ["cp_128_steps.pt", "cp_256_steps.pt"]
    resumed = PPO.load(tmp_path / "ckpt" / "cp_128_steps.pt").learn(progress=False)
    assert_same_model(full, resumed)


def test_cli_eval_every_writes_evaluations_and_best(tmp_path):
    assert main(["rl", "train", "--env", "CartPole-v1", "--total-steps", "256", "--n-envs", "2", "--n-steps", "64",
                 "--batch-size", "64", "--n-epochs", "1", "--eval-every", "128", "--eval-episodes", "2",
                 "--no-progress", "--runs-dir", str(tmp_path), "--run-name", "e"]) == 0
    run = tmp_path / "e"
    assert len((run / "evaluations.jsonl").read_text().splitlines()) == 2
    assert (run / "best" / "checkpoint.pt").is_file()
    # A resumed run keeps the evaluations up to its checkpoint and adds the new ones.
    assert main(["rl", "resume", str(run), "--total-steps", "384", "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "evaluations.jsonl").read_text().splitlines()]
    assert steps == [128, 256, 384]
    assert main(["rl", "eval", str(run / "best"), "--episodes", "1"]) == 0


def test_eval_every_needs_a_separate_env(count_env_factory):
    env = count_env_factory()()
    with pytest.raises(ConfigError, match="separate env"):
        PPO(CFG.replace(n_envs=1, batch_size=32, eval_every=64)).learn(env, progress=False)


def test_stochastic_evaluation_leaves_the_training_rng_alone():
    model = PPO(CFG).learn(total_steps=64, progress=False)
    state = model.generator.get_state()
    first = evaluate(model, episodes=2, deterministic=False)
    assert torch.equal(model.generator.get_state(), state)
    assert evaluate(model, episodes=2, deterministic=False).returns == first.returns
