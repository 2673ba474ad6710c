"""The current step's metadata, read by the layers (nano-vllm style).

The model runner sets it once per step; layers read it instead of taking extra
forward arguments, so a model's forward signature stays the plain transformer one.
Adapted layers of one module type (say every `c_attn`) share one AdapterBatch:
`adapters[i]` is the batch of the layers built with `batch_index=i`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from services.engine.adapter_batch import AdapterBatch
from services.engine.attention import AttentionBatch


@dataclass(frozen=True)
class StepContext:
    adapters: tuple[AdapterBatch, ...]  # one per adapted module type
    attention: AttentionBatch | None = None


_current: StepContext | None = None


def get_step() -> StepContext:
    if _current is None:
        raise RuntimeError("no step context is set: wrap the forward in `using_step(...)` or `using_adapter_batch(batch)`")
    return _current


def get_adapter_batch(index: int = 0) -> AdapterBatch:
    return get_step().adapters[index]


def get_attention_batch() -> AttentionBatch:
    attention = get_step().attention
    if attention is None:
        raise RuntimeError("this step has no attention batch")
    return attention


@contextmanager
def using_step(step: StepContext) -> Iterator[StepContext]:
    global _current
    previous, _current = _current, step
    try:
        yield step
    finally:
        _current = previous


def using_adapter_batch(batch: AdapterBatch):
    """A step with one adapter batch and no attention: for single layers."""
    return using_step(StepContext((batch,)))
