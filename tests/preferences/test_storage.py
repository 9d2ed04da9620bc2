import json

import numpy as np
import pytest

from palate.errors import PreferenceError
from palate.preferences.labellers import Answer, Query
from palate.preferences.storage import LabelStore, load_labels


def _queries(linear, n, seed=0):
    return [Query.new(p) for p in linear.pairs(np.random.default_rng(seed), n, length=5)]


def test_labels_persist_with_their_segments_and_reload(tmp_path, linear):
    store = LabelStore(tmp_path, meta={"env": "Toy-v0"})
    queries = _queries(linear, 4)
    store.save_queries(queries)
    assert store.pending == 4
    for q, label in zip(queries, ["left", "right", "equal", "cant_tell"]):
        store.record(Answer(q.id, label))
    assert store.pending == 0
    lines = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert [x["label"] for x in lines] == ["left", "right", "equal", "cant_tell"]
    assert all(x["env"] == "Toy-v0" and x["shard"] == "segments/00000.npz" for x in lines)

    loaded = load_labels(tmp_path, obs_shape=(linear.obs_dim,))
    # "can't tell" is recorded but dropped from training.
    assert [c.label for c in loaded] == ["left", "right", "equal"]
    assert [c.mu for c in loaded] == [1.0, 0.0, 0.5]
    for c, q in zip(loaded, queries):
        assert c.id == q.id
        np.testing.assert_array_equal(c.pair.left.obs, q.pair.left.obs)
        np.testing.assert_allclose(c.pair.right.true_rewards, q.pair.right.true_rewards)
    assert len(load_labels(tmp_path / "labels.jsonl", include_cant_tell=True)) == 4


def test_label_for_unknown_comparison_raises_naming_it(tmp_path, linear):
    store = LabelStore(tmp_path)
    store.save_queries(_queries(linear, 1))
    with pytest.raises(PreferenceError, match="'nope'.*unknown"):
        store.record(Answer("nope", "left"))
    q = _queries(linear, 1, seed=1)
    store.save_queries(q)
    store.record(Answer(q[0].id, "left"))
    # A second person's answer to the same comparison is kept too.
    again = store.record(Answer(q[0].id, "right", labeller="bob"))
    assert again.mu == 0.0
    assert [c.label for c in load_labels(tmp_path)] == ["left", "right"]


def test_labels_file_naming_missing_segments_raises(tmp_path, linear):
    store = LabelStore(tmp_path)
    q = _queries(linear, 1)
    store.save_queries(q)
    store.record(Answer(q[0].id, "left"))
    with open(tmp_path / "labels.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "ghost", "label": "left", "shard": "segments/00000.npz"}) + "\n")
    with pytest.raises(PreferenceError, match="unknown comparison id 'ghost'"):
        load_labels(tmp_path)
    with pytest.raises(PreferenceError, match="observations of shape"):
        (tmp_path / "labels.jsonl").write_text((tmp_path / "labels.jsonl").read_text().splitlines()[0] + "\n")
        load_labels(tmp_path, obs_shape=(99,))
    with pytest.raises(PreferenceError, match="no labels at"):
        load_labels(tmp_path / "elsewhere")


def test_torn_last_line_is_ignored_and_import_copies_labels(tmp_path, linear):
    src = LabelStore(tmp_path / "a")
    qs = _queries(linear, 3)
    src.save_queries(qs)
    for q in qs:
        src.record(Answer(q.id, "left"))
    with open(tmp_path / "a" / "labels.jsonl", "a") as fh:
        fh.write('{"id": "half')  # a crash in the middle of an append
    loaded = load_labels(tmp_path / "a")
    assert len(loaded) == 3
    dst = LabelStore(tmp_path / "b")
    dst.import_comparisons(loaded, source=str(tmp_path / "a"))
    dst.import_comparisons(loaded, source=str(tmp_path / "a"))  # idempotent
    again = load_labels(tmp_path / "b")
    assert [c.id for c in again] == [q.id for q in qs]
