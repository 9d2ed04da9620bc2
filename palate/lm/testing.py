"""Tiny randomly initialised models of SmolLM2's architecture, built in code for fast tests.

No file and no hub: a byte-level BPE tokenizer is trained in milliseconds on a small built-in
corpus, and a two-layer Llama (SmolLM2's architecture, tied embeddings) is initialised from a seed.
The tokenizer carries a ChatML template like SmolLM2-Instruct's, so chat code paths are exercised.
"""

from __future__ import annotations

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The movie was wonderful and the actors were great.",
    "I did not like the food, it was cold and bland.",
    "Write a short poem about the sea in three lines.",
    "List three colours: red, green, blue.",
    "Once upon a time there was a small robot who loved to read.",
    "The quick brown fox jumps over the lazy dog.",
    "Thank you! This is the best day ever, happy and good.",
    "Explain why the sky is blue in one sentence.",
]


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with SmolLM2's special tokens, trained on a built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_causal_lm(seed: int = 0, hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 320):
    """``(model, tokenizer)``: a randomly initialised 2-layer Llama with SmolLM2's layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer
