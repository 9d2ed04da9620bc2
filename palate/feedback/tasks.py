"""What a task and an answer may look like: validation of task specs and answers, and export formats.

Shared by the HTTP API (:meth:`Store.create_tasks <palate.feedback.store.Store.create_tasks>`,
:meth:`~palate.feedback.store.Store.submit_answer`) and by import; pure functions, no SQL.
"""

from __future__ import annotations

from typing import Any

from palate.feedback.errors import BadInput
from palate.feedback.media import SHA256_RE

PAIR_CHOICES = ("left", "right", "equal", "cant_tell")
MAX_K = 9
MAX_TEXT = 200_000
MAX_REDUNDANCY = 20
#: Keys an exported control-pair line owns; task metadata may not shadow them.
RESERVED_KEYS = frozenset(
    {
        "comparison_id",
        "left",
        "right",
        "label",
        "labeller",
        "prompt",
        "chosen",
        "rejected",
        "completions",
        "ranking",
        "best",
    }
)
#: What a project's answers export to. The first four are one line per answer, each in its task's
#: own format; ``hf`` turns every text comparison into prompt/chosen/rejected pairs.
EXPORT_FORMATS = ("pairs", "text_pairs", "rankings", "best_of_k", "hf")
HF_FORMAT = "hf"


def _item(value: Any, where: str) -> dict[str, str]:
    if isinstance(value, str):
        value = {"text": value}
    if not isinstance(value, dict):
        raise BadInput(f"{where}: expected a string or an object {{'text': ...}} / {{'media': sha256}}")
    unknown = set(value) - {"text", "media", "id"}
    if unknown:
        raise BadInput(f"{where}: unknown keys {sorted(unknown)}; an item has 'text' or 'media', and 'id'")
    if ("text" in value) == ("media" in value):
        raise BadInput(f"{where}: give exactly one of 'text' or 'media' (the sha256 from POST /api/media)")
    out: dict[str, str] = {}
    if "text" in value:
        if not isinstance(value["text"], str) or len(value["text"]) > MAX_TEXT:
            raise BadInput(f"{where}.text: must be a string of at most {MAX_TEXT} characters")
        out["text"] = value["text"]
    else:
        if not isinstance(value["media"], str) or not SHA256_RE.match(value["media"]):
            raise BadInput(f"{where}.media: must be the 64-hex sha256 returned by POST /api/media")
        out["media"] = value["media"]
    if "id" in value:
        if not isinstance(value["id"], str | int) or len(str(value["id"])) > 200:
            raise BadInput(f"{where}.id: must be a string or integer of at most 200 characters")
        out["id"] = str(value["id"])
    return out


def normalize_task_spec(spec: Any, where: str = "task") -> dict[str, Any]:
    """Check one task as a training run describes it and return the stored form.

    Pair: ``{"kind": "pair", "left": item, "right": item, "prompt"?: str}``. Rank:
    ``{"kind": "rank", "prompt": str, "completions": [item, ...2..9], "mode"?: "rank"|"best"}``.
    An item is a string, ``{"text": ...}`` or ``{"media": sha256}``, with an optional ``"id"`` the
    run uses to recognise it in the export. Common optional keys: ``priority`` (higher first),
    ``redundancy`` (labellers per task), ``metadata`` (object, echoed in exports),
    ``external_id`` (unique per project; makes retried creations idempotent).
    """
    if not isinstance(spec, dict):
        raise BadInput(f"{where}: expected a JSON object")
    kind = spec.get("kind")
    common = {"kind", "priority", "redundancy", "metadata", "external_id", "prompt"}
    if kind == "pair":
        allowed = common | {"left", "right"}
        for key in ("left", "right"):
            if key not in spec:
                raise BadInput(f"{where}: a pair task needs '{key}'")
        items = [_item(spec["left"], f"{where}.left"), _item(spec["right"], f"{where}.right")]
        mode = "pair"
    elif kind == "rank":
        allowed = common | {"completions", "mode"}
        comps = spec.get("completions")
        if not isinstance(comps, list) or not 2 <= len(comps) <= MAX_K:
            raise BadInput(f"{where}.completions: a rank task needs a list of 2..{MAX_K} completions")
        items = [_item(c, f"{where}.completions[{i}]") for i, c in enumerate(comps)]
        mode = spec.get("mode", "rank")
        if mode not in ("rank", "best"):
            raise BadInput(f"{where}.mode: must be 'rank' (order all, ties allowed) or 'best' (best of K)")
        if not isinstance(spec.get("prompt"), str):
            raise BadInput(f"{where}.prompt: a rank task needs the prompt as a string")
    else:
        raise BadInput(f"{where}.kind: must be 'pair' or 'rank', got {kind!r}")
    unknown = set(spec) - allowed
    if unknown:
        raise BadInput(f"{where}: unknown keys {sorted(unknown)}")
    prompt = spec.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > MAX_TEXT):
        raise BadInput(f"{where}.prompt: must be a string of at most {MAX_TEXT} characters")
    priority = spec.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) > 2**31:
        raise BadInput(f"{where}.priority: must be an integer (higher is shown first)")
    redundancy = spec.get("redundancy", 1)
    if (
        not isinstance(redundancy, int)
        or isinstance(redundancy, bool)
        or not 1 <= redundancy <= MAX_REDUNDANCY
    ):
        raise BadInput(f"{where}.redundancy: must be an integer 1..{MAX_REDUNDANCY} (labellers per task)")
    metadata = spec.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise BadInput(f"{where}.metadata: must be a JSON object")
    clash = RESERVED_KEYS & set(metadata)
    if clash:
        raise BadInput(
            f"{where}.metadata: keys {sorted(clash)} are reserved by the export format; rename them"
        )
    external_id = spec.get("external_id")
    if external_id is not None and (not isinstance(external_id, str | int) or len(str(external_id)) > 200):
        raise BadInput(f"{where}.external_id: must be a string of at most 200 characters")
    return {
        "kind": kind,
        "mode": mode,
        "payload": {"prompt": prompt, "items": items},
        "metadata": metadata,
        "external_id": None if external_id is None else str(external_id),
        "priority": priority,
        "redundancy": redundancy,
    }


