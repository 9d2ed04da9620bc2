import json

import yaml

from palate.cli import main

TINY = ["--env", "Pendulum-v1", "--labels", "12", "--steps", "1e3", "--chunk-steps", "512", "--segment-length", "8",
        "--random-steps", "400", "--rm-epochs", "1", "--rm-initial-epochs", "1", "--eval-episodes", "1",
        "--progress", "false", "--rl", "{n_envs: 1, n_steps: 512, batch_size: 64, n_epochs: 1}"]


def test_prefs_train_from_flags_and_yaml(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"labels": 10, "selector": "random", "rl": {"gamma": 0.9}}))
    rc = main(["prefs", "train", "--config", str(config), *TINY, "--runs-dir", str(tmp_path), "--run-name", "cli"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labels_used"] == 12 and summary["policy_steps"] >= 1000  # flags beat the YAML
    saved = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert saved["selector"] == "random" and saved["rl"] == {"gamma": 0.9, "n_envs": 1, "n_steps": 512,
                                                               "batch_size": 64, "n_epochs": 1}
    assert len((tmp_path / "cli" / "labels.jsonl").read_text().splitlines()) == 12


def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
    rc = main(["prefs", "train", *TINY, "--runs-dir", str(tmp_path), "--labels-from", str(tmp_path / "nowhere")])
    assert rc == 2
    assert "no labels at" in capsys.readouterr().err
    assert main(["prefs", "train", "--labels", "0"]) == 2
    assert "'labels' must be > 0" in capsys.readouterr().err
    assert main(["prefs", "train", "--rl", "[1, 2]"]) == 2
