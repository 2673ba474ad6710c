"""One adapted linear layer, every kernel path, StarCoder shapes: the paper's eq. 7 measured.

    python -m benchmarks.kernels            (or: flora-gateway bench kernels)

For each StarCoder size's fused `c_attn` (multi-query: d -> d + 2·128), ranks 1-32,
a decode-like batch (32 rows) and a prefill-like batch (2048 rows), every row its
own adapter, it times the base layer (the floor) and each path, then reports
c1/c2 and the crossover rank where the best LoRA path overtakes FLoRA, beside the
paper's claim. Two extra tables: rank isolation (a rank-16 row in a batch of
rank-1 rows) and prefill with one adapter per sequence, where the cost model's
choice matters most. Writes <out>/kernels.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.timing import Paired, machine, paired
from services.engine.adapter_batch import PATHS_BY_KIND, AdapterBatch, KernelPath
from services.engine.adapter_format import AdapterKind
from services.engine.adapter_slots import LayerSlots, SlotLayout, SlotPool
from services.engine.base_weights import DenseWeight, Quantization
from services.engine.cost_model import CostModel, FixedPaths, calibrate
from services.engine.layers import multi_adapter_linear

PAPER_CLAIM = "crossover near rank 8 on StarCoder-15B (H100, fp16, vLLM 0.1.3, FLoRA vs torch.bmm LoRA)"
LORA_PATHS = PATHS_BY_KIND[AdapterKind.LORA]
# Paths whose cost grows with the number of distinct adapters (a weight merge per adapter, or
# U·R stacked columns): with every row its own adapter, 2048 rows would take minutes a call.
PER_ADAPTER_PATHS = (KernelPath.FLORA_SEGMENT, KernelPath.LORA_STACKED)


@dataclass(frozen=True)
class LayerShape:
    name: str
    d_in: int  # n_embd
    d_out: int  # fused c_attn: q (d) + one shared k and v head (2 · 128), multi-query attention


STARCODER = (LayerShape("starcoder-1b", 2048, 2304), LayerShape("starcoder-3b", 2816, 3072), LayerShape("starcoder-15b", 6144, 6400))
QUICK = (LayerShape("tiny", 64, 96),)


@dataclass(frozen=True)
class Cell:
    shape: str
    rows: int
    rank: int
    path: str  # a KernelPath value
    seconds: float  # median time of one layer call on this path
    base_seconds: float  # median time of the plain layer (no adapter), timed alternately with it
    ratio: float  # median of path / base over adjacent pairs: the number to read


class Layer:
    """A c_attn-shaped layer with `slots` FLoRA and LoRA adapters of one rank, random weights."""

    def __init__(self, shape: LayerShape, rank: int, slots: int, dtype: torch.dtype):
        self.shape = shape
        self.weight = DenseWeight(torch.randn(shape.d_out, shape.d_in, dtype=dtype) / math.sqrt(shape.d_in))
        self.bias = torch.randn(shape.d_out, dtype=dtype)
        self.layout = SlotLayout((SlotPool(AdapterKind.FLORA, rank, slots), SlotPool(AdapterKind.LORA, rank, slots)))
        self.slots = LayerSlots(self.layout, shape.d_in, shape.d_out, dtype)
        for pool in self.slots.pools:
            for tensor in (pool.a, pool.b):
                tensor.normal_()

    def call(self, slot_ids: torch.Tensor, chooser: FixedPaths | CostModel):
        """A closure running the layer on len(slot_ids) random rows, row t with slot slot_ids[t]."""
        x = torch.randn(len(slot_ids), self.shape.d_in, dtype=self.weight.dtype)
        batch = AdapterBatch.build(slot_ids, self.layout, chooser, self.shape.d_in, self.shape.d_out)
        return lambda: multi_adapter_linear(x, self.weight, self.bias, self.slots, batch)

    def versus_base(self, slot_ids: torch.Tensor, chooser: FixedPaths | CostModel) -> Paired:
        return paired(self.call(torch.full((len(slot_ids),), -1), FixedPaths()), self.call(slot_ids, chooser))


def distinct_adapter_cells(shape: LayerShape, rows: int, rank: int, dtype: torch.dtype) -> list[Cell]:
    """Every row its own adapter: FLoRA slots 0..rows-1, LoRA slots rows..2·rows-1."""
    layer = Layer(shape, rank, rows, dtype)
    flora_ids, lora_ids = torch.arange(rows), torch.arange(rows) + rows
    runs = {p: (flora_ids, FixedPaths(flora=p)) for p in PATHS_BY_KIND[AdapterKind.FLORA]}
    runs |= {p: (lora_ids, FixedPaths(lora=p)) for p in LORA_PATHS}
    if rows > 64:
        runs = {p: run for p, run in runs.items() if p not in PER_ADAPTER_PATHS}
    cells = []
    for path, (ids, chooser) in runs.items():
        p = layer.versus_base(ids, chooser)
        cells.append(Cell(shape.name, rows, rank, path.value, p.candidate_s, p.reference_s, p.ratio))
    return cells


def rank_isolation(shape: LayerShape, rows: int, dtype: torch.dtype) -> dict[str, float]:
    """Time relative to all-rank-1 rows of: one rank-16 row among them (rank pools); the same padded to rank 16."""
    pooled = SlotLayout((SlotPool(AdapterKind.FLORA, 1, rows), SlotPool(AdapterKind.FLORA, 16, 1)))
    padded = SlotLayout((SlotPool(AdapterKind.FLORA, 16, rows),))
    layers = {}
    for name, layout in (("pooled", pooled), ("padded", padded)):
        layers[name] = Layer(shape, 1, 1, dtype)
        layers[name].layout, layers[name].slots = layout, LayerSlots(layout, shape.d_in, shape.d_out, dtype)
        for pool in layers[name].slots.pools:
            pool.a.normal_(), pool.b.normal_()
    all_rank_1 = layers["pooled"].call(torch.arange(rows), FixedPaths())
    one_rank_16 = torch.cat([torch.arange(rows - 1), torch.tensor([rows])])
    return {
        "one rank-16 row among rank-1 rows, rank pools": paired(all_rank_1, layers["pooled"].call(one_rank_16, FixedPaths())).ratio,
        "the same rows, one pool padded to rank 16": paired(all_rank_1, layers["padded"].call(torch.arange(rows), FixedPaths())).ratio,
    }


def per_sequence_prefill(shape: LayerShape, seqs: int, seq_len: int, rank: int, dtype: torch.dtype, model: CostModel) -> dict[str, float]:
    """`seqs` prompts of `seq_len` tokens, one adapter each: every path vs base, and the cost model's pick."""
    layer = Layer(shape, rank, seqs, dtype)
    flora_ids = torch.arange(seqs).repeat_interleave(seq_len)
    runs = {p.value: (flora_ids, FixedPaths(flora=p)) for p in PATHS_BY_KIND[AdapterKind.FLORA]}
    runs |= {p.value: (flora_ids + seqs, FixedPaths(lora=p)) for p in LORA_PATHS}
    runs |= {"cost model's pick, FLoRA rows": (flora_ids, model), "cost model's pick, LoRA rows": (flora_ids + seqs, model)}
    return {name: layer.versus_base(ids, chooser).ratio for name, (ids, chooser) in runs.items()}


