"""The reward-model ceiling diagnostic: features read the right rows, the probe learns a linear score."""

import torch

from palate.bench.rm_ceiling import _pairs, accuracy, extract_features, fit_probe
from palate.lm.testing import tiny_causal_lm


def test_pairs_skip_ties_and_orient_winner_first():
    assert _pairs([10, 11, 12], [1, 0, 1], "a") == [(11, 10, "a"), (11, 12, "a")]


def test_probe_recovers_a_linear_preference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen)
    true = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    idx = torch.randint(0, 200, (600, 2), generator=gen)
    train = [(int(a), int(b), "") if true[a] > true[b] else (int(b), int(a), "") for a, b in idx if a != b]
    scores = fit_probe(x, train, weight_decay=1e-3)
    assert accuracy(scores, train) > 0.95


def test_features_match_a_single_sequence_forward():
    model, tok = tiny_causal_lm(num_layers=2)
    model.eval()
    texts = [("hello there", " a longer completion here"), ("hi", " ok")]
    batched = extract_features(model, tok, texts, layers=[1, 2], chat=False, batch_size=2)
    alone = extract_features(model, tok, texts[1:], layers=[1, 2], chat=False, batch_size=1)
    assert batched["last2"].shape == (2, model.config.hidden_size)
    torch.testing.assert_close(batched["last2"][1], alone["last2"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched["mean1"][1], alone["mean1"][0], atol=1e-4, rtol=1e-4)
