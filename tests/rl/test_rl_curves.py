"""curves.png: every control run with a run directory draws return and length against steps."""

from __future__ import annotations

import json

from palate.cli import main
from palate.rl import PPO, PPOConfig
from palate.rl import curves as curves_module
from palate.rl.curves import read_series

PNG = b"\x89PNG\r\n\x1a\n"


def test_cli_run_draws_curves_beside_its_logs(tmp_path):
    assert main(["rl", "train", "--env", "CartPole-v1", "--total-steps", "512", "--n-envs", "2", "--n-steps", "64",
                 "--batch-size", "64", "--n-epochs", "1", "--eval-every", "256", "--eval-episodes", "1",
                 "--no-progress", "--runs-dir", str(tmp_path), "--run-name", "c"]) == 0
    run = tmp_path / "c"
    assert (run / "curves.png").read_bytes().startswith(PNG) and (run / "tb").is_dir()
    series = read_series(run / "metrics.jsonl", ("charts/episodic_return", "charts/episodic_length",
                                                 "eval/episodic_return"))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(series["charts/episodic_return"][0]) == sum("charts/episodic_return" in r for r in logged) > 0
    assert series["eval/episodic_return"][0] == [256, 512]


def test_curves_redrawn_at_checkpoints_and_a_plot_error_never_stops_training(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(curves_module, "write_curves", lambda run_dir, title="": drawn.append(title) or 1 / 0)
    monkeypatch.setattr(curves_module, "REDRAW_EVERY_S", 0.0)
    cfg = PPOConfig(env="CartPole-v1", n_envs=2, n_steps=64, batch_size=64, n_epochs=1, total_steps=768,
                    checkpoint_every=256)
    PPO(cfg).learn(run_dir=tmp_path, progress=False)
    assert drawn == ["PPO on CartPole-v1, seed 0"] * 3  # checkpoints at 256 and 512, then the end
    assert (tmp_path / "summary.json").exists()


def test_a_run_without_finished_episodes_still_draws(tmp_path):
    cfg = PPOConfig(env="Pendulum-v1", n_envs=1, n_steps=64, batch_size=64, n_epochs=1, total_steps=64)
    PPO(cfg).learn(run_dir=tmp_path, progress=False)  # Pendulum's episodes last 200 steps
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG)
