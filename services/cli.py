"""`flora-gateway`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flora-gateway", description="Multi-tenant FLoRA / LoRA / IA3 adapter gateway.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("demo", help="offline engine demo: a mixed-tenant batch through one adapted layer")
    bench = commands.add_parser("bench", help="run a benchmark (extra arguments go to it; see `bench kernels --help`)")
    bench.add_argument("benchmark", choices=["kernels"], help="kernels: one adapted layer, every path, StarCoder shapes")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from benchmarks import kernels

        return kernels.main(args.args)
    if args.command == "demo":
        from services import demo

        return demo.main()
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
