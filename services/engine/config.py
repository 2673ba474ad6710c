"""Engine configuration: one frozen dataclass, validated with clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.engine.adapter_format import AdapterKind
from services.engine.adapter_slots import SlotLayout, SlotPool
from services.engine.base_weights import Quantization
from services.engine.scheduler import SchedulerConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NARROW_LORA_DTYPES = {"bfloat16": torch.bfloat16, "int8": torch.int8}  # LoRA slot storage under float32 layers


def default_pools(slots_per_pool: int = 8) -> tuple[SlotPool, ...]:
    """FLoRA and LoRA pools at rank capacities 1..32 (powers of two), and IA3."""
    ranks = (1, 2, 4, 8, 16, 32)
    pools = [SlotPool(kind, r, slots_per_pool) for kind in (AdapterKind.FLORA, AdapterKind.LORA) for r in ranks]
    return (*pools, SlotPool(AdapterKind.IA3, 1, slots_per_pool))


@dataclass(frozen=True)
class EngineConfig:
    adapter_modules: tuple[str, ...] = ("attn.c_attn",)  # module types that can carry adapters
    pools: tuple[SlotPool, ...] = field(default_factory=default_pools)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30  # the KV budget; the cache is allocated once at start
    dtype: str = "float32"
    # How the linears store their weights: dense in `dtype` (exact), or int8 with per-row
    # int8 activations (base_weights.py; 1.75x the fp32 32-request throughput on this VNNI CPU: docs/engine.md).
    quantization: Quantization = Quantization.NONE
    # LoRA slot storage: "auto" keeps `dtype`; under float32, "bfloat16" halves the adapter bytes a
    # step reads (vLLM's --lora-dtype) and "int8" quarters them (one scale per rank row, as
    # llama.cpp's q8_0 LoRA files; adapter_slots.LoraPool). Sums stay fp32; FLoRA and IA3 vectors
    # are small and keep `dtype`.
    lora_dtype: str = "auto"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.quantization, Quantization):
            raise ValueError(f"quantization must be one of {[q.value for q in Quantization]}, got {self.quantization!r}")
        if self.quantization is Quantization.INT8 and self.dtype != "float32":
            raise ValueError(f"int8 weights compute in float32 (their epilogue and the adapters), got dtype={self.dtype!r}")
        if self.lora_dtype not in ("auto", self.dtype) and not (self.lora_dtype in NARROW_LORA_DTYPES and self.dtype == "float32"):
            raise ValueError(
                f"lora_dtype must be 'auto', the model dtype {self.dtype!r}, or 'bfloat16' or 'int8' under float32; got {self.lora_dtype!r}"
            )
        if self.block_size < 1 or self.kv_cache_bytes < 1 or self.threads < 1:
            raise ValueError(f"block_size, kv_cache_bytes and threads must be >= 1 (got {self.block_size}, {self.kv_cache_bytes}, {self.threads})")
        if len(set(self.adapter_modules)) != len(self.adapter_modules):
            raise ValueError(f"adapter_modules has duplicates: {self.adapter_modules}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def layout(self) -> SlotLayout:
        return SlotLayout(self.pools, None if self.lora_dtype == "auto" else (DTYPES | NARROW_LORA_DTYPES)[self.lora_dtype])
