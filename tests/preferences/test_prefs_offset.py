"""The offset diagnostic: its fit on known data, and a run on a real (tiny) preference run."""

import json

import numpy as np
import pytest

from palate.bench.prefs_offset import main, offset_in_true_units
from palate.errors import PreferenceError
from palate.preferences.config import PreferenceConfig
from palate.preferences.trainer import PreferenceTrainer


def test_offset_in_true_units_recovers_a_known_affine_map():
    rng = np.random.default_rng(0)
    true_r = rng.normal(3.0, 1.0, size=500)
    policy_r = 0.8 * (true_r - 0.5) + rng.normal(0, 1e-3, size=500)
    fit = offset_in_true_units(true_r, policy_r)
    assert fit["slope"] == pytest.approx(0.8, abs=1e-3)
    assert fit["offset_true_units"] == pytest.approx(-0.5, abs=1e-2)
    assert fit["correlation"] > 0.999
    assert fit["true_mean_over_std"] == pytest.approx(true_r.mean() / true_r.std())


def test_offset_in_true_units_rejects_what_it_cannot_fit():
    with pytest.raises(PreferenceError, match="equal-length"):
        offset_in_true_units(np.zeros(3), np.zeros(4))
    with pytest.raises(PreferenceError, match="constant"):
        offset_in_true_units(np.ones(5), np.arange(5.0))


def test_report_on_a_finished_run(tmp_path, capsys):
    cfg = PreferenceConfig(
        env="Pendulum-v1", labels=20, steps=1024, chunk_steps=512, segment_length=10, random_steps=600,
        rm_epochs=1, rm_initial_epochs=2, eval_episodes=0, progress=False, runs_dir=str(tmp_path),
        run_name="r", reward_offset=2.0, rl={"n_envs": 1, "n_steps": 512, "batch_size": 64, "n_epochs": 1},
    )
    PreferenceTrainer(cfg).train()
    report = main([str(tmp_path / "r"), "--steps", "300"])
    assert report["reward_offset"] == 2.0
    for mode in ("stochastic", "deterministic"):
        m = report[mode]
        # Pendulum never terminates early: one 200-step episode finished within 300 steps.
        assert m["episode_lengths"] == [200]
        assert np.isfinite([m["slope"], m["offset_true_units"], m["true_mean"]]).all()
        # The policy's reward includes the offset: its mean sits near it (r_hat is ~zero-mean).
        assert abs(m["policy_mean"] - 2.0) < 2.0
    saved = json.loads((tmp_path / "r" / "offset_report.json").read_text())
    assert saved["deterministic"]["slope"] == pytest.approx(report["deterministic"]["slope"])
    assert "stochastic: r_hat + 2" in capsys.readouterr().out


def test_report_names_a_directory_without_a_policy(tmp_path):
    (tmp_path / "config.yaml").write_text("env: Pendulum-v1\n")
    with pytest.raises(PreferenceError, match="policy"):
        main([str(tmp_path)])
