"""Adapter residency: host-RAM adapters, device slots, LRU eviction, reference counts.

The engine is handed adapters as tensors (`register`); where they came from (disk,
S3) is the worker's business. A sequence `acquire`s its adapter when admitted and
`release`s it when it finishes or is preempted; an adapter with references is never
evicted. Loads happen between steps, in place, into preallocated slots.

Layers of one module type (say every `attn.c_attn`) share one adapter batch per
step. An adapter that does not target a module type runs as "no adapter" there
(its rows get slot -1 in that type's batch); one that targets a type in only some
layers gets the neutral adapter in the others (FLoRA: B A = 1; LoRA: 0; IA3: 1).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from services.engine.adapter_format import AdapterKind, AdapterSpec
from services.engine.adapter_slots import NO_ADAPTER, SlotLayout
from services.engine.adapter_weights import FloraWeights, Ia3Weights, LayerAdapter, LoraWeights
from services.engine.layers import MultiAdapterLinear


@dataclass(frozen=True)
class Adapter:
    adapter_id: str
    spec: AdapterSpec
    weights: dict[str, LayerAdapter]  # full module name -> this layer's tensors (host memory)


@dataclass
class AdapterStats:
    hits: int = 0
    misses: int = 0  # loads into a slot
    evictions: int = 0
    load_seconds: float = 0.0


@dataclass
class _Resident:
    slot: int
    refs: int = 0
    types: frozenset[int] = field(default_factory=frozenset)  # module-type indices it adapts


class AdapterManager:
    def __init__(self, layout: SlotLayout, layers: dict[str, MultiAdapterLinear], module_types: tuple[str, ...]):
        self.layout, self.layers, self.module_types = layout, layers, module_types
        self.type_of = {name: _module_type(name, module_types) for name in layers}
        self.host: dict[str, Adapter] = {}
        self.resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU first
        self.free_slots = [list(range(layout.offsets[p + 1] - 1, layout.offsets[p] - 1, -1)) for p in range(len(layout.pools))]
        self.stats = AdapterStats()

    def register(self, adapter: Adapter) -> None:
        """Keep an adapter in host memory, ready to load. Ids are immutable: a new version is a new id."""
        if adapter.adapter_id in self.host:
            raise ValueError(f"adapter {adapter.adapter_id!r} is already registered")
        self._validate(adapter)
        self.host[adapter.adapter_id] = adapter

    def unregister(self, adapter_id: str) -> None:
        entry = self.resident.get(adapter_id)
        if entry is not None and entry.refs:
            raise ValueError(f"adapter {adapter_id!r} is in use by {entry.refs} sequence(s)")
        if entry is not None:
            self._evict(adapter_id)
        self.host.pop(adapter_id, None)

    def is_registered(self, adapter_id: str) -> bool:
        return adapter_id in self.host

    def acquire(self, adapter_id: str) -> int | None:
        """The adapter's slot, loading it (and evicting the LRU unused one) if needed; None if no slot is free."""
        entry = self.resident.get(adapter_id)
        if entry is None:
            entry = self._load(self.host[adapter_id])
            if entry is None:
                return None
        else:
            self.stats.hits += 1
        self.resident.move_to_end(adapter_id)
        entry.refs += 1
        return entry.slot

    def release(self, adapter_id: str) -> None:
        self.resident[adapter_id].refs -= 1

    def slot_for_type(self, adapter_id: str | None, type_index: int) -> int:
        """The slot a row of this adapter uses in module type `type_index`'s batch (-1: runs as base)."""
        if adapter_id is None:
            return NO_ADAPTER
        entry = self.resident[adapter_id]
        return entry.slot if type_index in entry.types else NO_ADAPTER

    def _load(self, adapter: Adapter) -> _Resident | None:
        pool = self.layout.pool_for(adapter.spec.kind, adapter.spec.rank)
        if not self.free_slots[pool] and not self._evict_lru(pool):
            return None
        start = time.perf_counter()
        slot = self.free_slots[pool].pop()
        types = frozenset(self.type_of[name] for name in adapter.weights)
        for name, layer in self.layers.items():
            if self.type_of[name] in types:
                layer.slots.load(slot, adapter.weights.get(name) or _neutral(adapter.spec, layer))
        self.stats.misses += 1
        self.stats.load_seconds += time.perf_counter() - start
        entry = self.resident[adapter.adapter_id] = _Resident(slot, 0, types)
        return entry

    def _evict_lru(self, pool: int) -> bool:
        for adapter_id, entry in self.resident.items():
            if entry.refs == 0 and self.layout.locate(entry.slot)[0] == pool:
                self._evict(adapter_id)
                self.stats.evictions += 1
                return True
        return False

    def _evict(self, adapter_id: str) -> None:
        entry = self.resident.pop(adapter_id)
        self.free_slots[self.layout.locate(entry.slot)[0]].append(entry.slot)

    def _validate(self, adapter: Adapter) -> None:
        unknown = sorted(set(adapter.weights) - set(self.layers))
        if unknown:
            raise ValueError(f"adapter {adapter.adapter_id!r} targets modules this engine does not adapt: {unknown[:5]}")
        self.layout.pool_for(adapter.spec.kind, adapter.spec.rank)  # raises if no pool holds it
        for name, w in adapter.weights.items():
            if w.kind is not adapter.spec.kind or w.rank > adapter.spec.rank:
                raise ValueError(f"adapter {adapter.adapter_id!r}: {name} holds a rank-{w.rank} {w.kind.value} adapter, the spec says {adapter.spec.kind.value} rank {adapter.spec.rank}")


def _module_type(name: str, module_types: tuple[str, ...]) -> int:
    for i, module_type in enumerate(module_types):
        if name.endswith("." + module_type):
            return i
    raise ValueError(f"layer {name} matches none of the adapter module types {module_types}")


def _neutral(spec: AdapterSpec, layer: MultiAdapterLinear) -> LayerAdapter:
    """The adapter that leaves `layer` unchanged, for a targeted type's untargeted layers."""
    match spec.kind:
        case AdapterKind.FLORA:
            return FloraWeights.identity(layer.d_in, layer.d_out, spec.rank)
        case AdapterKind.LORA:
            return LoraWeights(torch.zeros(spec.rank, layer.d_in), torch.zeros(layer.d_out, spec.rank), 1.0)
        case AdapterKind.IA3:
            return Ia3Weights(torch.ones(layer.d_out), on_input=False)