def dense_ranks(values: list[int]) -> list[int]:
    """Map any ranks (lower is better, equal values tie) to dense ranks 0, 1, 2, ..."""
    order = {v: i for i, v in enumerate(sorted(set(values)))}
    return [order[v] for v in values]


def normalize_answer(mode: str, k: int, answer: Any) -> dict[str, Any]:
    """Check an answer against its task and return the stored form.

    Pair: ``{"choice": "left"|"right"|"equal"|"cant_tell"}``. Rank: ``{"ranking": [r_0..r_{K-1}]}``,
    the rank of each completion in the order shown, 0 best, equal numbers for ties (stored as
    dense ranks). Best of K: ``{"best": index}``. Either of these two may instead be
    ``{"cant_tell": true}``: the labeller read the task and cannot judge it, which counts as the
    task's answer (unlike a skip, which gives the task back) and is left out of training exports.
    """
    if not isinstance(answer, dict):
        raise BadInput("answer: expected a JSON object")
    if mode != "pair" and "cant_tell" in answer:
        if answer.get("cant_tell") is not True or len(answer) != 1:
            raise BadInput("answer: \"can't tell\" on a ranking or best-of-K task is exactly {'cant_tell': true}")
        return {"cant_tell": True}
    if mode == "pair":
        choice = answer.get("choice")
        if choice not in PAIR_CHOICES or set(answer) != {"choice"}:
            raise BadInput(f"answer: a pair task takes {{'choice': one of {list(PAIR_CHOICES)}}}")
        return {"choice": choice}
    if mode == "rank":
        ranking = answer.get("ranking")
        if (
            set(answer) != {"ranking"}
            or not isinstance(ranking, list)
            or len(ranking) != k
            or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < k for r in ranking)
        ):
            raise BadInput(
                f"answer: a rank task takes {{'ranking': [{k} integers in 0..{k - 1}]}}, the rank of each "
                "completion in the order shown (0 best, equal numbers for ties), or {'cant_tell': true}"
            )
        return {"ranking": dense_ranks(ranking)}
    best = answer.get("best")
    if set(answer) != {"best"} or not isinstance(best, int) or isinstance(best, bool) or not 0 <= best < k:
        raise BadInput(f"answer: a best-of-K task takes {{'best': index in 0..{k - 1}}} or {{'cant_tell': true}}")
    return {"best": best}


def task_format(mode: str, payload: dict[str, Any]) -> str:
    """Which trainer format a task exports to (see :data:`EXPORT_FORMATS`)."""
    if mode == "rank":
        return "rankings"
    if mode == "best":
        return "best_of_k"
    if payload.get("prompt") is not None and all("text" in it for it in payload["items"]):
        return "text_pairs"
    return "pairs"
