"""Dataset formats for SFT and comparisons, validated line by line.

Every record is checked as it is read and a bad one raises :class:`palate.errors.DataError` naming
the file, the line, the field and the fix, e.g.::

    data/cmp.jsonl:12: field 'ranking' has 3 entries for 4 completions; give one rank per completion

Formats (one JSON object per line; extra keys are kept as ``meta``):

* SFT: ``{"prompt": str, "response": str}`` or a chat ``{"messages": [{"role", "content"}, ...]}``
  ending with an assistant message (the loss falls on that last message).
* Rankings (InstructGPT): ``{"prompt", "completions": [K strings], "ranking": [K ints]}`` with
  K = 2..9, rank 0 = best, equal ranks = ties (they form no pair).
* Best-of-K (Ziegler et al.): ``{"prompt", "completions": [K strings], "best": int}``.
* Pairs (TRL's standard preference format, what ``palate feedback export --format hf`` writes):
  ``{"prompt", "chosen": str, "rejected": str}``. TRL's implicit-prompt and conversational
  forms are refused with the conversion to make.

Any of these may carry ``"labeller": str``, used for per-labeller accuracy. Sources are a JSONL
path, or any ``datasets`` source as ``hf:<name>[:<split>]`` or a ``.json``/``.parquet``/``.csv`` file
(rows are then numbered from 1 in place of lines). Writers are atomic.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from palate.errors import DataError
from palate.runs import atomic_write_text

ComparisonKind = Literal["ranking", "best_of_k", "pair"]
MIN_K, MAX_K = 2, 9


@dataclasses.dataclass
class SFTExample:
    """One demonstration: ``prompt`` + ``completion``, or a chat whose last turn is the completion."""

    prompt: str | None
    completion: str
    messages: list[dict[str, str]] | None = None
    source: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        if self.messages is not None:
            return {"messages": self.messages, **self.meta}
        return {"prompt": self.prompt, "response": self.completion, **self.meta}


@dataclasses.dataclass
class Comparison:
    """K completions of one prompt and the labeller's judgement as ranks (0 = best).

    Every format becomes ranks: a pair is ``[0, 1]``; best-of-K is 0 for the chosen completion
    and 1 for the others (tied among themselves), so pair accuracy means the same thing for all.
    """

    prompt: str
    completions: list[str]
    ranks: list[int]
    kind: ComparisonKind
    best: int | None = None
    labeller: str | None = None
    source: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        extra = dict(self.meta)
        if self.labeller is not None:
            extra["labeller"] = self.labeller
        if self.kind == "pair":
            return {"prompt": self.prompt, "chosen": self.completions[0], "rejected": self.completions[1], **extra}
        if self.kind == "best_of_k":
            return {"prompt": self.prompt, "completions": self.completions, "best": self.best, **extra}
        return {"prompt": self.prompt, "completions": self.completions, "ranking": self.ranks, **extra}


# --------------------------------------------------------------------------- reading


def _rows(source: str | os.PathLike[str]) -> Iterator[tuple[str, int, Any]]:
    """``(file, line, parsed object)`` for each non-blank line of a JSONL file or row of a dataset."""
    text = str(source)
    path = Path(text)
    if text.startswith("hf:"):
        yield from _dataset_rows(text)
        return
    if not path.is_file():
        raise DataError(f"{text}: no such file; give a JSONL file, or hf:<dataset>[:split] for a datasets source")
    if path.suffix.lower() in (".json", ".parquet", ".csv"):
        yield from _dataset_rows(text)
        return
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                                "each line must be one JSON object") from err
            yield str(path), lineno, obj


def _dataset_rows(source: str) -> Iterator[tuple[str, int, Any]]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise DataError("reading datasets sources needs the `datasets` package: pip install datasets") from err
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        kwargs: dict[str, Any] = {"split": split or "train"}
        loader_args: tuple[Any, ...] = (name,)
    else:
        ext = Path(source).suffix.lower().lstrip(".")
        loader_args = ("json" if ext == "json" else ext,)
        kwargs = {"data_files": source, "split": "train"}
    try:
        ds = datasets.load_dataset(*loader_args, **kwargs)
    except Exception as err:  # datasets raises many types for a missing or malformed source
        raise DataError(f"{source}: cannot load as a datasets source ({err}); check the name, split and files") from err
    for i, row in enumerate(ds, start=1):
        # A table has every column in every row: a column another format's rows fill is None here.
        yield source, i, {k: v for k, v in row.items() if v is not None} if isinstance(row, dict) else row


def _field(file: str, line: int, obj: dict[str, Any], name: str, kind: type, fix: str) -> Any:
    if name not in obj:
        raise DataError(f"{file}:{line}: field '{name}' is missing; {fix}")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise DataError(f"{file}:{line}: field '{name}' must be {kind.__name__}, got {type(value).__name__}; {fix}")
    return value


def _object(file: str, line: int, obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{file}:{line}: expected a JSON object, got {type(obj).__name__}; "
                        "write one {...} record per line")
    return obj


def parse_sft(file: str, line: int, obj: Any) -> SFTExample:
    """One SFT record, validated (see the module docstring for the formats)."""
    obj = _object(file, line, obj)
    where = f"{file}:{line}"
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: field 'messages[{i}]' must be an object with string 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(f"{where}: field 'messages[{i}].role' is '{m['role']}'; use system, user or assistant")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: field 'messages' must end with an assistant message (the demonstration)")
        if not msgs[-1]["content"].strip():
            raise DataError(f"{where}: field 'messages[-1].content' is empty; the demonstration needs text")
        meta = {k: v for k, v in obj.items() if k != "messages"}
        return SFTExample(prompt=None, completion=msgs[-1]["content"], messages=msgs, source=where, meta=meta)
    fix = 'write {"prompt": "...", "response": "..."} or {"messages": [...]}'
    prompt = _field(file, line, obj, "prompt", str, fix)
    response_key = "response" if "response" in obj else ("completion" if "completion" in obj else "response")
    response = _field(file, line, obj, response_key, str, fix)
    if not response.strip():
        raise DataError(f"{where}: field '{response_key}' is empty; the demonstration needs text")
    meta = {k: v for k, v in obj.items() if k not in ("prompt", response_key)}
    return SFTExample(prompt=prompt, completion=response, source=where, meta=meta)


#: The fields that tell a comparison record from any other line.
_COMPARISON_KEYS = frozenset({"chosen", "rejected", "completions", "ranking", "best"})
COMPARISON_SHAPES = ('a comparison is {"prompt", "chosen", "rejected"} (the preference format of TRL and of '
                     '`palate feedback export --format hf`), {"prompt", "completions", "ranking"} or '
                     '{"prompt", "completions", "best"}')


def parse_comparison(file: str, line: int, obj: Any) -> Comparison:
    """One comparison record; the format (ranking, best-of-K, pair) is detected from its fields."""
    obj = _object(file, line, obj)
    where = f"{file}:{line}"
    if not _COMPARISON_KEYS & set(obj):
        keys = ", ".join(repr(k) for k in sorted(obj)[:8]) or "none"
        raise DataError(f"{where}: not a comparison (its keys: {keys}); {COMPARISON_SHAPES}")
    if "prompt" not in obj and "chosen" in obj:
        raise DataError(f"{where}: field 'prompt' is missing; a pair with the prompt inside 'chosen' and "
                        "'rejected' (TRL's implicit-prompt form) must be split: put the shared prompt in "
                        "'prompt' and only the responses in 'chosen'/'rejected'")
    if any(isinstance(obj.get(k), list) for k in ("prompt", "chosen", "rejected")):
        raise DataError(f"{where}: 'prompt'/'chosen'/'rejected' are lists of chat messages (TRL's conversational "
                        "form); palate reads texts: render each with the model's chat template into a string")
    prompt = _field(file, line, obj, "prompt", str, "every comparison needs the prompt text")
    labeller = obj.get("labeller")
    if labeller is not None and not isinstance(labeller, str):
        raise DataError(f"{where}: field 'labeller' must be a string name, got {type(labeller).__name__}")
    if "chosen" in obj or "rejected" in obj:
        fix = 'a pair is {"prompt", "chosen": "...", "rejected": "..."}'
        chosen = _field(file, line, obj, "chosen", str, fix)
        rejected = _field(file, line, obj, "rejected", str, fix)
        meta = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected", "labeller")}
        return Comparison(prompt, [chosen, rejected], [0, 1], "pair", labeller=labeller, source=where, meta=meta)
    fix = 'add "ranking": [rank per completion, 0 = best] or "best": index, or use "chosen"/"rejected"'
    completions = _field(file, line, obj, "completions", list, fix)
    k = len(completions)
    if not MIN_K <= k <= MAX_K:
        raise DataError(f"{where}: field 'completions' has {k} entries; give {MIN_K} to {MAX_K} completions per prompt")
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise DataError(f"{where}: field 'completions[{i}]' must be a string, got {type(c).__name__}")
    meta = {k2: v for k2, v in obj.items() if k2 not in ("prompt", "completions", "ranking", "best", "labeller")}
    if "ranking" in obj:
        ranking = obj["ranking"]
        if not isinstance(ranking, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
            raise DataError(f"{where}: field 'ranking' must be a list of integers (rank per completion, 0 = best)")
        if len(ranking) != k:
            raise DataError(f"{where}: field 'ranking' has {len(ranking)} entries for {k} completions; "
                            "give one rank per completion (0 = best, equal ranks for ties)")
        if any(r < 0 for r in ranking):
            raise DataError(f"{where}: field 'ranking' has a negative rank; ranks start at 0 (best)")
        if len(set(ranking)) < 2:
            raise DataError(f"{where}: field 'ranking' ties every completion, so it says nothing; "
                            "drop the record or rank at least two completions differently")
        return Comparison(prompt, completions, ranking, "ranking", labeller=labeller, source=where, meta=meta)
    if "best" in obj:
        best = obj["best"]
        if not isinstance(best, int) or isinstance(best, bool) or not 0 <= best < k:
            raise DataError(f"{where}: field 'best' must be an index in 0..{k - 1} into 'completions', got {best!r}")
        ranks = [0 if i == best else 1 for i in range(k)]
        return Comparison(prompt, completions, ranks, "best_of_k", best=best, labeller=labeller, source=where, meta=meta)
    raise DataError(f"{where}: field 'ranking' is missing (no 'ranking', 'best' or 'chosen'); {fix}")


def read_sft(path: str | os.PathLike[str]) -> list[SFTExample]:
    """All SFT examples of a source; the first bad record raises a DataError naming it."""
    examples = [parse_sft(f, n, obj) for f, n, obj in _rows(path)]
    if not examples:
        raise DataError(f"{path}: no records; an SFT file needs at least one demonstration")
    return examples


def read_comparisons(path: str | os.PathLike[str]) -> list[Comparison]:
    """All comparisons of a source, the format detected per line (formats may be mixed)."""
    comps = [parse_comparison(f, n, obj) for f, n, obj in _rows(path)]
    if not comps:
        raise DataError(f"{path}: no records; a comparisons file needs at least one comparison")
    return comps


# --------------------------------------------------------------------------- writing


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> Path:
    """Write records as JSONL atomically: a crash leaves the old file, never half a new one."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text)
    return Path(path)


def write_sft(path: str | os.PathLike[str], examples: Iterable[SFTExample]) -> Path:
    """Write SFT examples (atomically)."""
    return write_jsonl(path, (e.to_json() for e in examples))


def write_comparisons(path: str | os.PathLike[str], comparisons: Iterable[Comparison]) -> Path:
    """Write comparisons in their own formats (atomically)."""
    return write_jsonl(path, (c.to_json() for c in comparisons))
