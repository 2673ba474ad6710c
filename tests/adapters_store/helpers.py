"""Servers, a tiny base model and adapter files shared by the adapter store tests."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import torch

from adapters_store import cli
from adapters_store.format import encode_adapter
from services.engine.adapter_format import AdapterKind, AdapterSpec, tensor_names
from services.engine.model_shapes import module_shapes
from services.local_processes import terminate

BASE_MODEL_ID = "test/tiny-gptbigcode"
# A 2-layer multi-query GPTBigCode: c_attn is 64 -> 64 + 2·16 = 96, c_fc 64 -> 256.
TINY_CONFIG = dict(n_embd=64, n_layer=2, n_head=4, multi_query=True, vocab_size=128, n_positions=64,
                   bos_token_id=0, eos_token_id=0)  # fmt: skip
C_ATTN = ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn")


def tiny_config():
    from transformers import GPTBigCodeConfig

    return GPTBigCodeConfig(**TINY_CONFIG)


def write_tiny_config(directory: Path) -> Path:
    tiny_config().save_pretrained(directory)
    return directory


def tiny_shapes():
    return module_shapes({"model_type": "gpt_bigcode", **TINY_CONFIG})


# ---- adapters ----------------------------------------------------------------------------------


def adapter_tensors(spec: AdapterSpec, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors of the right shapes for `spec` on the tiny model."""
    gen, shapes = torch.Generator().manual_seed(seed), tiny_shapes()
    tensors = {}
    for module in spec.targets:
        shape = shapes.get(module, shapes[C_ATTN[0]])  # a module the model lacks (bad-input tests): c_attn's shape
        d_in, d_out, r = shape.d_in, shape.d_out, spec.rank
        first, second = tensor_names(spec.kind, module)
        match spec.kind:
            case AdapterKind.FLORA:
                tensors[first] = 1 + 0.1 * torch.randn(d_in, r, generator=gen)
                tensors[second] = torch.randn(r, d_out, generator=gen) / r
            case AdapterKind.LORA:
                tensors[first], tensors[second] = torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)
            case AdapterKind.IA3:
                tensors[first] = 1 + 0.1 * torch.randn(d_out, generator=gen)
    return {name: t.to(dtype) for name, t in tensors.items()}


def lora_spec(rank: int = 4, targets: tuple[str, ...] = C_ATTN, base_model: str = BASE_MODEL_ID) -> AdapterSpec:
    return AdapterSpec(AdapterKind.LORA, rank, targets, base_model, alpha=2.0 * rank)


def adapter_bytes(spec: AdapterSpec | None = None, seed: int = 0, dtype: torch.dtype = torch.float32) -> bytes:
    spec = spec or lora_spec()
    return encode_adapter(spec, adapter_tensors(spec, seed, dtype))


def write_adapter(path: Path, spec: AdapterSpec | None = None, seed: int = 0) -> Path:
    path.write_bytes(adapter_bytes(spec, seed))
    return path


# ---- running adapterctl in-process ---------------------------------------------------------------


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str

    @property
    def json(self):
        return json.loads(self.out)


def run_cli(*args: str) -> CliResult:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


# ---- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BUCKET = "flora-test"
S3_CREDENTIALS = {"FLORA_S3_ACCESS_KEY_ID": "testing", "FLORA_S3_SECRET_ACCESS_KEY": "testing"}


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip


@dataclass(frozen=True)
class RedisServer:
    port: int
    workdir: Path
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)


def start_redis(workdir: Path, *options: str, port: int | None = None) -> RedisServer:
    """A `redis-server` on loopback, ready (answers PING) when this returns."""
    port = port or free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), *options]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port, workdir, proc)
    deadline = time.monotonic() + 10
    while True:
        try:
            server.client().ping()
            return server
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_redis(server)
                raise RuntimeError(f"redis-server on port {port} did not start (exit code {proc.poll()})") from None
            time.sleep(0.05)


def stop_redis(server: RedisServer) -> None:
    terminate(server.proc, timeout_s=10)
