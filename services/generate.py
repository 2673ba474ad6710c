"""`flora-gateway generate`: one prompt through the engine from the shell, text streamed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adapters_store.format import load_layer_adapters
from services.engine.adapter_manager import Adapter
from services.engine.adapter_slots import SlotPool
from services.engine.base_weights import Quantization
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.models.smollm2 import materialize_smollm2
from services.engine.sampling import SamplingParams


def module_type(module: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj': the name within a block."""
    parts = module.split(".")
    index = next(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[index + 1 :])


def run(args: argparse.Namespace) -> int:
    try:
        params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, tuple(args.stop))
    except ValueError as e:
        print(f"flora-gateway generate: {e}", file=sys.stderr)
        return 2
    model_dir = materialize_smollm2() if args.model == "smollm2" else Path(args.model)
    adapter, modules, pools = None, (), ()
    if args.adapter is not None:
        spec, weights = load_layer_adapters(args.adapter)
        adapter = Adapter(args.adapter.stem, spec, weights)
        modules = tuple(dict.fromkeys(module_type(m) for m in spec.targets))
        pools = (SlotPool(spec.kind, spec.rank, 1),)
    config = EngineConfig(
        adapter_modules=modules,
        pools=pools,
        threads=args.threads,
        kv_cache_bytes=64 << 20,
        quantization=Quantization(args.quantization),
        lora_dtype=args.lora_dtype,
    )
    engine = LLMEngine.from_model_dir(model_dir, config)
    if adapter is not None:
        engine.add_adapter(adapter)
    engine.add_request(args.prompt, None if adapter is None else adapter.adapter_id, params)
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.text)
            sys.stdout.flush()
            if out.finish_reason is not None:
                print(f"\n[{out.num_output_tokens} tokens, finish: {out.finish_reason.value}]", file=sys.stderr)
    return 0
