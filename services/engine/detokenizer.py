"""Incremental detokenization for streaming (the prefix/read-offset scheme of vLLM / TGI).

Decoding token by token breaks multi-token characters and merges spaces wrongly, so
each step decodes a short window of recent tokens twice (with and without the new
ones) and emits the difference — unless it ends in an incomplete character.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass
class IncrementalDetokenizer:
    tokenizer: Tokenizer
    prefix_offset: int = 0  # window start
    read_offset: int = 0  # tokens [prefix_offset, read_offset) are already emitted
    text: str = ""  # everything decoded so far
    emitted: int = 0  # characters of text already streamed to the client (see engine._stream_delta)

    def push(self, ids: list[int], final: bool = False) -> str:
        """ids: all output tokens so far -> the new text they add (may be ""). An incomplete
        character is held back until more tokens complete it, unless this is the `final` push:
        then it decodes as U+FFFD, as decoding the whole output at once would."""
        prefix = self.tokenizer.decode(ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self.text += delta
        return delta
