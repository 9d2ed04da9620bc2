"""Pretraining text for PPO-ptx and for the alignment-tax perplexity (InstructGPT, section 3.5).

PPO-ptx mixes gamma * log-likelihood of *pretraining* text into every update so the policy keeps
the skills RLHF would otherwise erode; the same held-out text then measures that erosion as a
perplexity. The text must be real English that exists offline on every machine, so the shipped
corpus ``python-docs`` is the documentation of Python's own standard library: the docstrings of a
fixed list of stdlib modules and of their public classes and functions, read with
:func:`inspect.getdoc`. It needs no download and is the same on every CPython 3.11 install.

A user corpus is a ``.txt`` file (documents separated by blank lines) or a ``.jsonl`` file with a
``"text"`` field per line.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from palate.errors import DataError

# Modules whose documentation is prose written by CPython's authors. Fixed, so the corpus (and the
# train/held-out split below) is the same on every machine with the same Python.
PYTHON_DOC_MODULES: tuple[str, ...] = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email", "enum", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib",
    "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "mimetypes",
    "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "poplib",
    "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "zipfile", "zoneinfo",
)

SHIPPED_CORPORA = ("python-docs",)


def _is_prose(text: str, min_words: int) -> bool:
    """Keep paragraphs of sentences, drop signatures, tables and code samples."""
    words = text.split()
    if len(words) < min_words or ">>>" in text:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / max(len(text), 1) > 0.85


def python_docs(min_words: int = 20) -> list[str]:
    """Prose paragraphs from the docstrings of :data:`PYTHON_DOC_MODULES`, in a fixed order."""
    seen: set[str] = set()
    docs: list[str] = []
    for name in PYTHON_DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stdlib module this build of Python lacks (e.g. no sqlite3)
            continue
        objects = [module] + [obj for attr, obj in sorted(vars(module).items())
                              if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
                              and getattr(obj, "__module__", None) == module.__name__]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            for para in doc.split("\n\n"):
                para = " ".join(para.split())
                if para not in seen and _is_prose(para, min_words):
                    seen.add(para)
                    docs.append(para)
    return docs


def load_corpus(spec: str) -> list[str]:
    """Documents of a shipped corpus (``python-docs``) or of a ``.txt`` / ``.jsonl`` file."""
    if spec == "python-docs":
        return python_docs()
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"pretraining corpus '{spec}' is neither a shipped corpus {list(SHIPPED_CORPORA)} "
                        "nor an existing .txt/.jsonl file; fix ptx_corpus")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({err})") from err
            docs.append(str(text))
    else:
        docs = [" ".join(p.split()) for p in path.read_text().split("\n\n") if p.strip()]
    if not docs:
        raise DataError(f"pretraining corpus {path} holds no text")
    return docs


def split_corpus(docs: Sequence[str], held_out_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` split by a hash of each document: stable when the corpus grows."""
    train, held = [], []
    for d in docs:
        bucket = int(hashlib.sha256(d.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if bucket < held_out_fraction else train).append(d)
    if not train or not held:
        raise DataError(f"pretraining corpus of {len(docs)} documents is too small to split; give more text")
    return train, held


def pack_tokens(tokenizer, docs: Sequence[str], block_size: int) -> torch.Tensor:
    """``[N, block_size]`` blocks of the concatenated documents, each followed by EOS (GPT-style)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for d in docs:
        stream.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    n = len(stream) // block_size
    if n == 0:
        raise DataError(f"pretraining text has {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


class PretrainBatches:
    """An endless, seeded stream of ``[batch_size, block_size]`` pretraining blocks for ptx."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.blocks, self.batch_size = blocks, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        while len(self._order) < self.batch_size:
            self._order += torch.randperm(len(self.blocks), generator=self.generator).tolist()
        take, self._order = self._order[: self.batch_size], self._order[self.batch_size:]
        return self.blocks[take]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": list(self._order)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._order = list(state["order"])


def lm_nll(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood of ``blocks`` (what ptx minimises, gamma-weighted)."""
    logits = model(input_ids=blocks, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))


@torch.no_grad()
def nll_sum(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """``(summed token NLL, tokens predicted)`` over ``blocks``; sums add up over shards of the blocks."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(blocks), batch_size):
            b = blocks[i:i + batch_size].to(device)
            total += float(lm_nll(model, b)) * b.shape[0] * (b.shape[1] - 1)
            count += b.shape[0] * (b.shape[1] - 1)
    finally:
        model.train(was_training)
    return total, count


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean token NLL) over ``blocks``: InstructGPT's alignment tax when compared to the SFT model."""
    total, count = nll_sum(model, blocks, batch_size)
    return float(torch.exp(torch.tensor(total / max(count, 1))))
