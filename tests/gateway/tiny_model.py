"""A tiny GPTBigCode checkpoint with a real (byte-level BPE) tokenizer, made offline in a second.

transformers, PEFT and the engine all load it from the directory, so the gateway's text
can be compared with the oracles' text. Random weights: the text is gibberish, but the
same for everyone who computes it right.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Write a Python function that checks whether a number is prime.",
    "The quick brown fox jumps over the lazy dog. Hello, world!",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n",
]
BASE_MODEL_ID = "test/tiny-gptbigcode-bpe"


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """config.json + model.safetensors + tokenizer files in `path`."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    tok = tokenizer()
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    config = GPTBigCodeConfig(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=4, multi_query=True,
                              bos_token_id=eos, eos_token_id=eos, initializer_range=0.3)  # fmt: skip
    GPTBigCodeForCausalLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path
