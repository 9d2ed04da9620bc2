"""One way to turn (prompt, completion) into tokens, shared by SFT, the reward model and PPO.

A reward model scores what the policy generates only if it sees the same tokens: the same chat
template, the same prompt/completion boundary, the same end-of-sequence token. So every stage
encodes through these functions:

* the prompt is the chat template with the generation prompt (``<|im_start|>assistant\\n``) when
  ``chat`` is true and the tokenizer has a template, or the raw text otherwise (continuation tasks
  such as Ziegler's sentiment stories);
* prompt and completion are tokenized separately and concatenated, so the boundary is exactly
  where generation starts (tokenizing the joined string could merge tokens across it);
* the completion ends with the EOS token, as a finished generation does.
"""

from __future__ import annotations

from typing import Any

import torch


def format_prompt(tokenizer: Any, prompt: str, chat: bool) -> str:
    """The text the policy is conditioned on: the chat template with a generation prompt, or ``prompt``."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def format_messages(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, str]:
    """``(prompt_text, completion)`` of a chat: every turn before the last assistant message, then that message.

    The loss of SFT on a chat falls on its final assistant turn; earlier turns are context.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a chat must end with an assistant message")
    context = messages[:-1]
    if getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    else:
        prompt_text = "".join(f"{m['role']}: {m['content']}\n" for m in context) + "assistant: "
    return prompt_text, messages[-1]["content"]


def _prompt_ids(tokenizer: Any, prompt_text: str, chat: bool) -> list[int]:
    # A chat template already holds its special tokens; raw text gets the tokenizer's BOS, if any.
    add_special = not (chat and getattr(tokenizer, "chat_template", None))
    return list(tokenizer(prompt_text, add_special_tokens=add_special)["input_ids"])


def encode_text_pair(
    tokenizer: Any,
    prompt_text: str,
    completion: str,
    *,
    chat: bool,
    max_length: int,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """Encode an already formatted prompt text and a completion (see :func:`encode_prompt_completion`)."""
    prompt_ids = _prompt_ids(tokenizer, prompt_text, chat)
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        if not completion_ids or completion_ids[-1] != tokenizer.eos_token_id:
            completion_ids.append(tokenizer.eos_token_id)
    # Keep the completion (it carries the loss or the score); cut the prompt from the left, where
    # the oldest context is, and only if the completion alone is too long cut its end.
    completion_ids = completion_ids[:max_length]
    room = max_length - len(completion_ids)
    prompt_ids = prompt_ids[len(prompt_ids) - room:] if room > 0 else []
    input_ids = prompt_ids + completion_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
    }


def encode_prompt_completion(
    tokenizer: Any,
    prompt: str,
    completion: str,
    chat: bool,
    max_length: int,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """Token ids of ``prompt`` + ``completion`` as the policy sees them.

    Returns:
        ``{"input_ids", "attention_mask", "completion_mask"}``, lists of equal length (unpadded);
        ``completion_mask`` is 1 on completion tokens (the EOS included), 0 on the prompt.
    """
    return encode_text_pair(tokenizer, format_prompt(tokenizer, prompt, chat), completion,
                            chat=chat, max_length=max_length, add_eos=add_eos)


def pad_batch(
    examples: list[dict[str, list[int]]],
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Stack encoded examples into tensors, padding every key on ``padding_side``.

    ``input_ids`` are padded with ``pad_token_id`` and every mask with 0; the attention mask, not
    the pad id, says which tokens are real (SmolLM2's pad token is also its EOS).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out: dict[str, torch.Tensor] = {}
    for key in examples[0]:
        fill = pad_token_id if key == "input_ids" else (-100 if key == "labels" else 0)
        rows = []
        for e in examples:
            pad = [fill] * (length - len(e[key]))
            rows.append(pad + list(e[key]) if padding_side == "left" else list(e[key]) + pad)
        out[key] = torch.tensor(rows, dtype=torch.long)
    return out


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift the rotary phases.

    With positions ``0..T-1`` a left-padded sequence would start at position ``T - len`` and get
    a (slightly) different representation than the same sequence padded on the right.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for any padding side (and holes)."""
    length = attention_mask.shape[-1]
    positions = torch.arange(length, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).amax(-1).clamp_min(0)
