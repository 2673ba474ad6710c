"""The gateway against the engine alone, in one run: what the router, Ray Serve and gRPC cost.

    flora-gateway bench gateway        (or: python -m benchmarks.gateway)

The engine throughput workload (benchmarks/throughput.py): SmolLM2-135M, 32 concurrent
requests x 64 new tokens (ignore_eos), greedy, int8 weights with int8 LoRA slots, LoRA
rank 8 on q,k,v,o, one adapter per request, and two adapters half/half. Each round serves
it once through the whole stack (32 concurrent GenerateStream calls to the router ->
Serve's gRPC proxy -> the replica's AsyncEngine) and once on an engine alone (the same
WorkerSettings, `LLMEngine.generate` in this process, while the Ray cluster idles), both
after a warm-up. Real parts: redis-server, moto's S3 server (the adapters' blobs), a
local Ray cluster. Also: time to first token of one request at a time, gateway vs engine
(what the gateway adds, p50 / p99), the same under the 32-request burst, a cold adapter's
time from S3 to first token, and the memory of the process tree (router + Ray + worker).
Writes <out>/gateway.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from adapters_store.format import load_layer_adapters
from adapters_store.settings import S3Settings
from adapters_store.settings import Settings as StoreSettings
from adapters_store.store import AdapterStore
from benchmarks.throughput import QKVO, prompts
from benchmarks.timing import machine
from services.demo_adapters import write_synthetic_adapter
from services.engine.adapter_format import AdapterKind
from services.engine.adapter_manager import Adapter
from services.engine.engine import LLMEngine
from services.engine.models.smollm2 import materialize_smollm2
from services.engine.sampling import SamplingParams
from services.local_processes import Stops, start_redis
from services.protos import gateway_pb2, gateway_pb2_grpc
from services.router.server import RouterThread
from services.router.settings import RouterSettings
from services.worker.app import start_worker
from services.worker.engine_setup import build_engine
from services.worker.settings import WorkerSettings

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUCKET = "bench"


@dataclass(frozen=True)
class Tenant:
    name: str
    key: str
    ref: str


@dataclass(frozen=True)
class Run:
    tokens_per_s: float
    ttft_s: list[float]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---- the gateway ----------------------------------------------------------------------------


async def stream(stub, tenant: Tenant, prompt: str, new_tokens: int) -> tuple[int, float]:
    """(tokens received, seconds to the first chunk)."""
    params = gateway_pb2.SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start, first, tokens = time.perf_counter(), None, 0
    call = stub.GenerateStream(gateway_pb2.GenerateRequest(tenant_id=tenant.name, prompt=prompt, sampling=params),
                               metadata=(("authorization", f"Bearer {tenant.key}"),), timeout=600)  # fmt: skip
    async for chunk in call:
        first = first or time.perf_counter() - start
        tokens += len(chunk.token_ids)
    return tokens, first


async def gateway_burst(address: str, tenants: list[Tenant], new_tokens: int) -> Run:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        start = time.perf_counter()
        results = await asyncio.gather(*(stream(stub, t, p, new_tokens) for t, p in zip(tenants, prompts(len(tenants)))))
        seconds = time.perf_counter() - start
    return Run(sum(n for n, _ in results) / seconds, [ttft for _, ttft in results])


async def gateway_one_at_a_time(address: str, tenant: Tenant, count: int) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        return [(await stream(stub, tenant, prompts(1)[0], 1))[1] for _ in range(count)]


# ---- the engine alone -----------------------------------------------------------------------


def engine_burst(engine: LLMEngine, adapter_ids: list[str], new_tokens: int) -> Run:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    seqs = engine.generate(prompts(len(adapter_ids)), adapter_ids, params)
    seconds = time.perf_counter() - start
    return Run(sum(len(s.output_ids) for s in seqs) / seconds, [s.timings.first_token - start for s in seqs])


def engine_one_at_a_time(engine: LLMEngine, adapter_id: str, count: int) -> list[float]:
    return [engine_burst(engine, [adapter_id], 1).ttft_s[0] for _ in range(count)]


# ---- set-up ---------------------------------------------------------------------------------


def upload_tenants(store: AdapterStore, model_dir: Path, workdir: Path, count: int, prefix: str) -> list[Tenant]:
    tenants = []
    for i in range(count):
        name = f"{prefix}{i}"
        path = write_synthetic_adapter(workdir / f"{name}.safetensors", AdapterKind.LORA, 8, QKVO, model_dir, MODEL_ID, seed=i)
        result = store.upload(store.prepare(path), name)
        tenants.append(Tenant(name, result.api_key, str(result.registration.version.ref)))
    return tenants


def engine_alone(worker: WorkerSettings, store: AdapterStore, tenants: list[Tenant]) -> LLMEngine:
    engine = build_engine(worker)
    for t in tenants:
        record, data = store.read(store.registry.tenant(t.name).alias)
        spec, weights = load_layer_adapters(data)
        engine.add_adapter(Adapter(t.ref, spec, weights))
    return engine


def process_tree() -> dict[str, tuple[float, float]]:
    """Per process of this tree, grouped by name: (resident MiB, CPU seconds so far). This process
    holds the router, the benchmark's client and the engine alone."""
    import psutil

    me = psutil.Process()
    tree: dict[str, tuple[float, float]] = {"driver (router, client, engine alone)": _usage(me)}
    for child in me.children(recursive=True):
        try:
            name = child.name() if child.name().startswith(("ray::", "raylet", "gcs_server", "redis")) else child.cmdline()[0].rsplit("/", 1)[-1]
            rss, cpu = tree.get(name, (0.0, 0.0))
            mib, seconds = _usage(child)
            tree[name] = (rss + mib, cpu + seconds)
        except psutil.Error:
            continue
    return tree


