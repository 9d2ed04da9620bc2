"""`palate rl train | eval | resume` through palate.cli.main, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palate.cli import main

PRESET = str(Path(__file__).resolve().parents[2] / "configs" / "rl" / "cartpole.yaml")
SMALL = ["--total-steps", "512", "--n-envs", "2", "--n-steps", "128", "--no-progress"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_eval_resume_ppo(tmp_path, capsys):
    run = tmp_path / "cp"
    assert main(["rl", "train", "--algo", "ppo", "--env", "CartPole-v1", *SMALL, "--batch-size", "64",
                 "--runs-dir", str(tmp_path), "--run-name", "cp"]) == 0
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json", "tb"):
        assert (run / name).exists(), name
    logged = records(run)
    for key in ("losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl",
                "losses/clipfrac", "losses/explained_variance", "charts/learning_rate", "charts/SPS"):
        assert key in logged[-1], key
    assert any("charts/episodic_return" in r for r in logged)
    assert json.loads((run / "summary.json").read_text())["global_step"] == 512

    assert main(["rl", "eval", str(run), "--episodes", "2"]) == 0
    assert "deterministic return" in capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())
    assert result["episodes"] == 2 and len(result["returns"]) == 2
    assert main(["rl", "eval", str(run), "--episodes", "2", "--stochastic"]) == 0

    assert main(["rl", "resume", str(run), "--total-steps", "1024", "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["global_step"] == 1024
    steps = [r["step"] for r in records(run)]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) and steps[-1] == 1024


def test_train_trpo_from_preset_with_flag_override(tmp_path):
    assert main(["rl", "train", "--algo", "trpo", "--config", PRESET, *SMALL, "--batch-size", "128",
                 "--vf-iters", "2", "--runs-dir", str(tmp_path), "--run-name", "t"]) == 0
    config = (tmp_path / "t" / "config.yaml").read_text()
    assert "algo: trpo" in config and "vf_iters: 2" in config and "cg_damping: 0.001" in config
    last = records(tmp_path / "t")[-1]
    assert 0.0 <= last["trpo/line_search_success_rate"] <= 1.0 and "trpo/step_fraction" in last


@pytest.mark.parametrize("argv,message", [
    (["rl", "train", "--env", "CartPol-v1"], "CartPole-v1"),
    (["rl", "train", "--algo", "ppo", "--max-kl", "0.1"], "--max-kl"),
    (["rl", "train", "--gamma", "1.5"], "gamma"),
    (["rl", "eval", "/nonexistent/run"], "no checkpoint"),
    (["rl", "resume", "/nonexistent/run"], "not a palate run directory"),
])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert main([*argv, *(["--runs-dir", str(tmp_path)] if argv[1] == "train" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("palate: error:") and message in err[0]
    assert not any(tmp_path.iterdir())  # no half-made run directory


def test_existing_run_is_not_clobbered(tmp_path, capsys):
    argv = ["rl", "train", *SMALL, "--batch-size", "64", "--total-steps", "256", "--runs-dir", str(tmp_path),
            "--run-name", "x"]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "resume" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


@pytest.mark.parametrize("preset", sorted((Path(PRESET).parent).glob("*.yaml")), ids=lambda p: p.stem)
def test_presets_are_valid_for_both_algorithms(preset):
    from palate.config import config_from_dict, load_yaml
    from palate.rl import PPOConfig, TRPOConfig
    from palate.rl.cli import preset_values
    from palate.rl.envs import check_env_id

    data = load_yaml(preset)
    for algo, cls in (("ppo", PPOConfig), ("trpo", TRPOConfig)):
        cfg = config_from_dict(cls, preset_values(data, algo), source=str(preset))
        check_env_id(cfg.env)
