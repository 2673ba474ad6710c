"""The replica's engine, built from WorkerSettings."""

from __future__ import annotations

import json
from pathlib import Path

from services.engine.adapter_format import AdapterKind
from services.engine.adapter_slots import SlotPool
from services.engine.base_weights import Quantization
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.models.smollm2 import materialize_smollm2
from services.engine.scheduler import SchedulerConfig
from services.worker.settings import FAMILY_MODULES, MiB, WorkerSettings


def model_dir(settings: WorkerSettings) -> Path:
    path = materialize_smollm2() if settings.model == "smollm2" else Path(settings.model)
    if not (path / "config.json").is_file():
        raise ValueError(f"FLORA_WORKER_MODEL={settings.model!r}: no config.json there (a Hugging Face checkpoint directory, or 'smollm2')")
    return path


def engine_config(settings: WorkerSettings, model_type: str) -> EngineConfig:
    modules = settings.adapter_modules or FAMILY_MODULES.get(model_type, ())
    if not modules:
        raise ValueError(f"model type {model_type!r} has no default adapter modules: set FLORA_WORKER_ADAPTER_MODULES")
    pools = [SlotPool(kind, r, settings.slots_per_pool) for kind in (AdapterKind.FLORA, AdapterKind.LORA) for r in settings.ranks]
    return EngineConfig(
        adapter_modules=modules,
        pools=(*pools, SlotPool(AdapterKind.IA3, 1, settings.slots_per_pool)),
        scheduler=SchedulerConfig(settings.max_num_seqs, settings.max_num_batched_tokens),
        kv_cache_bytes=settings.kv_cache_mib * MiB,
        quantization=Quantization(settings.quantization),
        lora_dtype=settings.lora_dtype,
        threads=settings.threads,
    )


def build_engine(settings: WorkerSettings) -> LLMEngine:
    path = model_dir(settings)
    model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    return LLMEngine.from_model_dir(path, engine_config(settings, model_type))
