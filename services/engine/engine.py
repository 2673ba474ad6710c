"""The engine: continuous batching where every request carries its own adapter.

    step():  schedule -> run the model -> sample -> postprocess -> emit

Synchronous and single-threaded; `async_engine.AsyncEngine` drives it from a
background thread for streaming. Knows nothing of Ray, gRPC, Redis or S3.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.engine.adapter_batch import PathChooser
from services.engine.adapter_manager import Adapter, AdapterManager
from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.cost_model import CostModel, calibrate
from services.engine.detokenizer import IncrementalDetokenizer, Tokenizer
from services.engine.model_runner import ModelRunner
from services.engine.models import CausalLM
from services.engine.sampling import SamplingParams, sample
from services.engine.scheduler import ScheduledChunk, Scheduler
from services.engine.sequence import FinishReason, Sequence, Timings


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request."""

    seq_id: int
    new_token_ids: tuple[int, ...]
    text: str  # new text (streaming delta)
    finish_reason: FinishReason | None  # None: not finished
    num_prompt_tokens: int
    num_output_tokens: int
    timings: Timings


@dataclass(frozen=True)
class EngineLoad:
    """What the engine holds right now: zero everywhere once every request has ended or been aborted."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    adapter_refs: int  # slot references held by running sequences
    adapter_users: int  # unfinished requests (waiting or running) naming an adapter


@dataclass(frozen=True)
class StepRecord:
    """One model step, as `LLMEngine.step_listeners` see it (on the thread that steps)."""

    seconds: float
    tokens: int  # tokens the model ran: prompt chunks + one per decoding sequence (the batch size in tokens)
    sequences: int
    adapters: int  # distinct adapters; the base model counts as one
    sampled: int  # tokens generated


@dataclass
class StepStats:
    """Counters over the engine's life; `peak_*` since the last `reset_peaks()`."""

    steps: int = 0
    busy_seconds: float = 0.0  # inside step(), steps that ran the model
    generated_tokens: int = 0
    preemptions: int = 0  # sequences preempted for KV blocks (recomputed later)
    peak_batch_seqs: int = 0  # most sequences in one step
    peak_batch_adapters: int = 0  # most distinct adapters (the base model counts as one) in one step

    def record(self, step: StepRecord, preemptions: int) -> None:
        self.steps += 1
        self.busy_seconds += step.seconds
        self.generated_tokens += step.sampled
        self.preemptions = preemptions
        self.peak_batch_seqs = max(self.peak_batch_seqs, step.sequences)
        self.peak_batch_adapters = max(self.peak_batch_adapters, step.adapters)

    def reset_peaks(self) -> None:
        self.peak_batch_seqs = self.peak_batch_adapters = 0


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None, config: EngineConfig, chooser: PathChooser, eos_token_ids: frozenset[int]):
        torch.set_num_threads(config.threads)
        self.model, self.tokenizer, self.config, self.eos_token_ids = model, tokenizer, config, eos_token_ids
        self.adapters = AdapterManager(config.layout, model.adapted_layers(), config.adapter_modules)
        per_block = ModelRunner.bytes_per_block(model, config.block_size, config.torch_dtype)
        num_blocks = config.kv_cache_bytes // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} holds no block ({per_block} bytes each)")
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config.scheduler, self.blocks, self.adapters)
        self._max_tokens = min(model.max_positions, num_blocks * config.block_size)  # one sequence can never exceed this
        self.runner = ModelRunner(model, config.layout, self.adapters, chooser, num_blocks, config.block_size, config.torch_dtype)
        self.sequences: dict[int, Sequence] = {}
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        self._aborted: deque[int] = deque()  # appended from any thread, drained by step()
        self.adapter_users: Counter[str] = Counter()  # adapter id -> unfinished requests using it
        self.step_stats = StepStats()
        self.step_listeners: list[Callable[[StepRecord], None]] = []  # e.g. a server's metrics; called after each model step

    @classmethod
    def from_model_dir(cls, model_dir: Path, config: EngineConfig, chooser: PathChooser | None = None) -> "LLMEngine":
        """Load a local Hugging Face checkpoint directory (safetensors) and its tokenizer."""
        from transformers import AutoTokenizer

        from services.engine.models.loader import load_model

        torch.set_num_threads(config.threads)
        model = load_model(model_dir, config.adapter_modules, config.layout, config.torch_dtype, quantization=config.quantization)
        eos = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
        eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        return cls(model, AutoTokenizer.from_pretrained(model_dir), config, chooser or calibrate_for(model, config), eos_ids)

    # --- requests ---------------------------------------------------------------------------

    def add_adapter(self, adapter: Adapter) -> None:
        self.adapters.register(adapter)

    def remove_adapter(self, adapter_id: str) -> None:
        """Drop a registered adapter (slot and host copy); refused while any unfinished request names it."""
        if self.adapter_users[adapter_id]:
            raise ValueError(f"adapter {adapter_id!r} is used by {self.adapter_users[adapter_id]} unfinished request(s)")
        self.adapters.unregister(adapter_id)

    def add_request(self, prompt: str | list[int], adapter_id: str | None = None, params: SamplingParams = SamplingParams()) -> int:
        seq = self.prepare_request(prompt, adapter_id, params)
        self.submit(seq)
        return seq.seq_id

    def prepare_request(self, prompt: str | list[int], adapter_id: str | None = None, params: SamplingParams = SamplingParams()) -> Sequence:
        """Tokenize and check a request (ValueError names what is wrong). Touches no engine state,
        so a server can call it on its own thread while a step runs."""
        prompt_ids = self._encode(prompt)
        self._check_fits(len(prompt_ids))
        return Sequence(next(self._ids), prompt_ids, params, adapter_id)

    def submit(self, seq: Sequence) -> None:
        """Queue a prepared request for the next step."""
        self.sequences[seq.seq_id] = seq
        if seq.adapter_id is not None:
            self.adapter_users[seq.adapter_id] += 1
        if self.tokenizer is not None:
            self.detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer)
        self.scheduler.add(seq)

    def abort(self, seq_id: int) -> None:
        """Cancel a request; its KV blocks and adapter reference are freed at the next step. Safe from
        any thread."""
        self._aborted.append(seq_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    def has_pending_aborts(self) -> bool:
        return bool(self._aborted)

    def load(self) -> EngineLoad:
        refs = sum(entry.refs for entry in self.adapters.resident.values())
        used = self.blocks.num_blocks - self.blocks.num_free
        return EngineLoad(len(self.scheduler.running), len(self.scheduler.waiting), used, self.blocks.num_blocks, refs,
                          sum(self.adapter_users.values()))  # fmt: skip

    # --- the loop ---------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        outputs = self._apply_aborts()
        chunks = self.scheduler.schedule()
        if not chunks:
            return outputs
        start = time.perf_counter()
        for c in chunks:
            c.seq.timings.first_scheduled = c.seq.timings.first_scheduled or start  # queue time ends here
        sampled, logits = self.runner.run(chunks)
        tokens = sample(logits.float(), [c.seq.params for c in sampled], [c.seq.generator for c in sampled])
        self._advance(chunks)
        outputs += [self._postprocess(c.seq, token) for c, token in zip(sampled, tokens)]
        record = StepRecord(time.perf_counter() - start, sum(c.num_new for c in chunks), len(chunks),
                            len({c.seq.adapter_id for c in chunks}), len(sampled))  # fmt: skip
        self.step_stats.record(record, self.scheduler.num_preemptions)
        for listener in self.step_listeners:
            listener(record)
        return outputs

    def generate(self, prompts: list[str | list[int]], adapter_ids: list[str | None], params: SamplingParams) -> list[Sequence]:
        """Offline batch API: run every request to completion."""
        seqs = [self.sequences[self.add_request(p, a, params)] for p, a in zip(prompts, adapter_ids)]
        while self.has_unfinished():
            self.step()
        return seqs

    # --- helpers ----------------------------------------------------------------------------

    def _advance(self, chunks: list[ScheduledChunk]) -> None:
        for c in chunks:
            c.seq.num_cached += c.num_new

    def _postprocess(self, seq: Sequence, token: int) -> StepOutput:
        seq.output_ids.append(token)
        seq.timings.first_token = seq.timings.first_token or time.perf_counter()
        detok = self.detokenizers.get(seq.seq_id)
        if detok is not None:
            detok.push(seq.output_ids)
        reason = self._finish_reason(seq, token)
        if detok is not None and reason is not None:
            detok.push(seq.output_ids, final=True)
        text = "" if detok is None else _stream_delta(detok, seq.params.stop, reason)
        if reason is not None:
            self._finish(seq, reason)
        return StepOutput(seq.seq_id, (token,), text, reason, len(seq.prompt_ids), len(seq.output_ids), seq.timings)

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            return FinishReason.STOP
        detok = self.detokenizers.get(seq.seq_id)
        if detok is not None and any(s in detok.text for s in seq.params.stop):
            return FinishReason.STOP
        if len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_tokens >= self._max_tokens:
            return FinishReason.LENGTH  # asked for no more, or the model's context or the whole KV cache is full
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        seq.timings.finished = time.perf_counter()
        del self.sequences[seq.seq_id]
        if seq.adapter_id is not None:
            self.adapter_users[seq.adapter_id] -= 1
            if not self.adapter_users[seq.adapter_id]:
                del self.adapter_users[seq.adapter_id]
        self.detokenizers.pop(seq.seq_id, None)

    def _apply_aborts(self) -> list[StepOutput]:
        outputs = []
        while self._aborted:
            seq = self.sequences.get(self._aborted.popleft())
            if seq is not None and not seq.is_finished:
                self._finish(seq, FinishReason.ABORTED)
                outputs.append(StepOutput(seq.seq_id, (), "", FinishReason.ABORTED, len(seq.prompt_ids), len(seq.output_ids), seq.timings))
        return outputs

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _check_fits(self, num_prompt: int) -> None:
        if num_prompt == 0:
            raise ValueError("the prompt is empty")
        if num_prompt >= self.model.max_positions:
            raise ValueError(f"the prompt has {num_prompt} tokens; this model's context is {self.model.max_positions}")
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if num_prompt + 1 > capacity:
            raise ValueError(f"the prompt has {num_prompt} tokens; the KV cache holds {capacity} positions in all")


def _stream_delta(detok: IncrementalDetokenizer, stops: tuple[str, ...], reason: FinishReason | None) -> str:
    """The text to send now. The output is cut before the first stop string, and text that
    could still become the start of one is held back until it cannot (or the request ends)."""
    text = detok.text
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    end = cut if reason is not None else cut - _held_back(text[:cut], stops)
    delta = text[detok.emitted : end]
    detok.emitted = max(detok.emitted, end)
    return delta


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def calibrate_for(model: CausalLM, config: EngineConfig) -> CostModel:
    """The cost model, measured at the width of the model's first adapted layer type."""
    layers = list(model.adapted_layers().values())
    if not layers:
        return calibrate(config.torch_dtype, config.quantization, repeats=1)  # nothing to choose: a token calibration
    return calibrate(config.torch_dtype, config.quantization, layers[0].d_in, layers[0].d_out, lora_dtype=config.layout.lora_dtype)
