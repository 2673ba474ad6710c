"""Scheduler, block manager and adapter residency: the bookkeeping, without a model."""

from __future__ import annotations

import pytest
import torch

from services.engine.adapter_format import AdapterKind, AdapterSpec
from services.engine.adapter_manager import Adapter, AdapterManager
from services.engine.adapter_slots import SlotLayout, SlotPool
from services.engine.adapter_weights import FloraWeights, LoraWeights
from services.engine.block_manager import BlockManager
from services.engine.layers import MultiAdapterLinear
from services.engine.sampling import SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig
from services.engine.sequence import FinishReason, Sequence, SequenceStatus

D = 8
LAYOUT = SlotLayout((SlotPool(AdapterKind.FLORA, 2, 2), SlotPool(AdapterKind.LORA, 4, 1)))
MODULES = ("attn.c_attn", "mlp.c_fc")


def make_adapters() -> AdapterManager:
    layers = {f"h.{i}.{m}": MultiAdapterLinear(torch.randn(D, D), None, LAYOUT, j) for i in range(2) for j, m in enumerate(MODULES)}
    return AdapterManager(LAYOUT, layers, MODULES)


def flora(adapter_id: str, modules=("h.0.attn.c_attn", "h.1.attn.c_attn")) -> Adapter:
    spec = AdapterSpec(AdapterKind.FLORA, 2, tuple(modules), "tiny")
    return Adapter(adapter_id, spec, {m: FloraWeights(torch.rand(D, 2), torch.rand(2, D)) for m in modules})


def lora(adapter_id: str) -> Adapter:
    spec = AdapterSpec(AdapterKind.LORA, 4, ("h.0.mlp.c_fc",), "tiny", alpha=8.0)
    return Adapter(adapter_id, spec, {"h.0.mlp.c_fc": LoraWeights(torch.rand(4, D), torch.rand(D, 4), 2.0)})


def seq(i: int, prompt_len: int, adapter: str | None = None, max_new: int = 4) -> Sequence:
    return Sequence(i, list(range(1, prompt_len + 1)), SamplingParams(max_new_tokens=max_new), adapter)


def run_step(chunks) -> None:
    """What the engine does after the forward pass: cache the chunk, sample one token if it completes."""
    for c in chunks:
        samples = c.samples
        c.seq.num_cached += c.num_new
        if samples:
            c.seq.output_ids.append(7)


class TestBlockManager:
    def test_allocate_grows_and_free_returns(self):
        blocks = BlockManager(4, 4)
        s = seq(0, 5)
        assert blocks.allocate(s, 5) and s.block_table == [0, 1]
        assert blocks.allocate(s, 8) and s.block_table == [0, 1]
        assert blocks.allocate(s, 9) and s.block_table == [0, 1, 2]
        assert not blocks.allocate(s, 17) and s.block_table == [0, 1, 2]  # no partial growth
        blocks.free(s)
        assert blocks.num_free == 4 and s.block_table == [] and s.num_cached == 0


