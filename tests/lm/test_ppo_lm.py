"""PPO for language models on tiny random Llamas: rollouts, masks, value init, learning, resume."""

import copy
import dataclasses

import pytest
import torch

from palate.errors import ConfigError
from palate.lm.generation import decode_responses, response_logprobs, sample
from palate.lm.ppo import LMPPOConfig, LMPPOTrainer, ValueModel, lora_config
from palate.lm.testing import tiny_causal_lm
from palate.runs import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = ["The movie was", "I did not like the food, it was cold", "Write a short poem", "List three colours"]


def count_e(prompts, completions):
    """The simple reward of the learning test: how often the letter 'e' appears."""
    return [float(c.count("e")) for c in completions]


def make_trainer(cfg, seed=0, lora=False, score=count_e):
    seed_everything(seed)
    model, tok = tiny_causal_lm(seed=seed)
    value = ValueModel.from_causal_lm(model)
    reference = None
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(4, 8, "CAUSAL_LM"))
    else:
        reference = copy.deepcopy(model)
    return LMPPOTrainer(cfg, model, tok, value, score, PROMPTS, lambda p: tok.encode(p), reference=reference)


def test_recomputed_logprobs_match_unpadded_rows_and_masks_stop_at_eos():
    seed_everything(0)
    model, tok = tiny_causal_lm()
    prompts = [tok.encode(p) for p in PROMPTS]
    batch = sample(model, tok, prompts, max_new_tokens=10)
    assert batch.query_mask.sum(1).tolist() == [len(p) for p in prompts]  # left padding
    logp = response_logprobs(model, batch)
    for i, p in enumerate(prompts):
        real = batch.response_ids[i][batch.response_mask[i].bool()]
        ids = torch.tensor([p + real.tolist()])
        ref = model(ids).logits[0, len(p) - 1:-1].log_softmax(-1).gather(-1, real[:, None]).squeeze(-1)
        torch.testing.assert_close(logp[i][batch.response_mask[i].bool()], ref, atol=1e-5, rtol=1e-5)
        assert torch.all(logp[i][~batch.response_mask[i].bool()] == 0)
    # Make EOS overwhelmingly likely: every response must end at its first token, an EOS.
    boost = torch.zeros(model.config.vocab_size)
    boost[tok.eos_token_id] = 100.0
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + boost)
    batch = sample(model, tok, prompts, max_new_tokens=6)
    assert batch.ended.all()
    assert (batch.response_ids[:, 0] == tok.eos_token_id).all()
    assert batch.response_mask.sum(1).tolist() == [1] * len(prompts)
    assert decode_responses(tok, batch) == [""] * len(prompts)


def test_value_model_starts_equal_to_reward_model():
    from palate.lm.reward_model import RewardModel

    model, tok = tiny_causal_lm()
    rm = RewardModel.from_causal_lm(copy.deepcopy(model))
    with torch.no_grad():
        rm.gain.fill_(2.5)
        rm.bias.fill_(-0.7)
    value = ValueModel.from_reward_model(rm)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        v = value(ids, mask)[:, -1]
        r = rm(ids, mask)
    torch.testing.assert_close(v, r, atol=1e-5, rtol=1e-5)
    # A value model from the policy starts at zero everywhere.
    assert torch.all(ValueModel.from_causal_lm(model)(ids, mask) == 0)


def test_lora_reference_is_the_policy_with_adapters_disabled():
    cfg = LMPPOConfig(reward_fn="x", batch_size=4, mini_batch_size=4, iterations=1, learning_rate=1e-2,
                      max_new_tokens=6, device="cpu", ppo_epochs=2)
    trainer = make_trainer(cfg, lora=True)
    ro = trainer.rollout()
    # Fresh LoRA adapters (B = 0) leave the policy equal to the reference: KL exactly 0.
    torch.testing.assert_close(ro.logprobs, ro.ref_logprobs)
    trainer.update(ro)
    again = trainer._forward_rollout(ro.batch)
    assert not torch.allclose(again[0], ro.logprobs)  # the policy moved
    torch.testing.assert_close(again[1], ro.ref_logprobs)  # the reference did not


def test_missing_eos_penalty_applies_only_to_unfinished_completions():
    cfg = LMPPOConfig(reward_fn="x", batch_size=4, mini_batch_size=4, device="cpu", missing_eos_penalty=1.5,
                      kl_coef=0.0, whiten_advantages=False)
    trainer = make_trainer(cfg, score=lambda p, c: [0.0] * len(c))
    ro = trainer.rollout()
    last = ro.batch.response_mask.sum(1) - 1
    final_rewards = ro.rewards[torch.arange(len(last)), last]
    expected = torch.where(ro.batch.ended, 0.0, -1.5)
    torch.testing.assert_close(final_rewards, expected)


