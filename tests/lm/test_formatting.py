"""One formatting for SFT, reward model and PPO: templates, the prompt/completion boundary, padding."""

from __future__ import annotations

import pytest
import torch

from palate.lm.formatting import (
    encode_prompt_completion,
    format_prompt,
    last_token_index,
    pad_batch,
    position_ids_from_mask,
)
from palate.lm.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.padding_side = "left"
    return t


def test_format_prompt_uses_chat_template_only_when_asked(tok) -> None:
    assert format_prompt(tok, "List three colours.", chat=False) == "List three colours."
    chat = format_prompt(tok, "List three colours.", chat=True)
    assert chat == "<|im_start|>user\nList three colours.<|im_end|>\n<|im_start|>assistant\n"


def test_completion_mask_covers_exactly_the_completion_and_eos(tok) -> None:
    prompt_ids = tok(format_prompt(tok, "Hi", True), add_special_tokens=False)["input_ids"]
    completion_ids = tok("The sea is blue.", add_special_tokens=False)["input_ids"]
    enc = encode_prompt_completion(tok, "Hi", "The sea is blue.", chat=True, max_length=128)
    assert enc["input_ids"] == prompt_ids + completion_ids + [tok.eos_token_id]
    assert enc["completion_mask"] == [0] * len(prompt_ids) + [1] * (len(completion_ids) + 1)
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    no_eos = encode_prompt_completion(tok, "Hi", "The sea is blue.", chat=True, max_length=128, add_eos=False)
    assert no_eos["input_ids"] == prompt_ids + completion_ids


def test_truncation_cuts_the_prompt_from_the_left(tok) -> None:
    full = encode_prompt_completion(tok, "Once upon a time there was a small robot", "yes", chat=False, max_length=512)
    n_completion = sum(full["completion_mask"])
    cut = encode_prompt_completion(tok, "Once upon a time there was a small robot", "yes", chat=False,
                                   max_length=n_completion + 2)
    assert cut["input_ids"] == full["input_ids"][-(n_completion + 2):]
    assert sum(cut["completion_mask"]) == n_completion


def test_pad_batch_both_sides_and_last_token(tok) -> None:
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}, {"input_ids": [8], "attention_mask": [1]}]
    right = pad_batch(rows, pad_token_id=0, padding_side="right")
    left = pad_batch(rows, pad_token_id=0, padding_side="left")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert last_token_index(right["attention_mask"]).tolist() == [2, 0]
    assert last_token_index(left["attention_mask"]).tolist() == [2, 2]
    assert position_ids_from_mask(left["attention_mask"]).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert position_ids_from_mask(torch.tensor([[1, 1, 0]])).tolist() == [[0, 1, 1]]
