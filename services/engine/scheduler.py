"""Iteration-level scheduling (Orca / vLLM): sequences join and leave the batch every step.

Each step spends a token budget (max_num_batched_tokens):
  1. running sequences first, oldest first: one decode token each, or their next prefill
     chunk (chunked prefill: a long prompt is fed over several steps);
  2. then waiting sequences in the policy's order, while budget, sequence limit, KV
     blocks and adapter slots allow.
When the KV cache cannot grow a running sequence, the newest running sequence is
preempted by recompute: its blocks are freed and it goes back to the front of the
queue; on readmission its prompt and generated tokens are prefilled again.
A sequence whose adapter is not in the engine yet (being fetched) or cannot get a
slot (all slots of its pool hold adapters in use) waits without blocking the others.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from services.engine.adapter_manager import AdapterManager
from services.engine.adapter_slots import NO_ADAPTER
from services.engine.block_manager import BlockManager
from services.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192  # the paper's throughput run

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs and max_num_batched_tokens must be >= 1, got {self}")


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_new: int  # tokens of seq to run this step: seq.token_ids[num_cached : num_cached + num_new]

    @property
    def samples(self) -> bool:
        """Does this chunk reach the sequence's end, so that the step samples its next token?"""
        return self.seq.num_cached + self.num_new == self.seq.num_tokens


class SchedulingPolicy(Protocol):
    def admission_order(self, waiting: deque[Sequence]) -> Iterable[Sequence]: ...


class FifoPolicy:
    def admission_order(self, waiting: deque[Sequence]) -> Iterable[Sequence]:
        return list(waiting)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, adapters: AdapterManager, policy: SchedulingPolicy | None = None):
        self.config, self.blocks, self.adapters = config, blocks, adapters
        self.policy = policy or FifoPolicy()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.config.max_num_batched_tokens
        chunks, preempted = self._schedule_running(budget)
        budget -= sum(c.num_new for c in chunks)
        if not preempted:  # memory is short: admitting more would only preempt again
            chunks += self._admit_waiting(budget)
        return chunks

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take seq out of the scheduler (running or waiting) and free its blocks and adapter reference."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def _schedule_running(self, budget: int) -> tuple[list[ScheduledChunk], bool]:
        chunks: list[ScheduledChunk] = []
        preempted = False
        for seq in list(self.running):
            if seq not in self.running:  # preempted to make room for an older one
                break
            num_new = min(seq.num_uncached, budget)
            if num_new == 0:
                break
            while not self.blocks.allocate(seq, seq.num_cached + num_new):
                preempted = True
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                chunks.append(ScheduledChunk(seq, num_new))
                budget -= num_new
        return chunks, preempted

    def _admit_waiting(self, budget: int) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        for seq in self.policy.admission_order(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if seq.adapter_id is not None and not self.adapters.is_registered(seq.adapter_id):
                continue  # its adapter is still being fetched
            num_new = min(seq.num_uncached, budget)
            if self.blocks.blocks_needed(seq, seq.num_cached + num_new) > self.blocks.num_free:
                break  # FIFO: a later, smaller request does not jump the queue for memory
            slot = NO_ADAPTER if seq.adapter_id is None else self.adapters.acquire(seq.adapter_id)
            if slot is None:
                continue  # every slot of its pool holds an adapter in use
            self.blocks.allocate(seq, seq.num_cached + num_new)
            self._start(seq, slot)
            chunks.append(ScheduledChunk(seq, num_new))
            budget -= num_new
        return chunks

    def _start(self, seq: Sequence, slot: int) -> None:
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status, seq.slot = SequenceStatus.RUNNING, slot

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if seq.adapter_id is not None and seq.slot != NO_ADAPTER:
            self.adapters.release(seq.adapter_id)
        seq.slot = NO_ADAPTER
