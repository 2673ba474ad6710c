"""Streaming front of the engine: `async for chunk in engine.generate(...)`.

One background thread runs `LLMEngine.step()` while there is work; each request's
outputs go to its own asyncio queue on the caller's event loop. Leaving the
`async for` early (the client went away, a deadline passed) aborts the request:
its KV blocks and adapter reference are freed at the next step.

The caller's event loop never waits for a step: a request is tokenized and checked
there, then handed over through an inbox that the engine thread drains before each
step, and aborts go through the engine's own thread-safe queue. (Taking the step lock
on the event loop instead stalled a server's every stream for up to a whole step per
new request.)
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass

from services.engine.adapter_manager import Adapter
from services.engine.engine import EngineLoad, LLMEngine, StepOutput, StepStats
from services.engine.sampling import SamplingParams
from services.engine.sequence import Sequence


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # of StepOutput | BaseException


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._setup()
        self._thread.start()

    @classmethod
    def build(cls, factory: Callable[[], LLMEngine]) -> "AsyncEngine":
        """Build the engine on the step loop's own thread (its errors raised here), so that one thread
        runs all of the process's OpenMP work. When two threads each own a team of OpenMP workers,
        libgomp counts more workers than cores and stops spinning between parallel regions: every
        region then pays a sleep and a wake-up, and a decode step ran ~1.7x slower (measured:
        benchmarks/results/gateway-analysis.md)."""
        self = cls.__new__(cls)
        built: Future[LLMEngine] = Future()
        self._setup(target=lambda: self._build_then_run(factory, built))
        self._thread.start()
        self.engine = built.result()
        return self

    def _setup(self, target: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()  # the engine is single-threaded: every call goes through this lock
        self._work = threading.Event()
        self._stopped = False
        self._streams: dict[int, _Stream] = {}
        self._inbox: deque[Sequence] = deque()  # prepared requests for the next step
        self._thread = threading.Thread(target=target or self._run, name="engine-loop", daemon=True)

    def _build_then_run(self, factory: Callable[[], LLMEngine], built: Future) -> None:
        try:
            self.engine = factory()
        except BaseException as error:
            built.set_exception(error)
            return
        built.set_result(self.engine)
        self._run()

    def add_adapter(self, adapter: Adapter) -> None:
        with self._lock:
            self.engine.add_adapter(adapter)
        self._work.set()  # requests waiting for this adapter can start

    def remove_adapter(self, adapter_id: str) -> None:
        with self._lock:
            self.engine.remove_adapter(adapter_id)

    def adapter_in_use(self, adapter_id: str) -> bool:
        """Does a submitted, unfinished request name it? Lock-free: one read of a counter."""
        return self.engine.adapter_users[adapter_id] > 0

    def load(self) -> EngineLoad:
        with self._lock:
            return self.engine.load()

    def step_stats(self, reset_peaks: bool = False) -> StepStats:
        """A copy of the step counters (and, if asked, start a new peak window)."""
        with self._lock:
            stats = StepStats(**vars(self.engine.step_stats))
            if reset_peaks:
                self.engine.step_stats.reset_peaks()
            return stats

    async def generate(self, prompt: str | list[int], adapter_id: str | None = None, params: SamplingParams = SamplingParams()) -> AsyncIterator[StepOutput]:
        async for outputs in self.stream(prompt, adapter_id, params):
            for output in outputs:
                yield output

    async def stream(self, prompt: str | list[int], adapter_id: str | None = None, params: SamplingParams = SamplingParams(),
                     min_interval_s: float = 0.0) -> AsyncIterator[list[StepOutput]]:  # fmt: skip
        """The request's outputs as they come, several steps' at once when the consumer fell behind
        or within `min_interval_s` of the last batch (a server sends a batch as one message: fewer
        messages when the network path costs more than the tokens). The first output and the last
        are never held back."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        seq = self.engine.prepare_request(prompt, adapter_id, params)  # ValueError: a bad request
        seq_id = seq.seq_id
        self._streams[seq_id] = stream
        self._inbox.append(seq)
        self._work.set()
        finished, sent_at = False, None
        try:
            while not finished:
                items = await _next_batch(stream.queue, None if sent_at is None else sent_at + min_interval_s)
                error = next((item for item in items if isinstance(item, BaseException)), None)
                if error is not None:
                    raise error
                finished = items[-1].finish_reason is not None
                sent_at = stream.loop.time()
                yield items
        finally:
            self._streams.pop(seq_id, None)  # before the abort: see _submit_inbox
            if not finished:
                self.engine.abort(seq_id)
                self._work.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._work.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopped:
            self._work.wait()
            with self._lock:
                self._submit_inbox()
                try:
                    outputs = self.engine.step()
                except Exception as error:  # a broken step fails the requests in flight, not the server
                    self._fail_all(error)
                    continue
                if not self.engine.scheduler.running:  # idle, or waiting only for adapters: sleep until told
                    self._work.clear()
                    if self._inbox or self.engine.has_pending_aborts():  # arrived after the step: not lost
                        self._work.set()
                self._deliver([(self._streams.get(o.seq_id), o) for o in outputs])

    @staticmethod
    def _deliver(targets: list[tuple[_Stream | None, StepOutput]]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop, not one per output
        (each wake-up takes the GIL away from the next step)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, StepOutput]]] = {}
        for stream, output in targets:
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _submit_inbox(self) -> None:
        """Hand new requests to the engine; one whose caller already left is dropped (its stream
        is gone before its abort is queued, so it is either dropped here or aborted by the step)."""
        while self._inbox:
            seq = self._inbox.popleft()
            if seq.seq_id in self._streams:
                self.engine.submit(seq)

    def _fail_all(self, error: Exception) -> None:
        for seq_id, stream in list(self._streams.items()):
            self.engine.abort(seq_id)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, RuntimeError(f"engine step failed: {error!r}"))


def _put_all(items: list[tuple[_Stream, StepOutput]]) -> None:
    for stream, output in items:
        stream.queue.put_nowait(output)


async def _next_batch(queue: asyncio.Queue, hold_until: float | None) -> list:
    """At least one item; then, until `hold_until` (loop time) or a final item, whatever else arrives."""
    items = [await queue.get()]
    loop = asyncio.get_running_loop()
    while hold_until is not None and not _final(items[-1]) and (wait := hold_until - loop.time()) > 0:
        try:
            items.append(await asyncio.wait_for(queue.get(), wait))
        except TimeoutError:
            break
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _final(item: StepOutput | BaseException) -> bool:
    return isinstance(item, BaseException) or item.finish_reason is not None
