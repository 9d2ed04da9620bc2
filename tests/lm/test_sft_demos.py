"""``palate lm demos`` / ``label`` on a tiny model, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from palate.cli import main
from palate.data.formats import read_comparisons, read_sft
from palate.data.tasks import load_task
from palate.errors import ConfigError
from palate.lm.demos import DemosConfig, LabelConfig, build_demonstrations, label_comparisons
from palate.lm.testing import tiny_causal_lm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tok = tiny_causal_lm()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_demos_keep_the_panels_favourite_of_n(tiny_dir: Path, tmp_path: Path) -> None:
    out = build_demonstrations(DemosConfig(model=str(tiny_dir), task="sentiment", limit=3, n=3, max_new_tokens=6,
                                           out=str(tmp_path / "demos.jsonl")))
    demos = read_sft(out)
    task = load_task("sentiment")
    assert [d.prompt for d in demos] == task.prompts("train")[:3]
    for d in demos:
        mean = np.mean([lab.score(d.prompt, d.completion) for lab in task.panel.train_labellers])
        assert d.meta["score"] == pytest.approx(mean, abs=1e-4) and d.meta["source"] == "best-of-3"


def test_candidates_do_not_depend_on_the_batch_and_differ_by_stage(tiny_dir: Path) -> None:
    from palate.lm.demos import _candidates

    args = (str(tiny_dir), "", "sentiment", "train", 5, 3, 6, 1.0, 1.0)
    _, prompts, by_two = _candidates(*args, 2, 0, "label")
    _, _, by_all = _candidates(*args, 15, 0, "label")
    assert len(by_two) == len(prompts) == 5 and all(len(g) == 3 for g in by_two)
    assert by_two == by_all  # each completion draws from its own generator
    _, _, demos = _candidates(*args, 15, 0, "demos")
    _, _, other_seed = _candidates(*args, 15, 1, "label")
    assert demos != by_all and other_seed != by_all
    assert len({c for g in by_all for c in g}) > 5  # K different samples per prompt, not one repeated


def test_label_all_labellers_including_held_out(tiny_dir: Path, tmp_path: Path) -> None:
    out = label_comparisons(LabelConfig(model=str(tiny_dir), task="instruct", split="validation", limit=2, k=3,
                                        labellers="all", max_new_tokens=5, out=str(tmp_path / "val.jsonl")))
    comps = read_comparisons(out)
    names = {c.labeller for c in comps}
    assert "held_out" in names and len(names) >= 4
    assert all(c.kind == "ranking" and len(c.completions) == 3 for c in comps)
    pairs = label_comparisons(LabelConfig(model=str(tiny_dir), task="sentiment", limit=2, k=2, format="pair",
                                          max_new_tokens=5, out=str(tmp_path / "pairs.jsonl")))
    assert {c.labeller for c in read_comparisons(pairs)} <= {lab.name for lab in load_task("sentiment").panel.train_labellers}


def test_label_redundancy_has_several_training_labellers_rank_the_same_samples(tiny_dir: Path, tmp_path: Path) -> None:
    """``redundancy: R``: each prompt's K samples ranked by the next R training labellers, never the held-out one."""
    base = dict(model=str(tiny_dir), task="sentiment", limit=3, k=3, max_new_tokens=5)
    one = read_comparisons(label_comparisons(LabelConfig(**base, out=str(tmp_path / "one.jsonl"))))
    four = read_comparisons(label_comparisons(LabelConfig(**base, redundancy=4, out=str(tmp_path / "four.jsonl"))))
    train = [lab.name for lab in load_task("sentiment").panel.train_labellers]
    assert [c.labeller for c in one] == [train[i % len(train)] for i in range(len(one))]
    for prompt in {c.prompt for c in four}:
        rows = [c for c in four if c.prompt == prompt]
        assert sorted(c.labeller for c in rows) == sorted(train)  # every training labeller, once
        assert all(c.completions == rows[0].completions for c in rows)  # on the same samples
        assert rows[0].completions == next(c for c in one if c.prompt == prompt).completions
    with pytest.raises(ConfigError, match="redundancy"):
        LabelConfig(**base, redundancy=2, labellers="all").validate()
    with pytest.raises(ConfigError, match="redundancy"):
        LabelConfig(**base, redundancy=0).validate()


def test_cli_rm_with_yaml_and_flags(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "good and happy", "rejected": "bad"}) + "\n"
                            for i in range(8)))
    config = tmp_path / "rm.yaml"
    config.write_text(f"model: {tiny_dir}\ntrain_data: {data}\nmax_steps: 1\nbatch_size: 4\ntensorboard: false\n")
    code = main(["lm", "rm", "--config", str(config), "--runs-dir", str(tmp_path / "runs"), "--run-name", "cli"])
    assert code == 0
    assert (tmp_path / "runs" / "cli" / "model" / "reward.json").is_file()
    assert "max_steps: 1" in (tmp_path / "runs" / "cli" / "config.yaml").read_text()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"], "ranking": [0]}) + "\n")
    code = main(["lm", "rm", "--config", str(config), "--train-data", str(bad), "--runs-dir", str(tmp_path / "r2")])
    assert code == 2
    assert f"{bad}:1: field 'ranking'" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()  # validated before any run directory is made