@pytest.mark.slow
def test_tiny_ppo_raises_a_simple_reward():
    # 14 iterations: at 10 the reward had only begun to climb on some CPUs' kernels (0.5 -> 1.4).
    cfg = LMPPOConfig(reward_fn="x", batch_size=16, mini_batch_size=8, iterations=14, learning_rate=3e-3,
                      max_new_tokens=12, kl_coef=0.01, adaptive_kl=False, device="cpu", ppo_epochs=4, seed=0)
    trainer = make_trainer(cfg)
    rewards = [trainer.step()[0]["objective/reward"] for _ in range(cfg.iterations)]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 2 * first and last > first + 1.0, rewards


def test_resume_continues_bit_for_bit(tmp_path):
    cfg = LMPPOConfig(reward_fn="x", batch_size=4, mini_batch_size=2, iterations=4, learning_rate=1e-3,
                      max_new_tokens=5, device="cpu", ppo_epochs=1, save_every=2, adaptive_kl=True, kl_target=0.5)
    straight = make_trainer(cfg)
    straight.train(tmp_path / "a")
    interrupted = make_trainer(dataclasses.replace(cfg, iterations=2))
    interrupted.train(tmp_path / "b")
    # A fresh trainer starts from the initial weights and RNG: steps 3-4 match only if the
    # checkpoint restores the trained weights, optimiser, beta, samplers and RNG.
    resumed = make_trainer(cfg)
    resumed.train(tmp_path / "b", resume=True)
    from palate.lm.ppo import read_metrics

    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("objective/reward", "objective/kl", "objective/kl_coef", "losses/policy_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), key
    assert (tmp_path / "b" / "model" / "config.json").is_file()
    assert (tmp_path / "b" / "summary.json").is_file()


def test_frozen_prefix_cache_gives_the_same_updates_as_full_passes():
    """With only the top block trained, the cached-prefix path must follow the full-pass path."""
    from palate.lm.trainable import freeze_all_but_last_layers

    def run(cache, reuse=True):
        cfg = LMPPOConfig(reward_fn="x", batch_size=4, mini_batch_size=2, iterations=2, learning_rate=1e-2,
                          max_new_tokens=6, device="cpu", ppo_epochs=2, trainable_layers=1, cache_frozen_prefix=cache,
                          reuse_generation=reuse)
        seed_everything(0)
        model, tok = tiny_causal_lm(seed=0)
        value = ValueModel.from_causal_lm(model)
        reference = copy.deepcopy(model)
        freeze_all_but_last_layers(model, 1)
        freeze_all_but_last_layers(value.backbone, 1)
        trainer = LMPPOTrainer(cfg, model, tok, value, count_e, PROMPTS, lambda p: tok.encode(p), reference=reference)
        metrics = [trainer.step()[0] for _ in range(cfg.iterations)]
        return trainer, metrics

    # Both recompute log pi with a policy forward: generation's values differ in the last bits, and
    # where a gradient is exactly 0 on one path Adam turns 1e-8 on the other into a full step.
    cached, m_cached = run(True, reuse=False)
    full, m_full = run(False, reuse=False)
    assert (cached.unwrapped.policy_start, cached.unwrapped.value_start, cached.ref_shares_prefix) == (1, 1, True)
    assert (full.unwrapped.policy_start, full.unwrapped.value_start) == (0, 0)
    for a, b in zip(m_cached, m_full):
        for key in ("objective/reward", "objective/kl", "losses/policy_loss", "losses/value_loss", "ppo/clipfrac"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    for (name, p), q in zip(cached.unwrapped.named_parameters(), full.unwrapped.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_value_head_alone_on_frozen_features_matches_full_passes():
    """value_trainable_layers: 0 trains only the value head, on the backbone output cached at rollout."""
    from palate.lm.trainable import make_trainable

    def run(cache):
        cfg = LMPPOConfig(reward_fn="x", batch_size=4, mini_batch_size=2, iterations=2, learning_rate=1e-2,
                          max_new_tokens=6, device="cpu", ppo_epochs=2, trainable_layers=1, value_trainable_layers=0,
                          cache_frozen_prefix=cache, reuse_generation=False)
        seed_everything(0)
        model, tok = tiny_causal_lm(seed=0)
        value = ValueModel.from_causal_lm(model)
        reference = copy.deepcopy(model)
        model = make_trainable(model, value, 0, 32, cfg.trainable_layers, cfg.value_layers)
        backbone = copy.deepcopy(value.backbone.state_dict())
        trainer = LMPPOTrainer(cfg, model, tok, value, count_e, PROMPTS, lambda p: tok.encode(p), reference=reference)
        metrics = [trainer.step()[0] for _ in range(cfg.iterations)]
        return trainer, metrics, backbone

    cached, m_cached, backbone = run(True)
    full, m_full, _ = run(False)
    value = cached.unwrapped.value
    assert cached.unwrapped.value_start == value.n_layers == 2 and full.unwrapped.value_start == 0
    assert not any(p.requires_grad for p in value.backbone.parameters())
    for key, tensor in value.backbone.state_dict().items():
        assert torch.equal(tensor, backbone[key]), key  # the backbone is never trained
    assert value.head.weight.abs().sum() > 0  # the head (zero at the start) is
    for a, b in zip(m_cached, m_full):
        for key in ("objective/reward", "losses/policy_loss", "losses/value_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    torch.testing.assert_close(value.head.weight, full.unwrapped.value.head.weight, atol=1e-5, rtol=1e-4)


def test_value_trainable_layers_needs_trained_blocks():
    with pytest.raises(ConfigError, match="value_trainable_layers"):
        LMPPOConfig(reward_fn="x", value_trainable_layers=0).validate()
    with pytest.raises(ConfigError, match="value_trainable_layers"):
        LMPPOConfig(reward_fn="x", trainable_layers=2, value_trainable_layers=-1).validate()


@pytest.mark.parametrize("chunk", [None, 2])
def test_traced_sample_matches_a_full_forward(chunk):
    """log pi, entropy and the block-1 hidden state read off generation equal a full forward's."""
    from palate.lm.generation import sample_traced
    from palate.lm.prefix import forward_capture

    model, tok = tiny_causal_lm()
    prompts = [tok.encode(p) for p in PROMPTS]
    seed_everything(0)
    batch, trace = sample_traced(model, tok, prompts, max_new_tokens=8, batch_size=chunk, capture_block=1)
    seed_everything(0)
    assert torch.equal(sample(model, tok, prompts, max_new_tokens=8, batch_size=chunk).response_ids,
                       batch.response_ids)  # tracing does not change what is sampled
    logp, ent = response_logprobs(model, batch, with_entropy=True)
    torch.testing.assert_close(trace.logprobs, logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trace.entropy, ent, atol=1e-5, rtol=1e-5)
    mask = batch.attention_mask.bool()
    mask[:, -1] = False  # the last sampled token is never fed back: nothing reads its hidden state
    _, hidden = forward_capture(model, 1, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp_min(0), use_cache=False)
    assert trace.hidden.shape == hidden.shape
    torch.testing.assert_close(trace.hidden[mask], hidden[mask], atol=1e-5, rtol=1e-5)
    assert torch.all(trace.hidden[~mask] == 0)  # padding, post-EOS and that last position


def test_rollout_from_generation_equals_rollout_from_a_policy_forward():
    cfgs = [LMPPOConfig(reward_fn="x", batch_size=4, mini_batch_size=2, max_new_tokens=6, device="cpu",
                        reuse_generation=reuse) for reuse in (True, False)]
    a, b = (make_trainer(cfg).rollout() for cfg in cfgs)
    assert torch.equal(a.batch.response_ids, b.batch.response_ids)
    for name in ("logprobs", "ref_logprobs", "values", "entropy", "rewards", "advantages", "returns"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, msg=name)


def test_contiguous_head_input_keeps_logits_and_installs_once():
    from palate.lm.generation import contiguous_head_input, keep_response_logits

    model, tok = tiny_causal_lm()
    ids = torch.tensor([tok.encode("The movie was good and")])
    before = model(ids, **keep_response_logits(model, 3)).logits
    contiguous_head_input(contiguous_head_input(model))
    assert len(model.lm_head._forward_pre_hooks) == 1
    torch.testing.assert_close(model(ids, **keep_response_logits(model, 3)).logits, before)


def test_kl_budget_stops_before_the_update_that_would_pass_it_and_stays_stopped_on_resume(tmp_path):
    cfg = LMPPOConfig(reward_fn="x", batch_size=4, mini_batch_size=2, iterations=4, learning_rate=3e-3,
                      max_new_tokens=5, device="cpu", ppo_epochs=2, save_every=1, adaptive_kl=False,
                      kl_coef=0.0, kl_budget=1e-4)
    budgeted = make_trainer(cfg)
    summary = budgeted.train(tmp_path / "budget")
    # Iteration 1 samples the reference itself (KL 0); its update moves the policy, so the second
    # batch takes the 2-batch mean past the budget: that batch is not trained on, and the weights go
    # back to those that drew the first batch, the last one within the budget.
    assert summary["iterations"] == 1
    stopped = summary["stopped"]
    assert stopped["reason"] == "kl_budget" and stopped["iteration"] == 1 and stopped["policy_iteration"] == 0
    assert stopped["mean_kl_last_2"] > cfg.kl_budget >= stopped["policy_kl"]
    start = make_trainer(dataclasses.replace(cfg, kl_budget=None))
    kept, initial = budgeted._trainable_state(), start._trainable_state()
    assert all(torch.equal(kept[n], initial[n]) for n in initial)
    from palate.lm.models import load_model

    saved, _ = load_model(str(tmp_path / "budget" / "model"))
    policy = dict(budgeted.unwrapped.policy.named_parameters())
    assert all(torch.equal(p, policy[n]) for n, p in saved.named_parameters() if n in policy)
    resumed = make_trainer(cfg)
    assert resumed.train(tmp_path / "budget", resume=True)["iterations"] == 1
    from palate.lm.ppo import read_metrics

    assert [r["step"] for r in read_metrics(tmp_path / "budget")] == [1]


def test_kl_budget_must_be_positive():
    from palate.errors import ConfigError

    with pytest.raises(ConfigError, match="kl_budget"):
        LMPPOConfig(reward_fn="x", kl_budget=0.0).validate()
