"""The load benchmark runs end to end on a tiny budget and finds nothing lost or duplicated."""

from __future__ import annotations

import json

import pytest

from palate.bench.feedback_load import LoadConfig, run


def test_load_benchmark_smoke(tmp_path):
    cfg = LoadConfig(labellers=4, target_rate=100, paced_seconds=1.0, saturation_seconds=0.5, tasks=600)
    result = run(tmp_path, cfg)
    assert result["paced"]["answers"] > 0 and result["saturation"]["answers"] > 0
    assert result["integrity"]["lost"] == 0 and result["integrity"]["duplicated"] == 0
    assert result["integrity"]["acknowledged"] == result["integrity"]["stored"]
    assert json.loads((tmp_path / "feedback_load.json").read_text())["config"]["labellers"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["feedback_load.json"]  # the scratch database is gone


def test_help_prints_usage_and_starts_nothing(tmp_path, monkeypatch, capsys):
    from palate.bench.feedback_load import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "out_dir" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no "--help" folder, no load test
