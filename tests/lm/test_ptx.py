"""PPO-ptx: pretraining text, its loss in the update, and the perplexity of the alignment tax."""

import copy
import json
import math

import pytest
import torch

from palate.errors import ConfigError, DataError
from palate.lm.ppo import LMPPOConfig, LMPPOTrainer, ValueModel
from palate.lm.pretrain_text import (
    PretrainBatches,
    lm_nll,
    load_corpus,
    pack_tokens,
    perplexity,
    python_docs,
    split_corpus,
)
from palate.lm.testing import tiny_causal_lm
from palate.runs import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")


def test_python_docs_is_real_deterministic_english_with_a_stable_split():
    docs = python_docs()
    assert len(docs) > 200 and docs == python_docs()
    assert sum(len(d.split()) for d in docs) > 10000
    assert all(">>>" not in d for d in docs)
    train, held = split_corpus(docs)
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(docs)
    assert 0.03 < len(held) / len(docs) < 0.2


def test_user_corpora_txt_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("First   paragraph\nwraps here.\n\nSecond one.\n")
    assert load_corpus(str(txt)) == ["First paragraph wraps here.", "Second one."]
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "a b"}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    assert load_corpus(str(jl)) == ["a b", "c"]
    jl.write_text('{"body": 1}\n')
    with pytest.raises(DataError, match="c.jsonl:1"):
        load_corpus(str(jl))
    with pytest.raises(DataError, match="ptx_corpus"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_packing_batches_and_perplexity_by_hand():
    model, tok = tiny_causal_lm()
    blocks = pack_tokens(tok, ["The movie was wonderful.", "The quick brown fox jumps."] * 8, block_size=16)
    assert blocks.shape[1] == 16 and blocks.dtype == torch.long
    stream = PretrainBatches(blocks, batch_size=3, seed=0)
    seen = torch.cat([next(stream) for _ in range(len(blocks))])
    assert seen.shape == (3 * len(blocks), 16)
    with torch.no_grad():
        nll = float(lm_nll(model, blocks))
    assert perplexity(model, blocks, batch_size=2) == pytest.approx(math.exp(nll), rel=1e-4)


def _trainer(ptx_coef, blocks):
    seed_everything(0)
    model, tok = tiny_causal_lm()
    cfg = LMPPOConfig(reward_fn="x", batch_size=4, mini_batch_size=4, iterations=1, max_new_tokens=6,
                      device="cpu", ppo_epochs=1, ptx_coef=ptx_coef, ptx_batch_size=2)
    return LMPPOTrainer(cfg, model, tok, ValueModel.from_causal_lm(model), lambda p, c: [0.0] * len(c),
                        ["The movie was", "List three colours"], lambda p: tok.encode(p),
                        reference=copy.deepcopy(model), ptx_blocks=blocks), model, tok


def test_ptx_loss_is_present_iff_ptx_coef_is_positive():
    _, tok = tiny_causal_lm()
    blocks = pack_tokens(tok, ["Once upon a time there was a small robot who loved to read."] * 8, 16)
    plain, _, _ = _trainer(0.0, blocks)
    metrics, _ = plain.step()
    assert "ptx/loss" not in metrics and plain.ptx is None
    mixed, model, _ = _trainer(1.0, blocks)
    metrics, _ = mixed.step()
    assert metrics["ptx/loss"] > 0 and math.isfinite(metrics["ptx/loss"])
    with pytest.raises(ConfigError, match="ptx"):
        _trainer(0.5, None)


def test_ptx_term_lowers_the_pretraining_loss():
    # Scores are constant and the KL coefficient 0, so only the ptx term has a direction.
    _, tok = tiny_causal_lm()
    blocks = pack_tokens(tok, ["Once upon a time there was a small robot who loved to read."] * 8, 16)
    trainer, model, _ = _trainer(5.0, blocks)
    trainer.kl_ctl.kl_coef = 0.0
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e-2
    before = perplexity(model, blocks)
    for _ in range(3):
        trainer.step()
    assert perplexity(model, blocks) < 0.8 * before
