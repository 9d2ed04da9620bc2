"""Built-in tasks: shipped prompt splits, the labeller panel's behaviour, programmatic rewards."""

from __future__ import annotations

import numpy as np
import pytest

from palate.data.tasks import Labeller, format_score, load_task, repetition, task_names, vader_compound
from palate.errors import DataError


@pytest.mark.parametrize("name", ["sentiment", "instruct"])
def test_tasks_ship_hundreds_of_prompts_in_disjoint_fixed_splits(name: str) -> None:
    task = load_task(name)
    splits = {s: task.prompts(s) for s in ("train", "validation", "test")}
    assert sum(map(len, splits.values())) >= 300
    assert all(len(v) >= 30 for v in splits.values())
    assert not set(splits["train"]) & set(splits["validation"])
    assert not set(splits["train"]) & set(splits["test"])
    assert splits == {s: load_task(name).prompts(s) for s in splits}
    assert task.max_new_tokens > 0 and task.chat is (name == "instruct")
    assert task.panel.held_out not in task.panel.train_labellers
    assert len(task.panel.train_labellers) >= 3
    assert len({tuple(sorted(lab.weights.items())) for lab in task.panel.labellers}) == len(task.panel.labellers)


def test_unknown_task_and_split() -> None:
    assert task_names() == ["instruct", "sentiment"]
    with pytest.raises(DataError, match="built-in tasks are"):
        load_task("poetry")
    with pytest.raises(DataError, match="unknown split"):
        load_task("sentiment").prompts("dev")  # type: ignore[arg-type]


def test_noiseless_labeller_ranks_by_utility_with_ties_for_identical_texts() -> None:
    lab = Labeller("exact", {"x": 1.0}, 0.0, lambda p, c: {"x": float(len(c))})
    rng = np.random.default_rng(0)
    assert lab.compare("p", ["aa", "a", "aaa", "a"], rng) == [1, 2, 0, 2]
    assert lab.best_of("p", ["aa", "a", "aaa"], rng) == 2


def test_labeller_noise_follows_bradley_terry_at_its_temperature() -> None:
    lab = Labeller("noisy", {"x": 1.0}, 0.5, lambda p, c: {"x": 0.4 if c == "a" else 0.0})
    rng = np.random.default_rng(1)
    wins = np.mean([lab.compare("p", ["a", "b"], rng)[0] == 0 for _ in range(4000)])
    assert wins == pytest.approx(1 / (1 + np.exp(-0.4 / 0.5)), abs=0.025)


def test_sentiment_reward_is_vader_and_panel_prefers_positive() -> None:
    task = load_task("sentiment")
    prompt = task.prompts("train")[0]
    good, bad = "it was a wonderful, happy day and I loved it.", "it was awful, sad and I hated it."
    assert task.reward_fn([prompt, prompt], [good, bad]) == [vader_compound(good), vader_compound(bad)]
    assert vader_compound(good) > 0.5 > -0.5 > vader_compound(bad)
    for lab in task.panel.labellers:
        assert lab.score(prompt, good) > lab.score(prompt, bad)


def test_instruct_rubric_rewards_format_topic_and_no_repetition() -> None:
    task = load_task("instruct")
    prompt = "Write two sentences about the sea."
    assert prompt in task.prompts("train") + task.prompts("validation") + task.prompts("test")
    good = "The sea is wide and blue. Waves roll onto the shore."
    off_topic = "Mountains are tall. They have snow."
    repeated = "The sea the sea the sea the sea the sea the sea"
    r_good, r_off, r_rep = task.reward_fn([prompt] * 3, [good, off_topic, repeated])
    assert r_good > r_off and r_good > r_rep
    assert format_score({"kind": "list", "n": 3}, "1. a\n2. b\n3. c") == 1.0
    assert format_score({"kind": "max_words", "n": 1}, "Blue.") == 1.0
    assert repetition("a b c a b c a b c") > 0.5 and repetition("one two three four") == 0.0
