"""Online collection: new comparisons from the current policy, training labellers only, RM retrained."""

import copy

import numpy as np
import pytest
import torch

from palate.data.tasks import load_task
from palate.lm.online import OnlineCollector, RoundRobinPanel, pairwise_accuracy
from palate.lm.ppo import LMPPOConfig, LMPPOTrainer, ValueModel, read_metrics
from palate.lm.reward_model import RewardModel
from palate.lm.testing import tiny_causal_lm
from palate.runs import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pairwise_accuracy_skips_ties():
    assert pairwise_accuracy(torch.tensor([3.0, 2.0, 1.0]), [0, 1, 2]) == (3, 3)
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0]), [0, 0, 1]) == (0, 2)


def test_round_robin_panel_never_asks_the_held_out_labeller():
    task = load_task("sentiment")
    panel = RoundRobinPanel(task.panel)
    rng = np.random.default_rng(0)
    names = set()
    for _ in range(2 * len(task.panel.labellers)):
        panel.compare("p", ["good", "bad"], rng)
        names.add(panel.last_name)
    assert task.panel.held_out_name not in names
    assert names == {lab.name for lab in task.panel.train_labellers}


def test_online_round_adds_labels_retrains_rm_and_logs_a_phase(tmp_path):
    seed_everything(0)
    model, tok = tiny_causal_lm()
    rm = RewardModel.from_causal_lm(copy.deepcopy(model))
    rm.eval()
    task = load_task("sentiment")
    collector = OnlineCollector(rm, tok, RoundRobinPanel(task.panel), k=3, n_prompts=3, rm_epochs=2,
                                learning_rate=1e-3, batch_size=2, max_length=64, seed=0)
    cfg = LMPPOConfig(reward_model="unused", batch_size=4, mini_batch_size=4, iterations=3, max_new_tokens=6,
                      device="cpu", ppo_epochs=1, online_every=2)

    def score(prompts, completions):
        return rm.score_texts(list(prompts), list(completions), tok, batch_size=4)

    trainer = LMPPOTrainer(cfg, model, tok, ValueModel.from_reward_model(rm), score,
                           ["The movie was", "The food was", "Write a short poem", "List three colours"],
                           lambda p: tok.encode(p), reference=copy.deepcopy(model), online=collector)
    head_before = rm.head.weight.detach().clone()
    trainer.train(tmp_path)
    online = read_metrics(tmp_path, phase="online")
    assert [r["step"] for r in online] == [2]  # before iteration 3, after M = 2 iterations
    assert online[0]["online/labels"] > 0
    assert online[0]["online/comparisons_total"] == len(collector.comparisons) > 0
    assert all(c.labeller != task.panel.held_out_name for c in collector.comparisons)
    assert not torch.equal(rm.head.weight, head_before)  # the reward model was retrained
    assert len(read_metrics(tmp_path)) == 3
    # The labels and the retrained RM travel in the checkpoint.
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["online"]
    assert len(state["comparisons"]) == len(collector.comparisons)
