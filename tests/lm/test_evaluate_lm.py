"""Evaluation: win rate by a judge, KL to the reference, perplexity, diversity statistics."""

import copy

import numpy as np
import pytest
import torch

from palate.lm.evaluate import distinct_n, evaluate_models, repeated_ngram_fraction, win_rate
from palate.lm.pretrain_text import pack_tokens
from palate.lm.testing import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


class LongerIsBetter:
    """A deterministic local judge: prefers the longer text, ties on equal length."""

    name = "longer"

    def compare(self, prompt, completions, rng):
        lengths = [len(c) for c in completions]
        order = sorted(set(lengths), reverse=True)
        return [order.index(n) for n in lengths]

    def score(self, prompt, completion):
        return float(len(completion))


def test_win_rate_counts_ties_as_half():
    rate, outcomes = win_rate(LongerIsBetter(), ["p"] * 4, ["aaa", "a", "bb", "x"], ["a", "aaa", "cc", "y"],
                              np.random.default_rng(0))
    assert outcomes == [1.0, 0.0, 0.5, 0.5]
    assert rate == 0.5


def test_diversity_statistics_by_hand():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert repeated_ngram_fraction("a b c a b c", n=3) == pytest.approx(1 - 3 / 4)
    assert repeated_ngram_fraction("too short", n=3) == 0.0


def test_evaluate_identical_models_then_a_moved_policy():
    torch.manual_seed(0)
    model, tok = tiny_causal_lm()
    reference = copy.deepcopy(model)
    blocks = pack_tokens(tok, ["The quick brown fox jumps over the lazy dog."] * 8, 16)
    prompts = ["The movie was", "List three colours"]

    def run(policy):
        return evaluate_models(policy, reference, tok, prompts, lambda p: tok.encode(p), LongerIsBetter(),
                               lambda ps, cs: [float(len(c)) for c in cs], max_new_tokens=6,
                               samples_per_prompt=3, ppl_blocks=blocks, seed=0)

    metrics, samples = run(model)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the same weights: no divergence
    assert metrics["perplexity"] == pytest.approx(metrics["perplexity_reference"])
    assert metrics["n_comparisons"] == len(samples) == 6
    assert 0.0 <= metrics["win_rate"] <= 1.0
    assert {"policy/length_tokens", "reference/distinct_2", "policy/repetition_3gram"} <= set(metrics)
    # Sampling is seeded per model, so the report's before/after table is reproducible.
    again, _ = run(model)
    assert again["win_rate"] == metrics["win_rate"]

    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.model.layers[-1].parameters():
            p.add_(0.5 * torch.randn_like(p))
    metrics, _ = run(moved)
    assert metrics["kl"] > 0.01
    assert metrics["perplexity"] != pytest.approx(metrics["perplexity_reference"])


@pytest.mark.parametrize("moved_block", [0, -1])
def test_kl_from_the_generation_trace_and_shared_prefix_equals_two_full_passes(moved_block):
    """The eval's KL reads log pi off generation and, when only the top blocks moved, runs the reference
    from the policy's hidden state there; it must equal log pi - log rho from two full forwards."""
    from palate.lm.evaluate import _policy_kl
    from palate.lm.generation import response_logprobs, row_seed
    from palate.lm.prefix import shared_blocks

    torch.manual_seed(0)
    reference, tok = tiny_causal_lm()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.model.layers[moved_block].parameters():
            p.add_(0.3 * torch.randn_like(p))
    n_layers = len(policy.model.layers)
    assert shared_blocks(policy, reference) == (0 if moved_block == 0 else n_layers - 1)
    ids = [tok.encode(p) for p in ["The movie was", "List three colours", "A"]]
    batches, texts, kls = _policy_kl(policy, reference, tok, ids, 6, 1.0, 2, [row_seed(0, 0, i) for i in range(3)])
    assert len(texts) == len(kls) == 3
    full = [v for b in batches for v in (response_logprobs(policy, b) - response_logprobs(reference, b)).sum(1).tolist()]
    assert kls == pytest.approx(full, abs=1e-4)
    assert max(abs(k) for k in kls) > 1e-3
