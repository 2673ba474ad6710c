"""`flora-gateway`: the command-line entry point."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

T = TypeVar("T")

BENCHMARKS = {
    "kernels": "one adapted layer, every kernel path, StarCoder shapes",
    "throughput": "the engine on SmolLM2-135M, 32 concurrent requests, with and without adapters",
    "figure2": "the paper's figure 2: throughput and latency vs rank on a StarCoder-1B-shaped model",
    "gateway": "the whole gateway (router, Ray Serve, worker) against the engine alone, same workload, same run",
    "soak": "the `make run` stack under Locust at a fixed rate for minutes (8 req/s, 10 min): latency, tokens/s, memory",
}


class OneLineErrors(argparse.ArgumentParser):
    """A subcommand's parser whose usage errors are one line, `PROG: error: ...`, like generate's other errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def checked(convert: Callable[[str], T], ok: Callable[[T], bool], expected: str) -> Callable[[str], T]:
    """An argparse type: `convert` the text and keep it only if `ok`; else argparse names the
    argument and says what was `expected` (before anything slow is imported or loaded)."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
            if ok(value):
                return value
        except ValueError:
            pass  # not a number at all: the same message
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")

    return parse


# The same ranges SamplingParams and EngineConfig enforce, checked here so the flag is named.
POSITIVE_INT = checked(int, lambda v: v >= 1, "an integer >= 1")
NON_NEGATIVE_INT = checked(int, lambda v: v >= 0, "an integer >= 0")
NON_NEGATIVE_FLOAT = checked(float, lambda v: v >= 0, "a number >= 0")  # NaN fails too
PROBABILITY = checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
SEED = checked(int, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64)")  # what torch.Generator.manual_seed takes
NON_EMPTY = checked(str, bool, "a non-empty string")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="a Hugging Face checkpoint directory, or 'smollm2' (default)")
    p.add_argument("--adapter", type=Path, help="an adapter .safetensors file (see adapterctl); default: the base model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64)
    p.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=PROBABILITY, default=1.0)
    p.add_argument("--top-k", type=NON_NEGATIVE_INT, default=0, help="0 = off (default)")
    p.add_argument("--seed", type=SEED)
    p.add_argument("--stop", type=NON_EMPTY, action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--threads", type=POSITIVE_INT, default=2)
    p.add_argument("--quantization", choices=("none", "int8"), default="none", help="int8: int8 weights and activations, faster on a CPU with AVX512-VNNI, not bit-exact (measurements: docs/engine.md)")
    p.add_argument("--lora-dtype", choices=("auto", "bfloat16", "int8"), default="auto", help="LoRA slot storage: auto = the model's float32 (exact); bfloat16 halves, int8 quarters the adapter bytes a step reads")


def add_client_generate_arguments(p: argparse.ArgumentParser) -> None:
    """Sampling flags left out are not sent: the gateway's defaults apply (proto/gateway.proto)."""
    p.add_argument("--tenant", type=NON_EMPTY, required=True)
    p.add_argument("--prompt", type=NON_EMPTY, required=True)
    p.add_argument("--stream", action="store_true", help="print the text as it is generated (GenerateStream)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, help="default: the gateway's (128)")
    p.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, help="0 = greedy (the gateway's default)")
    p.add_argument("--top-p", type=PROBABILITY)
    p.add_argument("--top-k", type=NON_NEGATIVE_INT, help="0 = off")
    p.add_argument("--seed", type=SEED)
    p.add_argument("--stop", type=NON_EMPTY, action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--address", metavar="HOST:PORT", help="the gateway's router (default: 127.0.0.1:50051, where `serve` puts it)")
    p.add_argument("--api-key", help="the tenant's key (default: $FLORA_API_KEY; a flag is visible to other local users)")
    p.add_argument("--timeout", type=checked(float, lambda v: v > 0, "a number of seconds > 0"), metavar="S",
                   help="the call's deadline (default: the router's)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flora-gateway", description="Multi-tenant FLoRA / LoRA / IA3 adapter gateway.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrors)
    serve = commands.add_parser("serve", help="the whole gateway on this machine (what `make run` runs); Ctrl-C stops it")
    from services.launcher import add_arguments as add_serve_arguments  # pydantic settings only: no Ray or torch

    add_serve_arguments(serve)
    client = commands.add_parser("client", help="call a running gateway (`client generate --help`)")
    client_commands = client.add_subparsers(dest="client_command", metavar="COMMAND", required=True, parser_class=OneLineErrors)
    add_client_generate_arguments(client_commands.add_parser("generate", help="one completion for a tenant, from its API key"))
    commands.add_parser("demo", help="offline engine demo: the demo tenants in one continuous batch, no servers")
    generate = commands.add_parser("generate", help="run one prompt through the engine, streaming the text")
    add_generate_arguments(generate)
    bench = commands.add_parser("bench", help="run a benchmark (extra arguments go to it; e.g. `bench kernels --help`)")
    bench.add_argument("benchmark", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # blamed on the command that got them, in its one-line form
        commands.choices.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "bench":
        return importlib.import_module(f"benchmarks.{args.benchmark}").main(args.args)
    if args.command == "generate":
        from services.generate import run

        return run(args)
    if args.command == "serve":
        from services.launcher import run as serve_gateway

        return serve_gateway(args)
    if args.command == "client":
        from services.client import run as run_client

        return run_client(args)
    if args.command == "demo":
        from services import demo

        return demo.main()
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
