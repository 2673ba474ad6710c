"""Turns a scheduled step into one forward pass: inputs, metadata, logits.

Sequences are laid out sorted by their adapter's slot (pool order, then slot), so
each adapter batch finds its rows already grouped and permutes nothing.
"""

from __future__ import annotations

import torch

from services.engine.adapter_batch import AdapterBatch, PathChooser, slot_sort_key
from services.engine.adapter_manager import AdapterManager
from services.engine.adapter_slots import SlotLayout
from services.engine.attention import AttentionBatch, SequenceChunk
from services.engine.context import StepContext, using_step
from services.engine.models import CausalLM
from services.engine.scheduler import ScheduledChunk


class ModelRunner:
    def __init__(self, model: CausalLM, layout: SlotLayout, adapters: AdapterManager, chooser: PathChooser, num_blocks: int, block_size: int, dtype: torch.dtype):
        self.model, self.layout, self.adapters, self._chooser = model, layout, adapters, chooser
        self.block_size = block_size
        dims = {layer.batch_index: (layer.d_in, layer.d_out) for layer in adapters.layers.values()}
        self.type_dims = [dims[i] for i in range(len(dims))]  # (d_in, d_out) of each adapted module type
        shape = (model.num_layers, num_blocks * block_size, model.num_kv_heads, model.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)  # [L, slots, kvH, D]: the whole KV budget, allocated once
        self.v_cache = torch.zeros(shape, dtype=dtype)
        model.attach_kv_cache(self.k_cache, self.v_cache)
        self._plans: dict[tuple, AdapterBatch] = {}  # the last step's adapter batches, by what they depend on

    @property
    def chooser(self) -> PathChooser:
        return self._chooser

    @chooser.setter
    def chooser(self, chooser: PathChooser) -> None:
        """Swap the kernel-path chooser (benchmarks compare paths); plans made by the old one are dropped."""
        self._chooser, self._plans = chooser, {}

    @staticmethod
    def bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
        return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * dtype.itemsize

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], torch.Tensor]:
        """-> (the chunks that sample, in order; their next-token logits [B, V])."""
        chunks = sorted(chunks, key=lambda c: slot_sort_key(self.layout, c.seq.slot))
        input_ids = torch.tensor([t for c in chunks for t in c.seq.token_ids[c.seq.num_cached : c.seq.num_cached + c.num_new]])
        attention = AttentionBatch.build([SequenceChunk(c.seq.num_cached, c.num_new, tuple(c.seq.block_table)) for c in chunks], self.block_size)
        with using_step(StepContext(self._adapter_batches(chunks), attention)):
            hidden = self.model(input_ids, attention.positions)  # [T, d]
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        logits = self.model.compute_logits(hidden[attention.last_token_rows[sampling]])
        return [chunks[i] for i in sampling], logits

    def _adapter_batches(self, chunks: list[ScheduledChunk]) -> tuple[AdapterBatch, ...]:
        """One AdapterBatch per adapted module type: [T] slots, -1 where a row's adapter skips the type.

        A batch depends only on (per-sequence slots, new-token counts, layer dims), so it is planned
        once and reused while that key repeats: on every decode step of an unchanged batch, and by
        module types of equal shape (q_proj and o_proj, k_proj and v_proj)."""
        lengths = tuple(c.num_new for c in chunks)
        plans: dict[tuple, AdapterBatch] = {}
        batches = []
        for type_index, (d_in, d_out) in enumerate(self.type_dims):
            slots = tuple(self.adapters.slot_for_type(c.seq.adapter_id, type_index) for c in chunks)
            key = (slots, lengths, d_in, d_out)
            if key not in plans:
                plans[key] = self._plans.get(key) or self._plan(slots, lengths, d_in, d_out)
            batches.append(plans[key])
        self._plans = plans  # keep this step's plans only: the next step reuses or replaces them
        return tuple(batches)

    def _plan(self, slots: tuple[int, ...], lengths: tuple[int, ...], d_in: int, d_out: int) -> AdapterBatch:
        rows = torch.tensor(slots).repeat_interleave(torch.tensor(lengths))  # [T]
        return AdapterBatch.build(rows, self.layout, self._chooser, d_in, d_out)
