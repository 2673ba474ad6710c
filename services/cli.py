"""`flora-gateway`: the command-line entry point."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHMARKS = {
    "kernels": "one adapted layer, every kernel path, StarCoder shapes",
    "throughput": "the engine on SmolLM2-135M, 32 concurrent requests, with and without adapters",
    "figure2": "the paper's figure 2: throughput and latency vs rank on a StarCoder-1B-shaped model",
}


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="a Hugging Face checkpoint directory, or 'smollm2' (default)")
    p.add_argument("--adapter", type=Path, help="an adapter .safetensors file (see adapterctl); default: the base model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantization", choices=("none", "int8"), default="none", help="int8: int8 weights and activations, faster on a CPU with AVX512-VNNI, not bit-exact (measurements: docs/engine.md)")
    p.add_argument("--lora-dtype", choices=("auto", "bfloat16", "int8"), default="auto", help="LoRA slot storage: auto = the model's float32 (exact); bfloat16 halves, int8 quarters the adapter bytes a step reads")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flora-gateway", description="Multi-tenant FLoRA / LoRA / IA3 adapter gateway.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("demo", help="offline engine demo: a mixed-tenant batch through one adapted layer")
    generate = commands.add_parser("generate", help="run one prompt through the engine, streaming the text")
    add_generate_arguments(generate)
    bench = commands.add_parser("bench", help="run a benchmark (extra arguments go to it; e.g. `bench kernels --help`)")
    bench.add_argument("benchmark", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return importlib.import_module(f"benchmarks.{args.benchmark}").main(args.args)
    if args.command == "generate":
        from services.generate import run

        return run(args)
    if args.command == "demo":
        from services import demo

        return demo.main()
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
