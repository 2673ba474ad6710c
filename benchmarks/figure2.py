"""The paper's figure 2 on this machine: throughput and latency vs rank, FLoRA vs LoRA.

    python -m benchmarks.figure2          (or: flora-gateway bench figure2)

A StarCoderBase-1B-shaped model (random weights; fp32, or int8 with --quantization int8) with adapters on the fused
`attn.c_attn` (the paper's q,k target), every request its own adapter, at ranks
1, 2, 4, 8, 16. Per rank, four configurations of one engine take turns on the same
model: no adapter (the reference), FLoRA (the cost model picks flora / flora_segment
per batch), LoRA with the paper's torch.bmm baseline, and LoRA with the cost model's
best path. Left: generated tokens/s for `--requests` concurrent requests, the median of
`--repeats` runs in rotating order (a slow minute of a shared host then hits every
configuration alike instead of one cell). Right: seconds per output token under
Poisson arrivals at `--rate` requests/s (default: 0.8× what the no-adapter engine
sustains here). Writes <out>/figure2.{json,md,png}
(figure2-int8.* for int8 weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.adapters import random_adapter
from benchmarks.timing import machine
from services.engine.adapter_batch import KernelPath
from services.engine.adapter_format import AdapterKind
from services.engine.adapter_slots import SlotPool
from services.engine.base_weights import Quantization
from services.engine.config import EngineConfig
from services.engine.cost_model import CostModel, FixedPaths
from services.engine.engine import LLMEngine, calibrate_for
from services.engine.models.loader import random_model, starcoder_config
from services.engine.sampling import SamplingParams
from services.engine.scheduler import SchedulerConfig

RANKS = (1, 2, 4, 8, 16)
TARGET = ("attn.c_attn",)
PAPER = "H100, fp16, StarCoder-15B: FLoRA ~3x LoRA (bmm) throughput at rank 1, ~2.5x at rank 2, crossover near rank 8; 2-6x lower latency at ranks 1-4 at 8 req/s"


@dataclass(frozen=True)
class Config:
    name: str
    kind: AdapterKind | None
    chooser: str  # "cost model" or a KernelPath value


CONFIGS = (
    Config("no adapter", None, "cost model"),
    Config("FLoRA", AdapterKind.FLORA, "cost model"),
    Config("LoRA, torch.bmm (paper baseline)", AdapterKind.LORA, KernelPath.LORA_BMM.value),
    Config("LoRA, best path (cost model)", AdapterKind.LORA, "cost model"),
)


def build(requests: int, threads: int, model_name: str, quantization: Quantization) -> tuple[LLMEngine, CostModel]:
    torch.set_num_threads(threads)
    pools = tuple(SlotPool(kind, r, requests) for kind in (AdapterKind.FLORA, AdapterKind.LORA) for r in RANKS)
    config = EngineConfig(adapter_modules=TARGET, pools=pools, threads=threads, kv_cache_bytes=512 << 20,
                          scheduler=SchedulerConfig(max_num_seqs=requests), quantization=quantization)
    model = random_model(starcoder_config(model_name), config.adapter_modules, config.layout, config.torch_dtype, quantization=quantization)
    cost_model = calibrate_for(model, config)
    engine = LLMEngine(model, None, config, cost_model, frozenset())
    layers = model.adapted_layers()
    for kind in (AdapterKind.FLORA, AdapterKind.LORA):
        for r in RANKS:
            for i in range(requests):
                engine.add_adapter(random_adapter(f"{kind.value}-r{r}-{i}", kind, r, layers, TARGET, seed=1000 * r + i))
    return engine, cost_model


def use(engine: LLMEngine, config: Config, cost_model: CostModel) -> None:
    engine.runner.chooser = cost_model if config.chooser == "cost model" else FixedPaths(lora=KernelPath(config.chooser))


def adapter_ids(config: Config, rank: int, n: int) -> list[str | None]:
    return [None if config.kind is None else f"{config.kind.value}-r{rank}-{i % n}" for i in range(n)]


def prompts(n: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(1, 49152, (length,), generator=gen).tolist() for _ in range(n)]


def throughput(engine: LLMEngine, ids: list[str | None], prompt_len: int, new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    seqs = engine.generate(prompts(len(ids), prompt_len), ids, params)
    return sum(len(s.output_ids) for s in seqs) / (time.perf_counter() - start)


def poisson_latency(engine: LLMEngine, ids: list[str | None], rate: float, prompt_len: int, new_tokens: int) -> float:
    """Mean over requests of (finish - arrival) / output tokens, requests arriving as a Poisson process."""
    gen = torch.Generator().manual_seed(1)
    gaps = torch.empty(len(ids)).exponential_(rate, generator=gen).tolist()
    arrivals = [sum(gaps[: i + 1]) for i in range(len(ids))]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    todo, seqs, start = list(zip(arrivals, prompts(len(ids), prompt_len), ids)), [], time.perf_counter()
    while todo or engine.has_unfinished():
        now = time.perf_counter() - start
        while todo and todo[0][0] <= now:
            arrival, prompt, adapter_id = todo.pop(0)
            seqs.append((arrival, engine.sequences[engine.add_request(prompt, adapter_id, params)]))
        if engine.has_unfinished():
            engine.step()
        else:
            time.sleep(min(0.01, max(0.0, todo[0][0] - now)))
    return sum((s.timings.finished - start - a) / len(s.output_ids) for a, s in seqs) / len(seqs)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in report["configs"]:
        rows = [(r["rank"], r["throughput"][name], r["latency"][name]) for r in report["ranks"]]
        style = dict(color="black", linestyle="--") if name == "no adapter" else dict(marker="o")
        left.plot([x for x, _, _ in rows], [t for _, t, _ in rows], label=name, **style)
        right.plot([x for x, _, _ in rows], [l for _, _, l in rows], label=name, **style)
    left.set(xscale="log", xlabel="rank", ylabel="generated tokens/s", title=f"throughput, {report['requests']} concurrent requests")
    right.set(xscale="log", xlabel="rank", ylabel="seconds per output token", title=f"latency, Poisson arrivals at {report['rate']:.2f} req/s")
    for ax in (left, right):
        ax.set_xticks(list(RANKS), labels=[str(r) for r in RANKS])
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"{report['model']} shape, random weights, {report['weights']} weights, {report['threads']} threads — every request its own adapter on c_attn")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict) -> str:
    names = report["configs"]
    lines = [f"# Figure 2 on this machine — {report['machine']}", "", f"Command: `{report['command']}`", ""]
    lines += [f"{report['model']}-shaped model (random weights, {report['weights']} weights, fp32 activations, {report['threads']} torch threads), adapters on `attn.c_attn`, every request its own adapter.",
              f"Throughput: {report['requests']} concurrent requests, {report['prompt_len']}-token prompts, {report['new_tokens']} new tokens each, "
              f"median of {report['repeats']} runs per cell (the configurations taking turns in rotating order). "
              f"Latency: {report['latency_requests']} requests arriving as a Poisson process at {report['rate']:.2f} req/s.", "", f"Paper: {PAPER}.", ""]
    for title, key, fmt in (("Throughput (generated tokens/s)", "throughput", "{:.1f}"), ("Latency (seconds per output token)", "latency", "{:.3f}")):
        lines += [f"## {title}", "", "| rank | " + " | ".join(names) + " | FLoRA / bmm LoRA |", "|---" * (len(names) + 2) + "|"]
        for r in report["ranks"]:
            v = r[key]
            speedup = v["FLoRA"] / v[names[2]] if key == "throughput" else v[names[2]] / v["FLoRA"]
            lines.append(f"| {r['rank']} | " + " | ".join(fmt.format(v[n]) for n in names) + f" | {speedup:.2f}× |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flora-gateway bench figure2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--model", default="starcoderbase-1b", help="a StarCoder shape from models.loader.starcoder_config")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--latency-requests", type=int, default=16)
    parser.add_argument("--rate", type=float, help="Poisson arrival rate, requests/s (default: 0.8x the measured no-adapter rate)")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs per cell, configurations in rotating order; the median is reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantization", choices=[q.value for q in Quantization], default="none", help="base weights: fp32 (none) or int8")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    quantization = Quantization(args.quantization)
    engine, cost_model = build(args.requests, args.threads, args.model, quantization)
    throughput(engine, adapter_ids(CONFIGS[0], 1, 2), args.prompt_len, 2)  # warm-up
    rows = []
    for rank in RANKS:
        runs: dict[str, list[float]] = {c.name: [] for c in CONFIGS}
        for repeat in range(args.repeats):
            for config in CONFIGS[repeat % len(CONFIGS) :] + CONFIGS[: repeat % len(CONFIGS)]:
                use(engine, config, cost_model)
                runs[config.name].append(throughput(engine, adapter_ids(config, rank, args.requests), args.prompt_len, args.new_tokens))
        tput = {name: statistics.median(v) for name, v in runs.items()}
        rows.append(dict(rank=rank, throughput=tput))
        print(f"  rank {rank}: " + ", ".join(f"{k} {v:.1f}" for k, v in tput.items()) + " tok/s", file=sys.stderr, flush=True)
    rate = args.rate or 0.8 * rows[0]["throughput"]["no adapter"] / args.new_tokens
    for row in rows:
        row["latency"] = {}
        for config in CONFIGS:
            use(engine, config, cost_model)
            row["latency"][config.name] = poisson_latency(engine, adapter_ids(config, row["rank"], args.latency_requests), rate, args.prompt_len, args.new_tokens)
        print(f"  rank {row['rank']} latency: " + ", ".join(f"{k} {v:.3f}" for k, v in row["latency"].items()) + " s/token", file=sys.stderr, flush=True)
    report = dict(
        command="flora-gateway bench figure2 " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=machine(), model=args.model, weights="fp32" if quantization is Quantization.NONE else quantization.value,
        threads=args.threads, repeats=args.repeats, requests=args.requests, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
        latency_requests=args.latency_requests, rate=rate, configs=[c.name for c in CONFIGS], ranks=rows,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "figure2" if quantization is Quantization.NONE else f"figure2-{quantization.value}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(report))
    plot(report, args.out / f"{stem}.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