class TestScheduler:
    def make(self, num_blocks=64, block_size=4, **config) -> Scheduler:
        return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size), make_adapters())

    def test_prefill_then_decode_and_budget(self):
        sched = self.make(max_num_batched_tokens=10)
        for i, n in enumerate([6, 3, 5]):
            sched.add(seq(i, n))
        first = sched.schedule()
        assert [(c.seq.seq_id, c.num_new) for c in first] == [(0, 6), (1, 3), (2, 1)]  # chunked prefill of seq 2
        run_step(first)
        second = sched.schedule()
        assert [(c.seq.seq_id, c.num_new) for c in second] == [(0, 1), (1, 1), (2, 4)]

    def test_arrival_mid_run_joins_next_step(self):
        sched = self.make()
        sched.add(seq(0, 3))
        run_step(sched.schedule())
        sched.add(seq(1, 4))
        chunks = sched.schedule()
        assert [(c.seq.seq_id, c.num_new) for c in chunks] == [(0, 1), (1, 4)]

    def test_finished_leaves_at_once(self):
        sched = self.make()
        a, b = seq(0, 3), seq(1, 3)
        sched.add(a), sched.add(b)
        run_step(sched.schedule())
        sched.finish(a, FinishReason.LENGTH)
        assert [c.seq.seq_id for c in sched.schedule()] == [1]
        assert a.status is SequenceStatus.FINISHED and a.block_table == []

    def test_max_num_seqs(self):
        sched = self.make(max_num_seqs=2)
        for i in range(3):
            sched.add(seq(i, 2))
        assert [c.seq.seq_id for c in sched.schedule()] == [0, 1]

    def test_kv_exhaustion_preempts_newest_and_recomputes(self):
        sched = self.make(num_blocks=3, block_size=4)
        a, b = seq(0, 4), seq(1, 4)
        sched.add(a), sched.add(b)
        run_step(sched.schedule())  # both prompts fill one block each: 1 block free
        run_step(sched.schedule())  # a decodes into block 3; b needs a block too: b is preempted
        assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1 and b.block_table == []
        assert sched.waiting[0] is b and a.status is SequenceStatus.RUNNING
        sched.finish(a, FinishReason.LENGTH)
        chunks = sched.schedule()
        assert [(c.seq.seq_id, c.num_new) for c in chunks] == [(1, 5)]  # prompt + its generated token, recomputed

    def test_adapter_not_registered_waits_without_blocking(self):
        sched = self.make()
        sched.add(seq(0, 3, adapter="pending"))
        sched.add(seq(1, 3))
        assert [c.seq.seq_id for c in sched.schedule()] == [1]
        sched.adapters.register(flora("pending"))
        assert [c.seq.seq_id for c in sched.schedule()] == [1, 0]

    def test_more_adapters_than_slots(self):
        sched = self.make()
        for name in ("a", "b", "c"):
            sched.adapters.register(flora(name))
        for i, name in enumerate(["a", "b", "c"]):
            sched.add(seq(i, 2, adapter=name))
        first = sched.schedule()
        assert [c.seq.seq_id for c in first] == [0, 1]  # two FLoRA slots, both referenced
        run_step(first)
        sched.finish(first[0].seq, FinishReason.LENGTH)
        assert [c.seq.seq_id for c in sched.schedule()] == [1, 2]  # "a" unreferenced: evicted for "c"
        assert sched.adapters.stats.evictions == 1 and "a" not in sched.adapters.resident


class TestAdapterManager:
    def test_lru_refcount_and_reuse(self):
        m = make_adapters()
        m.register(flora("a")), m.register(flora("b")), m.register(flora("c"))
        slot_a = m.acquire("a")
        slot_b = m.acquire("b")
        assert m.acquire("c") is None  # both slots referenced
        m.release("a")
        assert m.acquire("a") == slot_a and m.stats.hits == 1  # still resident: a hit
        m.release("a"), m.release("b")
        assert m.acquire("c") == slot_b  # "a" was used after "b": "b" is the least recently used
        assert m.stats.misses == 3 and m.stats.evictions == 1
        assert set(m.resident) == {"a", "c"}

    def test_untargeted_types_run_as_base_and_partial_layers_get_neutral(self):
        m = make_adapters()
        m.register(flora("only-layer-0", modules=("h.0.attn.c_attn",)))
        slot = m.acquire("only-layer-0")
        assert m.slot_for_type("only-layer-0", 0) == slot and m.slot_for_type("only-layer-0", 1) == -1
        pool = m.layers["h.1.attn.c_attn"].slots.pools[0]
        # h.1's c_attn is not targeted: identity FLoRA there (B = 1, A = 1/2 over the 2 ranks).
        assert torch.equal(pool.b[:, slot], torch.ones(2, D)) and torch.equal(pool.a[:, slot], torch.full((2, D), 0.5))

    def test_register_errors(self):
        m = make_adapters()
        m.register(flora("a"))
        with pytest.raises(ValueError, match="already registered"):
            m.register(flora("a"))
        with pytest.raises(ValueError, match="targets modules this engine does not adapt"):
            m.register(flora("x", modules=("h.9.attn.c_attn",)))
        big = Adapter("big", AdapterSpec(AdapterKind.LORA, 8, ("h.0.mlp.c_fc",), "tiny", alpha=1.0), {})
        with pytest.raises(ValueError, match=r"no lora pool holds rank 8 \(capacities: \[4\]\)"):
            m.register(big)
        m.acquire("a")
        with pytest.raises(ValueError, match="in use by 1 sequence"):
            m.unregister("a")
