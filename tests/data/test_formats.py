"""Data formats: auto-detection, errors that name file, line, field and fix, atomic writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palate.data.formats import (
    Comparison,
    SFTExample,
    read_comparisons,
    read_sft,
    write_comparisons,
    write_jsonl,
    write_sft,
)
from palate.errors import DataError


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_comparison_formats_are_detected_per_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "cmp.jsonl", [
        {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [1, 0, 1], "labeller": "ann"},
        "",
        {"prompt": "p", "completions": ["a", "b", "c", "d"], "best": 2},
        {"prompt": "p", "chosen": "good", "rejected": "bad", "id": 7},
    ])
    ranking, best, pair = read_comparisons(path)
    assert (ranking.kind, ranking.ranks, ranking.labeller) == ("ranking", [1, 0, 1], "ann")
    assert (best.kind, best.best, best.ranks) == ("best_of_k", 2, [1, 1, 0, 1])
    assert (pair.kind, pair.completions, pair.ranks, pair.meta) == ("pair", ["good", "bad"], [0, 1], {"id": 7})
    assert pair.source == f"{path}:4"


@pytest.mark.parametrize(("record", "field", "fix"), [
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0]}, "ranking", "one rank per completion"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 0]}, "ranking", "rank at least two"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, "x"]}, "ranking", "list of integers"),
    ({"prompt": "p", "completions": ["a"] * 10, "ranking": list(range(10))}, "completions", "2 to 9"),
    ({"prompt": "p", "completions": ["a", "b"], "best": 2}, "best", "index in 0..1"),
    ({"prompt": "p", "completions": ["a", "b"]}, "ranking", "add \"ranking\""),
    ({"completions": ["a", "b"], "ranking": [0, 1]}, "prompt", "needs the prompt"),
    ({"prompt": "p", "chosen": "a"}, "rejected", "a pair is"),
    ({"prompt": "p", "chosen": "a", "rejected": 3}, "rejected", "must be str"),
])
def test_comparison_errors_name_file_line_field_and_fix(tmp_path: Path, record, field, fix) -> None:
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = _write(tmp_path / "bad.jsonl", [good, good, record])
    with pytest.raises(DataError) as err:
        read_comparisons(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: field '{field}'"), message
    assert fix in message


def test_invalid_json_and_missing_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "broken.jsonl", [{"prompt": "p", "response": "r"}, "{not json"])
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON.*one JSON object"):
        read_sft(path)
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_sft(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no records"):
        read_sft(_write(tmp_path / "empty.jsonl", [""]))


def test_sft_formats_and_errors(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    path = _write(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r", "score": 1.0}, chat])
    plain, conv = read_sft(path)
    assert (plain.prompt, plain.completion, plain.meta) == ("p", "r", {"score": 1.0})
    assert conv.prompt is None and conv.completion == "Hello." and conv.messages == chat["messages"]
    bad_role = {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]}
    ends_user = {"messages": [{"role": "user", "content": "Hi"}]}
    for record, field in ((bad_role, "messages[1].role"), (ends_user, "messages"),
                          ({"prompt": "p", "response": " "}, "response"), ({"prompt": "p"}, "response")):
        with pytest.raises(DataError) as err:
            read_sft(_write(tmp_path / "bad.jsonl", [record]))
        assert str(err.value).startswith(f"{tmp_path / 'bad.jsonl'}:1: field '{field}'"), str(err.value)


def test_writers_round_trip(tmp_path: Path) -> None:
    comps = [Comparison("p", ["a", "b", "c"], [2, 0, 1], "ranking", labeller="ann"),
             Comparison("p", ["a", "b"], [1, 0], "best_of_k", best=1),
             Comparison("p", ["a", "b"], [0, 1], "pair")]
    back = read_comparisons(write_comparisons(tmp_path / "c.jsonl", comps))
    assert [(c.kind, c.completions, c.ranks, c.best, c.labeller) for c in back] == \
        [(c.kind, c.completions, c.ranks, c.best, c.labeller) for c in comps]
    examples = [SFTExample("p", "r"), SFTExample(None, "ok", [{"role": "user", "content": "u"},
                                                             {"role": "assistant", "content": "ok"}])]
    again = read_sft(write_sft(tmp_path / "s.jsonl", examples))
    assert [(e.prompt, e.completion, e.messages) for e in again] == [(e.prompt, e.completion, e.messages)
                                                                       for e in examples]


def test_a_failed_write_leaves_the_old_file_intact(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "response": "r"}])
    before = path.read_text()

    def records():
        yield {"prompt": "q", "response": "s"}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_jsonl(path, records())
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def test_datasets_sources(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"},
                                {"prompt": "q", "chosen": "c", "rejected": "d"}]))
    comps = read_comparisons(path)
    assert [c.prompt for c in comps] == ["p", "q"] and comps[1].source == f"{path}:2"
    # hf:<name or directory>[:split] goes through datasets.load_dataset (here a local directory).
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text(json.dumps({"prompt": "r", "response": "s"}) + "\n")
    assert [e.prompt for e in read_sft(f"hf:{tmp_path / 'ds'}:train")] == ["r"]
    with pytest.raises(DataError, match="cannot load as a datasets source"):
        read_sft(f"hf:{tmp_path / 'ds'}:nosplit")