def measured_coefficients(cells: list[Cell], shape: LayerShape, rows: int, rank: int) -> tuple[float, float]:
    """c2 = base s/MAC; c1 = lora_bmm's added s/MAC (work 2·n·r·d), from one (rows, rank) cell's ratio."""
    cell = next(c for c in cells if c.shape == shape.name and c.rows == rows and c.rank == rank and c.path == KernelPath.LORA_BMM.value)
    c2 = cell.base_seconds / (rows * shape.d_in * shape.d_out)
    c1 = (cell.ratio - 1) * cell.base_seconds / (rows * rank * (shape.d_in + shape.d_out))
    return c1, c2


def crossover_rank(cells: list[Cell], shape: str, rows: int) -> int | None:
    """The smallest rank where the best LoRA path is faster than FLoRA (None: FLoRA wins at every rank)."""
    for rank in sorted({c.rank for c in cells}):
        t = {c.path: c.ratio for c in cells if c.shape == shape and c.rows == rows and c.rank == rank}
        if min(t[p.value] for p in LORA_PATHS if p.value in t) < t[KernelPath.FLORA.value]:
            return rank
    return None


def markdown(report: dict) -> str:
    lines = [f"# Kernel benchmark — {report['machine']}", "", f"Command: `{report['command']}`", ""]
    lines += [f"dtype {report['dtype']}, {report['threads']} torch thread(s). Each cell: time relative to the plain layer (no adapter)", "timed alternately with it (median of pair ratios); the plain layer's median ms in the `base ms` column.", ""]
    cells = [Cell(**c) for c in report["cells"]]
    paths = list(dict.fromkeys(c.path for c in cells))
    for shape in dict.fromkeys(c.shape for c in cells):
        for rows in sorted({c.rows for c in cells if c.shape == shape}):
            lines += [f"## {shape}, {rows} rows, every row its own adapter", "", "| rank | base ms | " + " | ".join(paths) + " |", "|---" * (len(paths) + 2) + "|"]
            for rank in sorted({c.rank for c in cells}):
                here = {c.path: c for c in cells if c.shape == shape and c.rows == rows and c.rank == rank}
                base_ms = statistics.median(c.base_seconds for c in here.values()) * 1e3
                row = [f"{here[p].ratio:.2f}×" if p in here else "—" for p in paths]
                lines.append(f"| {rank} | {base_ms:.2f} | " + " | ".join(row) + " |")
            lines.append("")
    lines += ["## Crossover: FLoRA vs the best LoRA path", "", f"Paper: {PAPER_CLAIM}.", ""]
    lines += ["| shape | rows | measured c1/c2 | eq. 7 crossover rank | measured crossover rank |", "|---|---|---|---|---|"]
    for x in report["crossover"]:
        lines.append(f"| {x['shape']} | {x['rows']} | {x['c1_over_c2']:.1f} | {x['eq7_rank']:.2f} | {x['measured_rank'] or 'none (FLoRA wins at every rank)'} |")
    lines += ["", f"Cost model (calibrated at start-up): c1 = {report['cost_model']['c1']:.3e} s/MAC, c2 = {report['cost_model']['c2']:.3e} s/MAC, c1/c2 = {report['cost_model']['c1'] / report['cost_model']['c2']:.1f}.", ""]
    for title, key, versus in [("Rank isolation (decode rows, FLoRA)", "rank_isolation", "all rank-1 rows"), ("Prefill, one adapter per sequence", "per_sequence_prefill", "plain layer")]:
        lines += [f"## {title}: {report[key]['setup']}", "", f"| case | × {versus} |", "|---|---|"]
        lines += [f"| {name} | {r:.2f} |" for name, r in report[key]["ratios"].items()]
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [Cell(**c) for c in report["cells"]]
    shapes = list(dict.fromkeys(c.shape for c in cells))
    row_counts = sorted({c.rows for c in cells})
    colors = {p: f"C{i}" for i, p in enumerate(dict.fromkeys(c.path for c in cells))}  # one color per path in every panel
    fig, axes = plt.subplots(len(shapes), len(row_counts), figsize=(5.5 * len(row_counts), 3.8 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, rows in enumerate(row_counts):
            ax = axes[i][j]
            ax.axhline(1.0, color="black", linestyle="--", label="base layer (no adapter)")
            for p, color in colors.items():
                pts = sorted((c.rank, c.ratio) for c in cells if c.shape == shape and c.rows == rows and c.path == p)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=p, color=color)
            ax.set(xscale="log", yscale="log", xlabel="rank", ylabel="time / base layer", title=f"{shape}, {rows} rows")
            ax.set_xticks([1, 2, 4, 8, 16, 32], labels=["1", "2", "4", "8", "16", "32"])
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"One adapted c_attn layer, every row its own adapter — {report['dtype']}, {report['threads']} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(shapes: tuple[LayerShape, ...], row_counts: tuple[int, ...], ranks: tuple[int, ...], dtype: torch.dtype) -> dict:
    model = calibrate(dtype, Quantization.NONE, shapes[0].d_in, shapes[0].d_out)  # the cost model's choices below are for shapes[0]
    cells: list[Cell] = []
    for shape in shapes:
        for rows in row_counts:
            for rank in ranks:
                cells += distinct_adapter_cells(shape, rows, rank, dtype)
                print(f"  {shape.name} rows={rows} rank={rank} done", file=sys.stderr, flush=True)
    crossover = []
    for shape in shapes:
        for rows in row_counts:
            c1, c2 = measured_coefficients(cells, shape, rows, max(ranks))
            q = 2 * c1 / (shape.d_in * c2)
            crossover.append(
                dict(shape=shape.name, rows=rows, c1_over_c2=c1 / c2, eq7_rank=math.inf if q >= 1 else 1 / (1 - q),
                     measured_rank=crossover_rank(cells, shape.name, rows))
            )
    small = shapes[0]
    return dict(
        cells=[asdict(c) for c in cells],
        crossover=crossover,
        cost_model=dict(c1=model.c1, c2=model.c2, choices_valid_for="per batch"),
        rank_isolation=dict(setup=f"{small.name}, {row_counts[0]} rows", ratios=rank_isolation(small, row_counts[0], dtype)),
        per_sequence_prefill=dict(
            setup=f"{small.name}, 8 sequences × {max(row_counts) // 8} tokens, rank 8",
            ratios=per_sequence_prefill(small, 8, max(row_counts) // 8, 8, dtype, model),
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flora-gateway bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for kernels.{json,md,png}")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="float32 by default: on CPUs without AVX512-BF16 bf16 GEMMs are ~4× slower")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the services run)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 2048], help="decode-like and prefill-like batch sizes")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    report = run(QUICK if args.quick else STARCODER, tuple(args.rows), tuple(args.ranks), dtype)
    report.update(
        command="flora-gateway bench kernels " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=machine(),
        dtype=args.dtype,
        threads=args.threads,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(report, indent=1, default=str))
    table = markdown(report)
    (args.out / "kernels.md").write_text(table)
    plot(report, args.out / "kernels.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
