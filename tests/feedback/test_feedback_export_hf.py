"""`palate feedback export --format hf`: TRL's preference format, read by `datasets` and by `palate lm rm`."""

from __future__ import annotations

import json
import shutil

import pytest

from palate.cli import main
from palate.data.formats import read_comparisons
from palate.errors import DataError, FeedbackError
from palate.feedback.cli import read_jsonl
from palate.feedback.store import Store

TASKS = [
    {"kind": "pair", "prompt": "Say hi.", "left": "hello", "right": "go away", "external_id": "pair-1"},
    {"kind": "pair", "prompt": "Say bye.", "left": "bye", "right": "later", "external_id": "pair-tie"},
    # ranking with a tie: c0 and c3 share rank 1, so they form no pair
    {"kind": "rank", "prompt": "Name a colour.", "completions": ["red", "seven", "blue", "green"], "external_id": "rk"},
    {"kind": "rank", "mode": "best", "prompt": "Pick a fruit.", "completions": ["apple", "rock", "pear"], "external_id": "bk"},
    {"kind": "rank", "prompt": "Undecided.", "completions": ["a", "b"], "external_id": "ct"},
    # a clip pair has no text: not part of a text preference dataset
    {"kind": "pair", "left": "seg-1", "right": "seg-2", "external_id": "clip"},
]
ANSWERS = {
    "pair-1": {"choice": "right"},
    "pair-tie": {"choice": "equal"},
    "rk": {"ranking": [1, 2, 0, 1]},
    "bk": {"best": 2},
    "ct": {"cant_tell": True},
    "clip": {"choice": "left"},
}
EXPECTED = [
    ("Say hi.", "go away", "hello"),
    # rank 0 blue > rank 1 red, green > rank 2 seven; red and green tie
    ("Name a colour.", "blue", "red"),
    ("Name a colour.", "blue", "green"),
    ("Name a colour.", "blue", "seven"),
    ("Name a colour.", "red", "seven"),
    ("Name a colour.", "green", "seven"),
    ("Pick a fruit.", "pear", "apple"),
    ("Pick a fruit.", "pear", "rock"),
]


def _labelled_db(tmp_path):
    db = tmp_path / "feedback.sqlite"
    store = Store(db)
    store.create_token("alice", "labeller", ["p"])
    pid = store.project_id("p")
    ids = dict(zip([t["external_id"] for t in TASKS], store.create_tasks(pid, TASKS)))
    alice = store._db.execute("SELECT id FROM accounts WHERE name = 'alice'").fetchone()[0]
    from palate.feedback.auth import Principal

    who = Principal(alice, "alice", "labeller", frozenset({pid}), False)
    for ext, answer in ANSWERS.items():
        store.submit_answer(who, ids[ext], answer)
    store.close()
    return db


def test_hf_export_is_read_by_datasets_and_by_palates_reader(tmp_path, capsys):
    db = _labelled_db(tmp_path)
    out = tmp_path / "prefs.jsonl"
    assert main(["feedback", "export", "--db", str(db), "--project", "p", "--out", str(out), "--format", "hf"]) == 0
    assert f"wrote {len(EXPECTED)} lines" in capsys.readouterr().err
    lines = [obj for _, obj in read_jsonl(out)]
    assert [(x["prompt"], x["chosen"], x["rejected"]) for x in lines] == EXPECTED
    assert {x["labeller"] for x in lines} == {"alice"}
    assert [x["comparison_id"] for x in lines] == ["pair-1"] + ["rk"] * 5 + ["bk"] * 2

    # palate lm rm --train-data reads it back: the same pairs, with their labeller.
    comps = read_comparisons(out)
    assert [(c.prompt, *c.completions) for c in comps] == EXPECTED
    assert all(c.kind == "pair" and c.ranks == [0, 1] and c.labeller == "alice" for c in comps)

    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    # TRL's standard preference columns, all plain strings (extra columns are dropped by its trainers)
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    assert all(ds.features[c].dtype == "string" for c in ("prompt", "chosen", "rejected"))
    assert list(zip(ds["prompt"], ds["chosen"], ds["rejected"])) == EXPECTED
    # and through palate's datasets route (a .json file is loaded with `datasets`)
    as_json = tmp_path / "prefs.json"
    shutil.copy(out, as_json)
    assert [(c.prompt, *c.completions) for c in read_comparisons(as_json)] == EXPECTED


def test_rankings_export_leaves_out_cant_tell_and_hf_lines_are_not_imported(tmp_path):
    db = _labelled_db(tmp_path)
    store = Store(db)
    pid = store.project_id("p")
    rankings = list(store.export_rows(pid, "rankings"))
    assert [r["comparison_id"] for r in rankings] == ["rk"]
    hf = [(i, x) for i, x in enumerate(store.export_rows(pid, "hf"), 1)]
    with pytest.raises(FeedbackError, match="answered twice by 'alice'.*--format hf"):
        store.import_rows(store.ensure_project("q"), hf)
    store.close()


def test_reader_names_the_shape_it_wants(tmp_path):
    cases = [
        ({"text": "hello"}, "not a comparison \\(its keys: 'text'\\).*\"prompt\", \"chosen\", \"rejected\""),
        ({"chosen": "Q: hi A: hello", "rejected": "Q: hi A: go"}, "implicit-prompt"),
        ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "conversational"),
    ]
    for obj, message in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(obj) + "\n")
        with pytest.raises(DataError, match=f"bad.jsonl:1: .*{message}"):
            read_comparisons(path)
