"""The human labeller against the real feedback service (in process), through the async channel."""

import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from palate.errors import PreferenceError
from palate.feedback.client import FeedbackClient
from palate.feedback.server import create_app
from palate.preferences.channels import AsyncChannel as _AsyncChannel
from palate.preferences.labellers import HumanLabeller, Query
from palate.preferences.render import SegmentRenderer
from palate.preferences.segments import Segment, SegmentPair
from palate.preferences.storage import LabelStore, load_labels


def _pendulum_pair(rng):
    def seg():
        theta = rng.uniform(-np.pi, np.pi) + np.linspace(0, 1, 6)
        obs = np.stack([np.cos(theta), np.sin(theta), np.ones(6)], axis=1).astype(np.float32)
        return Segment(obs, np.zeros((6, 1), np.float32), np.zeros(6))

    return SegmentPair(seg(), seg())


@pytest.fixture
def service(tmp_path):
    app = create_app(tmp_path / "fb.sqlite", data_dir=tmp_path / "data")
    store = app.state.store
    admin = store.create_token("trainer", "admin", all_projects=True)
    alice = store.create_token("alice", "labeller", ["prefs-test"])
    with TestClient(app) as run_http, TestClient(app) as alice_http:
        yield (FeedbackClient("http://testserver", admin, http=run_http),
               FeedbackClient("http://testserver", alice, http=alice_http))


def _answer_all(person, choices, timeout=20.0):
    """Answer tasks as they appear (the run's thread queues them in the background)."""
    deadline = time.monotonic() + timeout
    for choice in choices:
        task, _ = person.next_task("prefs-test")
        while task is None and time.monotonic() < deadline:
            time.sleep(0.05)
            task, _ = person.next_task("prefs-test")
        assert task is not None, "the run's pair task should be waiting"
        person.answer(task["id"], {"choice": choice})


def test_human_answers_flow_back_as_durable_labels(tmp_path, service):
    run_client, alice = service
    labeller = HumanLabeller(run_client, SegmentRenderer("Pendulum-v1"), project="prefs-test", poll_interval=0.01)
    store = LabelStore(tmp_path / "run")
    channel = _AsyncChannel(labeller, store, max_pending=8, poll_s=0.01)
    queries = [Query.new(_pendulum_pair(np.random.default_rng(k))) for k in range(2)]
    assert channel.offer(queries) == 2
    _answer_all(alice, ["left", "cant_tell"])
    got = channel.close(wait_s=20)
    assert store.pending == 0
    assert sorted(c.id for c in got) == sorted(q.id for q in queries)
    lines = [json.loads(x) for x in (tmp_path / "run" / "labels.jsonl").read_text().splitlines()]
    assert sorted(x["label"] for x in lines) == ["cant_tell", "left"]
    assert all(x["labeller"] == "human" and x["answer_meta"]["labeller_id"] == "alice" for x in lines)
    assert [c.label for c in load_labels(tmp_path / "run")] == ["left"]


def test_answer_to_a_task_the_run_never_created_raises(tmp_path, service):
    run_client, alice = service
    labeller = HumanLabeller(run_client, SegmentRenderer("Pendulum-v1"), project="prefs-test")
    # Someone else queues a pair in the same project, and Alice answers it.
    sha = run_client.upload_media(SegmentRenderer("Pendulum-v1")(_pendulum_pair(np.random.default_rng(0)).left))
    run_client.create_pair_tasks("prefs-test", [{"left": {"media": sha}, "right": {"media": sha},
                                                 "external_id": "foreign"}])
    _answer_all(alice, ["right"])
    with pytest.raises(PreferenceError, match="task 1 \\(comparison 'foreign'\\).*never created"):
        labeller.collect()


def test_people_label_atari_clips_rendered_from_frames(tmp_path, service):
    pytest.importorskip("ale_py")
    pytest.importorskip("cv2")
    from palate.preferences.config import PreferenceConfig
    from palate.preferences.wrappers import make_env_factory

    env = make_env_factory(PreferenceConfig(env="PongNoFrameskip-v4"))()
    obs, _ = env.reset(seed=0)
    frames = []
    for _ in range(50):
        frames.append(obs)
        obs, *_ = env.step(env.action_space.sample())
    env.close()
    clips = [Segment(np.stack(frames[k:k + 25]), np.zeros(25, np.int64), np.zeros(25)) for k in (0, 25)]
    run_client, alice = service
    labeller = HumanLabeller(run_client, SegmentRenderer("PongNoFrameskip-v4"), project="prefs-test",
                             poll_interval=0.01)
    store = LabelStore(tmp_path / "run")
    channel = _AsyncChannel(labeller, store, max_pending=8, poll_s=0.01)
    query = Query.new(SegmentPair(*clips))
    assert channel.offer([query]) == 1
    _answer_all(alice, ["right"])
    got = channel.close(wait_s=20)
    assert [(c.id, c.label) for c in got] == [(query.id, "right")]
    (saved,) = load_labels(tmp_path / "run")
    assert saved.pair.left.obs.dtype == np.uint8 and saved.pair.left.obs.shape == (25, 4, 84, 84)
