"""A request's life in the engine: its tokens, KV blocks, adapter and timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from services.engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not yet admitted, or preempted (its KV is gone: recomputed on readmission)
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # EOS or a stop string
    ABORTED = "aborted"  # cancelled by the client
    ERROR = "error"  # e.g. longer than the model's context


@dataclass
class Timings:
    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass(eq=False)  # a sequence is itself: the scheduler's `in` / `remove` compare identities, not every field
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    adapter_id: str | None  # None: the base model
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_cached: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    slot: int = -1  # the adapter's global slot while admitted; -1: none
    generator: torch.Generator | None = None
    timings: Timings = field(default_factory=Timings)
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncached(self) -> int:
        """Tokens still to run through the model before the next sample (prefill or recompute)."""
        return self.num_tokens - self.num_cached

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
