"""Reward heads on frozen features: the reading, the ensemble's score, the fit, online refits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from palate.data.formats import Comparison
from palate.data.tasks import load_task
from palate.lm.formatting import encode_prompt_completion, pad_batch
from palate.lm.reward import RewardModel, load_reward_model, truncate_backbone
from palate.lm.reward_features import (
    FeatureCache,
    _selection_accuracy,
    comparison_batch,
    comparison_metrics,
    fit_ensemble,
    refit,
)
from palate.lm.testing import tiny_causal_lm

GOOD = ["It was wonderful, I loved it.", "Great fun and lovely.", "A happy, good day."]
BAD = ["It was awful and sad.", "Terrible, bad, boring.", "I hated it, horrible."]


pytestmark = pytest.mark.usefixtures("one_thread")


def _feature_rm(n_heads: int = 3, k: float = 0.0, n_layers: int = 1) -> tuple[RewardModel, object]:
    model, tok = tiny_causal_lm(seed=2)
    rm = RewardModel.from_causal_lm(model, max_length=64, n_heads=n_heads, pool="mean", conservative_k=k,
                                    n_layers=n_layers)
    rm.eval()
    return rm, tok


def test_mean_reading_averages_the_completion_tokens_only_under_any_padding() -> None:
    rm, tok = _feature_rm(n_layers=1)
    assert len(rm.backbone.layers) == 1 and rm.backbone.config.num_hidden_layers == 1
    pairs = [("The movie was", "great fun."), ("Hi", "ok"), ("The food was", "cold and bland, sadly.")]
    enc = [encode_prompt_completion(tok, p, c, False, 64) for p, c in pairs]
    for side in ("left", "right"):
        batch = pad_batch(enc, tok.pad_token_id, padding_side=side)
        got = rm.pooled(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        for i, e in enumerate(enc):
            hidden = rm.backbone(input_ids=torch.tensor([e["input_ids"]])).last_hidden_state[0]
            on = torch.tensor(e["completion_mask"]).bool()
            assert torch.allclose(got[i], hidden[on].mean(0), atol=1e-5), side
    with pytest.raises(ValueError, match="completion_mask"):
        rm.pooled(batch["input_ids"], batch["attention_mask"])


def test_ensemble_score_is_mean_minus_k_std_and_round_trips(tmp_path: Path) -> None:
    rm, tok = _feature_rm(n_heads=3, k=0.5)
    prompts, completions = ["The movie was"] * 4, GOOD[:2] + BAD[:2]
    per_head = rm.score_texts(prompts, completions, tok, per_head=True)
    assert per_head.shape == (4, 3)
    expected = per_head.mean(1) - 0.5 * per_head.std(1)
    assert torch.allclose(rm.score_texts(prompts, completions, tok), expected, atol=1e-5)
    rm.set_normalization(rm.score_texts(prompts, completions, tok, per_head=True))
    normed = rm.score_texts(prompts, completions, tok, per_head=True)
    assert torch.allclose(normed.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(normed.std(0), torch.ones(3), atol=1e-4)
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    loaded, loaded_tok = load_reward_model(tmp_path / "rm")
    assert (loaded.pool, loaded.n_heads, loaded.conservative_k) == ("mean", 3, 0.5)
    assert len(loaded.backbone.layers) == 1
    assert torch.allclose(loaded.score_texts(prompts, completions, loaded_tok),
                          rm.score_texts(prompts, completions, tok), atol=1e-5)


def test_value_model_starts_from_the_heads_mean() -> None:
    from palate.lm.ppo import ValueModel

    rm, tok = _feature_rm(n_heads=3)
    with torch.no_grad():
        rm.gain.copy_(torch.tensor([0.5, 2.0, 1.0]))
        rm.bias.copy_(torch.tensor([0.1, -0.3, 0.0]))
    value = ValueModel.from_reward_model(rm)
    h = torch.randn(5, rm.head.in_features)
    assert torch.allclose(value.head(h).squeeze(-1), rm.combine(rm.head(h)), atol=1e-5)


def test_mean_plus_last_reading_concatenates_both_and_round_trips(tmp_path: Path) -> None:
    from palate.errors import ConfigError
    from palate.lm.ppo import ValueModel

    model, tok = tiny_causal_lm(seed=2)
    both = RewardModel.from_causal_lm(copy.deepcopy(model), max_length=64, n_heads=2, pool="mean+last", n_layers=1)
    mean = RewardModel.from_causal_lm(copy.deepcopy(model), max_length=64, pool="mean", n_layers=1)
    last = RewardModel.from_causal_lm(copy.deepcopy(model), max_length=64, pool="last", n_layers=1)
    assert both.frozen_features and both.head.in_features == 2 * model.config.hidden_size
    batch = both.encode_texts(["The movie was", "Hi"], ["great fun.", "ok"], tok)
    with torch.no_grad():
        got = both.pooled(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        want = torch.cat([mean.pooled(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]),
                          last.pooled(batch["input_ids"], batch["attention_mask"])], -1)
    assert torch.allclose(got, want, atol=1e-5)
    both.save_pretrained(tmp_path / "rm", tokenizer=tok)
    loaded, loaded_tok = load_reward_model(tmp_path / "rm")
    assert loaded.pool == "mean+last"
    assert torch.allclose(loaded.score_texts(["a"], ["good"], loaded_tok), both.score_texts(["a"], ["good"], tok),
                          atol=1e-5)
    # The value reads one hidden state per position: both halves of the head weigh it.
    value = ValueModel.from_reward_model(both)
    h = torch.randn(3, model.config.hidden_size)
    assert torch.allclose(value.head(h).squeeze(-1), both.combine(both.head(torch.cat([h, h], -1))), atol=1e-5)
    with pytest.raises(ConfigError, match="pool must be one of"):
        RewardModel.from_causal_lm(copy.deepcopy(model), pool="max")
    from palate.lm.reward import RMConfig

    with pytest.raises(ConfigError, match="features_pool: mean\\+last reads frozen features"):
        RMConfig(model="m", train_data="t.jsonl", features_pool="mean+last").validate()


def test_truncate_backbone_rejects_a_layer_count_outside_the_model() -> None:
    from palate.errors import ConfigError

    model, _ = tiny_causal_lm()
    with pytest.raises(ConfigError, match="features_layer must be in 1.."):
        truncate_backbone(copy.deepcopy(model.get_decoder()), 99)


def _comparisons(prompts: list[str], labeller_names, rng) -> list[Comparison]:
    task = load_task("sentiment")
    out = []
    for i, p in enumerate(prompts):
        cands = [GOOD[i % 3], BAD[i % 3], GOOD[(i + 1) % 3], BAD[(i + 2) % 3]]
        for name in labeller_names(i):
            lab = task.panel.get(name)
            out.append(Comparison(p, cands, lab.compare(p, cands, rng), "ranking", labeller=name))
    return out


def test_heads_fit_on_cached_features_learn_the_labellers_preference() -> None:
    rm, tok = _feature_rm(n_heads=4)
    task = load_task("sentiment")
    rng = np.random.default_rng(0)
    names = [lab.name for lab in task.panel.train_labellers]
    comps = _comparisons(task.prompts("train")[:24], lambda i: [names[i % len(names)]], rng)
    cache = FeatureCache()
    cache.ensure(rm, tok, [(c.prompt, y) for c in comps for y in c.completions])
    assert len(cache) == len({(c.prompt, y) for c in comps for y in c.completions})
    batch = comparison_batch(comps, cache)
    weight, bias = fit_ensemble(cache.features, batch, 4, weight_decay=0.01, steps=200, seed=0)
    assert weight.shape == (4, rm.head.in_features)
    raw = (cache.features @ weight.T + bias).mean(-1)[batch["idx"]]
    assert comparison_metrics(raw, batch, prefix="rm/")["rm/accuracy"] > 0.8
    # Bootstrap resamples: the heads differ.
    assert not torch.allclose(weight[0], weight[1])


def test_selection_never_reads_the_held_out_labellers_answers() -> None:
    raw = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    batch = {"ranks": torch.tensor([[0, 1], [1, 0]]), "valid": torch.ones(2, 2, dtype=torch.bool),
             "best": torch.tensor([-1, -1]), "is_best_of_k": torch.tensor([False, False]),
             "idx": torch.zeros(2, 2, dtype=torch.long), "labeller": ["editor", "held_out"]}
    assert _selection_accuracy(raw, batch, "held_out") == 1.0  # the held-out row (wrong) is not counted
    assert comparison_metrics(raw, batch, "held_out")["rm/held_out_accuracy"] == 0.0


def test_train_reward_model_with_features_layer(tmp_path: Path) -> None:
    from palate.lm.reward import RMConfig, train_reward_model

    model, tok = tiny_causal_lm(seed=3)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    task = load_task("sentiment")
    rng = np.random.default_rng(1)
    names = [lab.name for lab in task.panel.train_labellers]
    for path, prompts, labs in (("train.jsonl", task.prompts("train")[:20], lambda i: [names[i % len(names)]]),
                                ("val.jsonl", task.prompts("validation")[:6],
                                 lambda i: [lab.name for lab in task.panel.labellers])):
        with open(tmp_path / path, "w") as fh:
            for c in _comparisons(prompts, labs, rng):
                fh.write(json.dumps(c.to_json()) + "\n")
    run = train_reward_model(RMConfig(
        model=str(tmp_path / "tiny"), train_data=str(tmp_path / "train.jsonl"), val_data=str(tmp_path / "val.jsonl"),
        task="sentiment", features_layer=1, ensemble=3, conservative_k=0.5, head_weight_decay=[0.01, 1.0],
        head_steps=100, features_pool="mean+last", max_length=64, runs_dir=str(tmp_path / "runs"), tensorboard=False))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["head_weight_decay"] in (0.01, 1.0) and summary["ensemble"] == 3
    for key in ("rm/accuracy", "rm/val_accuracy", "rm/held_out_accuracy", "rm/val_ece", "rm/val_accuracy_wd/0.01",
                "rm/val_accuracy_wd/1"):
        assert key in summary, key
    assert summary["normalized_on"] == 6 * 4
    rm, rm_tok = load_reward_model(run)
    assert rm.frozen_features and rm.n_heads == 3 and rm.extra_meta["head_weight_decay"] == summary["head_weight_decay"]
    assert rm.pool == "mean+last" and rm.head.in_features == 2 * model.config.hidden_size
    cache = FeatureCache.load(run / "model")
    assert len(cache) == summary["texts"] and len(cache.ref) == 24
    # Normalised on the validation completions, through the heads exactly as PPO will score them.
    ref = cache.ref
    normed = rm.score_texts([p for p, _ in ref], [c for _, c in ref], rm_tok, per_head=True)
    assert torch.allclose(normed.mean(0), torch.zeros(3), atol=1e-3)

    # An online round's refit: new comparisons' texts are cached, the heads change, the scale stays.
    new = _comparisons(["The concert was", "The hotel was"], lambda i: [names[0]], rng)
    cache.ensure(rm, rm_tok, [(c.prompt, y) for c in new for y in c.completions])
    head_before = rm.head.weight.detach().clone()
    from palate.data.formats import read_comparisons

    stats = refit(rm, cache, read_comparisons(tmp_path / "train.jsonl") + new)
    assert np.isfinite(stats["loss"]) and not torch.equal(rm.head.weight, head_before)
    normed = rm.score_texts([p for p, _ in ref], [c for _, c in ref], rm_tok, per_head=True)
    assert torch.allclose(normed.std(0), torch.ones(3), atol=1e-3)


def test_online_collector_refits_a_feature_rm_and_checkpoints_only_its_heads(tmp_path: Path) -> None:
    from palate.lm.online import OnlineCollector, RoundRobinPanel
    from palate.lm.ppo import LMPPOConfig, LMPPOTrainer, ValueModel

    model, tok = tiny_causal_lm()
    rm = RewardModel.from_causal_lm(copy.deepcopy(model), max_length=64, n_heads=2, pool="mean", n_layers=1)
    rm.requires_grad_(False)
    rm.eval()
    task = load_task("sentiment")
    collector = OnlineCollector(rm, tok, RoundRobinPanel(task.panel), k=3, n_prompts=3, max_length=64, seed=0)
    assert collector.optimizer is None and collector.features is not None
    cfg = LMPPOConfig(reward_model="unused", batch_size=4, mini_batch_size=4, iterations=3, max_new_tokens=6,
                      device="cpu", ppo_epochs=1, online_every=2)
    trainer = LMPPOTrainer(cfg, model, tok, ValueModel.from_reward_model(rm),
                           lambda p, c: rm.score_texts(list(p), list(c), tok, batch_size=4),
                           ["The movie was", "The food was", "Write a short poem", "List three colours"],
                           lambda p: tok.encode(p), reference=copy.deepcopy(model), online=collector)
    head_before = rm.head.weight.detach().clone()
    trainer.train(tmp_path)
    assert not torch.equal(rm.head.weight, head_before)
    assert len(collector.features) == sum(len(c.completions) for c in collector.comparisons) > 0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["online"]
    assert not any(k.startswith("backbone.") for k in state["rm"])
    fresh = OnlineCollector(copy.deepcopy(rm), tok, RoundRobinPanel(task.panel), k=3, n_prompts=3, seed=0)
    with torch.no_grad():
        fresh.rm.head.weight.zero_()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.rm.head.weight, rm.head.weight) and len(fresh.features) == len(collector.features)
