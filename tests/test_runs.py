import json

import pytest

from palate.errors import CheckpointError
from palate.runs import MetricsLogger, atomic_write_text, prepare_run_dir, read_run_config, truncate_metrics


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def boom(fh):
        fh.write("partial")
        raise RuntimeError("disk full")

    from palate.runs import atomic_write

    with pytest.raises(RuntimeError):
        atomic_write(path, boom, mode="w")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_run_dir_refuses_to_clobber_and_metrics_round_trip(tmp_path):
    run = prepare_run_dir(tmp_path / "r", {"a": 1})
    assert read_run_config(run) == {"a": 1}
    with pytest.raises(CheckpointError, match="already holds a run"):
        prepare_run_dir(run, {"a": 2})
    logger = MetricsLogger(run, tensorboard=False)
    for step in (10, 20, 30):
        logger.log(step, {"charts/SPS": step * 1.0, "bad": float("nan")})
    logger.close()
    truncate_metrics(run, after_step=20)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    assert records[0]["bad"] is None
    with pytest.raises(CheckpointError, match="not a palate run directory"):
        read_run_config(tmp_path / "nope")


def test_atomic_write_dir_replaces_whole_directory_or_nothing(tmp_path):
    from palate.runs import atomic_write_dir

    target = tmp_path / "model"
    atomic_write_dir(target, lambda d: (d / "a.txt").write_text("v1"))
    assert (target / "a.txt").read_text() == "v1"

    def fails(d):
        (d / "a.txt").write_text("v2-partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_dir(target, fails)
    assert (target / "a.txt").read_text() == "v1"
    atomic_write_dir(target, lambda d: (d / "b.txt").write_text("v2"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