def _usage(process) -> tuple[float, float]:
    times = process.cpu_times()
    return process.memory_info().rss / 2**20, times.user + times.system


def cpu_during(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {name: after[name][1] - before.get(name, (0.0, 0.0))[1] for name in after}


# ---- the run --------------------------------------------------------------------------------


def measure(address: str, engine: LLMEngine, scenario: list[Tenant], new_tokens: int) -> tuple[Run, Run, dict[str, float]]:
    """(gateway, engine alone, CPU seconds per process during the gateway's burst) for one
    scenario: a warm-up, then one measured burst each."""
    asyncio.run(gateway_burst(address, scenario, 2))
    before = process_tree()
    gateway = asyncio.run(gateway_burst(address, scenario, new_tokens))
    cpu = cpu_during(before, process_tree())
    ids = [t.ref for t in scenario]
    engine_burst(engine, ids, 2)
    return gateway, engine_burst(engine, ids, new_tokens), cpu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3(bucket: str):
    """moto's S3 server (a real S3 HTTP API) on a free loopback port, `bucket` created -> its endpoint."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket=bucket)  # fmt: skip
        yield endpoint
    finally:
        server.stop()


def run(args: argparse.Namespace, workdir: Path) -> dict:
    import ray

    model_dir = materialize_smollm2()
    stops = Stops()
    redis_url = f"redis://127.0.0.1:{start_redis(workdir / 'redis', free_port(), stops).port}/0"
    with local_s3(BUCKET) as s3_endpoint:
        s3 = S3Settings(endpoint_url=s3_endpoint, access_key_id="bench", secret_access_key="bench")
        store_settings = StoreSettings(redis_url=redis_url, blob_url=f"s3://{BUCKET}/adapters", s3=s3, base_model=MODEL_ID,
                                       base_model_config=model_dir / "config.json")  # fmt: skip
        store = AdapterStore.open(store_settings)
        tenants = upload_tenants(store, model_dir, workdir, args.requests, "t")
        cold = upload_tenants(store, model_dir, workdir, args.cold, "cold")
        worker = WorkerSettings(model=str(model_dir), adapter_modules=QKVO, quantization=args.quantization, lora_dtype=args.lora_dtype,
                                threads=args.threads, max_rank=8, slots_per_pool=args.requests + args.cold,
                                stream_interval_ms=args.stream_interval_ms,
                                disk_cache_dir=workdir / "disk-cache", grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=0)  # fmt: skip
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            start_worker(worker, store_settings)
            router = RouterThread(RouterSettings(listen="127.0.0.1:0", metrics_port=0, worker_address=f"127.0.0.1:{args.grpc_port}"), store_settings)
            engine = engine_alone(worker, store, tenants)
            report = measure_all(args, router.address, engine, tenants, cold)
            report["memory_mib"] = {name: rss for name, (rss, _) in process_tree().items()}
            router.stop()
        finally:
            ray.shutdown()
            stops.run()
    return report


def measure_all(args: argparse.Namespace, address: str, engine: LLMEngine, tenants: list[Tenant], cold: list[Tenant]) -> dict:
    scenarios = {"LoRA r8 on q,k,v,o, one per request": tenants,
                 "LoRA r8 on q,k,v,o, 2 adapters half/half": [tenants[i % 2] for i in range(len(tenants))]}  # fmt: skip
    rounds: dict[str, list[tuple[Run, Run]]] = {name: [] for name in scenarios}
    cpu: dict[str, float] = {}
    for r in range(args.rounds):
        for name, scenario in scenarios.items():
            g, e, used = measure(address, engine, scenario, args.new_tokens)
            rounds[name].append((g, e))
            cpu = {k: cpu.get(k, 0.0) + v for k, v in used.items()}
            print(f"  round {r + 1}, {name}: gateway {g.tokens_per_s:.0f} tok/s, engine {e.tokens_per_s:.0f} tok/s", file=sys.stderr, flush=True)
    idle_gateway = asyncio.run(gateway_one_at_a_time(address, tenants[0], args.single))
    idle_engine = engine_one_at_a_time(engine, tenants[0].ref, args.single)
    cold_ttft = [asyncio.run(gateway_one_at_a_time(address, t, 1))[0] for t in cold]
    return dict(
        scenarios={name: summarize(runs) for name, runs in rounds.items()},
        ttft_one_at_a_time=ttft_summary(idle_gateway, idle_engine),
        ttft_burst=ttft_summary([x for g, _ in rounds[next(iter(rounds))] for x in g.ttft_s], [x for _, e in rounds[next(iter(rounds))] for x in e.ttft_s]),
        cold_adapter_ttft_s=dict(p50=statistics.median(cold_ttft), all=cold_ttft),
        gateway_cpu_seconds={k: v for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.05},
        gateway_seconds=sum(args.new_tokens * len(tenants) / g.tokens_per_s for runs in rounds.values() for g, _ in runs),
    )


def summarize(runs: list[tuple[Run, Run]]) -> dict:
    return dict(gateway_tokens_per_s=statistics.median(g.tokens_per_s for g, _ in runs),
                engine_tokens_per_s=statistics.median(e.tokens_per_s for _, e in runs),
                ratio=statistics.median(g.tokens_per_s / e.tokens_per_s for g, e in runs),
                rounds=[(g.tokens_per_s, e.tokens_per_s) for g, e in runs])  # fmt: skip


def ttft_summary(gateway: list[float], engine: list[float]) -> dict:
    p = {q: (percentile(gateway, q), percentile(engine, q)) for q in (0.5, 0.99)}
    return {f"p{int(q * 100)}": dict(gateway_s=g, engine_s=e, added_s=g - e) for q, (g, e) in p.items()}


def _interval(ms: int) -> str:
    return "a message per engine step" if ms == 0 else f"at most one message per {ms} ms per request (first and last token not held)"


def markdown(report: dict) -> str:
    lines = [f"# The gateway against the engine alone — {report['machine']}", "", f"Command: `{report['command']}`", ""]
    lines += [f"SmolLM2-135M-Instruct, {report['requests']} concurrent requests × {report['new_tokens']} new tokens (ignore_eos), greedy, "
              f"{report['quantization']} weights, LoRA slots {report['lora_dtype']}, {report['threads']} torch threads on the replica "
              f"and on the engine alone; the worker streams {_interval(report['stream_interval_ms'])}. Medians over {report['rounds']} rounds; each round serves each scenario through the gateway "
              "(32 concurrent GenerateStream calls: router -> Ray Serve gRPC proxy -> replica) and on the engine alone, after a warm-up.", ""]
    lines += ["| scenario | gateway tok/s | engine alone tok/s | gateway / engine (median of rounds) |", "|---|---|---|---|"]
    for name, s in report["scenarios"].items():
        lines.append(f"| {name} | {s['gateway_tokens_per_s']:.0f} | {s['engine_tokens_per_s']:.0f} | {s['ratio']:.3f} |")
    for title, key in (("one request at a time", "ttft_one_at_a_time"), ("under the 32-request burst (one adapter per request)", "ttft_burst")):
        t = report[key]
        lines += ["", f"Time to first token, {title}: " + "; ".join(
            f"{p} gateway {v['gateway_s'] * 1000:.1f} ms, engine {v['engine_s'] * 1000:.1f} ms, added {v['added_s'] * 1000:.1f} ms" for p, v in t.items())]
    lines += ["", f"Cold adapter (never requested; its blob in S3), time to first token through the gateway: p50 "
              f"{report['cold_adapter_ttft_s']['p50'] * 1000:.0f} ms over {len(report['cold_adapter_ttft_s']['all'])} adapters."]
    lines += ["", f"CPU seconds per process during the measured gateway bursts ({report['gateway_seconds']:.1f} s of wall time on "
              "2 cores): " + "; ".join(f"{k}: {v:.1f}" for k, v in report["gateway_cpu_seconds"].items()) + "."]
    lines += ["", "Resident memory at the end (MiB): " + "; ".join(f"{k}: {v:.0f}" for k, v in report["memory_mib"].items())
              + f"; total {sum(report['memory_mib'].values()):.0f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flora-gateway bench gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="gateway", help="results go to <out>/<name>.{json,md}")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantization", choices=("none", "int8"), default="int8")
    parser.add_argument("--lora-dtype", choices=("auto", "bfloat16", "int8"), default="int8")
    parser.add_argument("--single", type=int, default=30, help="requests for the one-at-a-time time to first token")
    parser.add_argument("--cold", type=int, default=5, help="cold adapters timed from S3 to first token")
    parser.add_argument("--stream-interval-ms", type=int, default=0, help="the worker's FLORA_WORKER_STREAM_INTERVAL_MS (0: a message per engine step)")
    parser.add_argument("--grpc-port", type=int, default=9310)
    parser.add_argument("--http-port", type=int, default=8310)
    args = parser.parse_args(argv)
    if args.requests < 2 or args.rounds < 1 or args.single < 1 or args.cold < 1:
        parser.error("--requests must be >= 2 and --rounds, --single, --cold >= 1")
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        report = run(args, Path(tmp))
    report.update(command="flora-gateway bench gateway " + " ".join(argv if argv is not None else sys.argv[1:]), machine=machine(),
                  requests=args.requests, new_tokens=args.new_tokens, rounds=args.rounds, threads=args.threads,
                  quantization=args.quantization, lora_dtype=args.lora_dtype, stream_interval_ms=args.stream_interval_ms)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
