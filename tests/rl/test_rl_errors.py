"""User mistakes at the API and the CLI: one clear error that names the input and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from palate.cli import main
from palate.config import config_from_dict
from palate.errors import ConfigError, EnvError
from palate.rl import PPO, TRPO, PPOConfig, TRPOConfig

SMALL = dict(env="CartPole-v1", n_envs=2, n_steps=32, batch_size=64, n_epochs=1, total_steps=64)


@pytest.fixture(scope="module")
def model():
    return PPO(PPOConfig(**SMALL)).learn(progress=False)


@pytest.mark.parametrize("overrides,message", [
    ({"learning_rate": "abc"}, "'learning_rate' expects float, got 'abc'; give e.g. learning_rate=0.0003"),
    ({"n_envs": 1.5}, "'n_envs' expects int, got 1.5"),
    ({"n_steps": "many"}, "'n_steps' expects int"),
    ({"loss": "clp"}, "'loss' must be one of ['clip', 'kl_penalty']"),
    ({"learnin_rate": 0.1}, "did you mean 'learning_rate'?"),
])
def test_bad_values_are_one_config_error(overrides, message):
    with pytest.raises(ConfigError) as err:
        PPO(**overrides)
    assert message in str(err.value)


def test_types_are_coerced_where_the_meaning_is_plain():
    cfg = TRPOConfig(n_envs=2.0, vf_lr="0.01", max_kl=1)
    assert cfg.n_envs == 2 and isinstance(cfg.n_envs, int) and cfg.vf_lr == 0.01 and isinstance(cfg.max_kl, float)
    with pytest.raises(ConfigError, match="'vf_iters' expects int"):
        TRPO(vf_iters=2.5)


def test_misspelt_yaml_key_says_did_you_mean(tmp_path, capsys):
    with pytest.raises(ConfigError, match="'n_epoch': did you mean 'n_epochs'"):
        config_from_dict(PPOConfig, {"n_epoch": 3})
    preset = tmp_path / "p.yaml"
    preset.write_text("env: CartPole-v1\nppo:\n  clip_rnage: 0.1\n")
    assert main(["rl", "train", "--config", str(preset), "--runs-dir", str(tmp_path)]) == 2
    assert "did you mean 'clip_range'" in capsys.readouterr().err


@pytest.mark.parametrize("steps", [-1, 1.5, "10"])
def test_learn_rejects_a_bad_step_count(steps):
    with pytest.raises(ConfigError, match=r"learn\(total_steps="):
        PPO(PPOConfig(**SMALL)).learn(total_steps=steps, progress=False)


def test_predict_checks_the_observation(model):
    assert model.predict(np.zeros(4)).shape == () and model.predict(np.zeros((3, 4))).shape == (3,)
    with pytest.raises(EnvError, match=r"observation of shape \(3,\), but the model takes \(4,\)"):
        model.predict(np.zeros(3))
    with pytest.raises(EnvError, match=r"shape \(2, 5\)"):
        model.predict(np.zeros((2, 5)))
    with pytest.raises(EnvError, match="NaN"):
        model.predict(np.array([0.0, np.nan, 0.0, 0.0]))
    with pytest.raises(EnvError, match="not an array of numbers"):
        model.predict(["a", "b", "c", "d"])


def test_eval_of_a_preference_run_finds_its_policy(tmp_path, capsys):
    run = tmp_path / "prefs-run"  # palate prefs train keeps the policy's run directory in policy/
    PPO(PPOConfig(**SMALL)).learn(run_dir=run / "policy", progress=False)
    assert main(["rl", "eval", str(run), "--episodes", "1"]) == 0
    assert (run / "policy" / "eval.json").exists() and str(run / "policy" / "eval.json") in capsys.readouterr().out
    empty = tmp_path / "early"  # stopped before the policy's first checkpoint
    (empty / "policy").mkdir(parents=True)
    assert main(["rl", "eval", str(empty)]) == 2
    assert f"{empty}/policy/checkpoint.pt" in capsys.readouterr().err


def test_stochastic_eval_does_not_overwrite_the_deterministic_one(tmp_path):
    PPO(PPOConfig(**SMALL)).learn(run_dir=tmp_path, progress=False)
    assert main(["rl", "eval", str(tmp_path), "--episodes", "2"]) == 0
    deterministic = (tmp_path / "eval.json").read_text()
    assert main(["rl", "eval", str(tmp_path), "--episodes", "2", "--stochastic"]) == 0
    assert (tmp_path / "eval.json").read_text() == deterministic
    assert json.loads((tmp_path / "eval-stochastic.json").read_text())["deterministic"] is False
