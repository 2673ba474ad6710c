"""The current step's adapter batch, read by every adapted layer (nano-vllm style).

The engine sets it once per step; layers read it instead of taking extra forward
arguments, so a model's forward signature stays the plain transformer one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from services.engine.adapter_batch import AdapterBatch

_current: AdapterBatch | None = None


def get_adapter_batch() -> AdapterBatch:
    if _current is None:
        raise RuntimeError("no adapter batch is set for this step: wrap the forward in `using_adapter_batch(batch)`")
    return _current


@contextmanager
def using_adapter_batch(batch: AdapterBatch) -> Iterator[AdapterBatch]:
    global _current
    previous, _current = _current, batch
    try:
        yield batch
    finally:
        _current = previous
