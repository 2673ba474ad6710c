"""Which kernel path is fastest for a pool group: measured, not guessed.

Each path's time is modelled as `overhead · launches + coefficient · work`, with
work in multiply-accumulates (MACs) and launches the number of separate
GEMM/bmm calls the path makes (see `path_load`). Both coefficients are fitted
per path by timing the real kernels on this machine (`calibrate`), once at
start-up or loaded from a saved profile.

The paper's eq. 7 falls out of two of them: c1 = lora_bmm's seconds per MAC
(work 2·n·r·d for a square layer) and c2 = the base GEMM's (work n·d²). FLoRA
(work r·n·d²) is cheaper than bmm LoRA when 2·c1/(d·c2) + 1/r ≥ 1.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from services.engine.adapter_batch import PATHS_BY_KIND, AdapterBatch, GroupShape, KernelPath
from services.engine.adapter_format import AdapterKind
from services.engine.adapter_slots import LayerSlots, SlotLayout, SlotPool
from services.engine.base_weights import BaseWeight, Quantization, base_weight
from services.engine.kernels import FLORA_STACKED_ROWS, KERNELS


@dataclass(frozen=True)
class PathCost:
    overhead_s: float  # seconds per launch
    per_mac_s: float  # seconds per multiply-accumulate

    def predict(self, launches: float, macs: float) -> float:
        return self.overhead_s * launches + self.per_mac_s * macs


def path_load(path: KernelPath | None, s: GroupShape) -> tuple[float, float]:
    """(launches, MACs) of running `path` on group shape s; None is the plain base GEMM."""
    n, u, r, d_in, d_out = s.rows, s.adapters, s.rank, s.d_in, s.d_out
    match path:
        case None:
            return 1, n * d_in * d_out
        case KernelPath.FLORA:
            return math.ceil(r / max(1, FLORA_STACKED_ROWS // n)), n * r * d_in * d_out
        case KernelPath.FLORA_SEGMENT:
            return u, d_in * d_out * (u * (r + 1) + n)  # merge (B A)ᵀ ∘ W0 per adapter, then its rows' GEMM
        case KernelPath.LORA_BMM | KernelPath.LORA_BGMV:
            return 1, n * r * (d_in + d_out)
        case KernelPath.LORA_SEGMENT:
            return u, n * r * (d_in + d_out)
        case KernelPath.LORA_STACKED:
            return 1, n * u * r * (d_in + d_out)
        case KernelPath.IA3:
            return 1, n * (d_in + d_out)
    raise ValueError(f"unknown path {path}")


@dataclass(frozen=True)
class CostModel:
    """Fitted per-path costs; `choose` implements adapter_batch.PathChooser."""

    base: PathCost  # the plain GEMM x @ W0ᵀ
    paths: dict[KernelPath, PathCost]
    dtype: str  # what it was calibrated in
    quantization: str  # of the base weight it was calibrated with
    threads: int
    lora_dtype: str = "auto"  # LoRA slot storage it was calibrated with ("auto": `dtype`)

    def cost(self, path: KernelPath) -> PathCost:
        return self.paths[path]

    def predict(self, path: KernelPath | None, shape: GroupShape) -> float:
        coeffs = self.base if path is None else self.cost(path)
        return coeffs.predict(*path_load(path, shape))

    def choose(self, shape: GroupShape) -> KernelPath:
        return min(PATHS_BY_KIND[shape.kind], key=lambda p: self.predict(p, shape))

    @property
    def c1(self) -> float:
        """The paper's bmm coefficient: lora_bmm seconds per MAC."""
        return self.cost(KernelPath.LORA_BMM).per_mac_s

    @property
    def c2(self) -> float:
        """The paper's GEMM coefficient: base GEMM seconds per MAC."""
        return self.base.per_mac_s

    def flora_beats_bmm(self, rank: int, d: int) -> bool:
        """The paper's eq. 7: 2·c1/(d·c2) + 1/r ≥ 1."""
        return 2 * self.c1 / (d * self.c2) + 1 / rank >= 1

    def eq7_crossover_rank(self, d: int) -> float:
        """The rank above which bmm LoRA is cheaper than FLoRA by eq. 7 (inf: never)."""
        q = 2 * self.c1 / (d * self.c2)
        return math.inf if q >= 1 else 1 / (1 - q)

    def save(self, path: Path) -> None:
        doc = {
            "dtype": self.dtype,
            "quantization": self.quantization,
            "threads": self.threads,
            "lora_dtype": self.lora_dtype,
            "base": asdict(self.base),
            "paths": {p.value: asdict(c) for p, c in self.paths.items()},
        }
        path.write_text(json.dumps(doc, indent=2))

    @staticmethod
    def load(path: Path) -> "CostModel":
        doc = json.loads(path.read_text())
        try:
            paths = {KernelPath(name): PathCost(**c) for name, c in doc["paths"].items()}
            model = CostModel(PathCost(**doc["base"]), paths, doc["dtype"], doc["quantization"], int(doc["threads"]), doc["lora_dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a cost-model profile: {e}") from e
        missing = set(KernelPath) - set(paths)
        if missing:
            raise ValueError(f"{path} lacks costs for paths {sorted(p.value for p in missing)}")
        return model


@dataclass(frozen=True)
class FixedPaths:
    """A chooser that always takes the given path for each kind (benchmarks, tests)."""

    flora: KernelPath = KernelPath.FLORA
    lora: KernelPath = KernelPath.LORA_BMM

    def choose(self, shape: GroupShape) -> KernelPath:
        return {AdapterKind.FLORA: self.flora, AdapterKind.LORA: self.lora, AdapterKind.IA3: KernelPath.IA3}[shape.kind]


# Calibration probes: (rows n, distinct adapters U, rank R). They vary launches and
# MACs independently so both coefficients are identifiable.
_PROBES = ((1, 1, 1), (8, 8, 4), (64, 4, 16), (64, 64, 8), (512, 2, 4))


def calibrate(
    dtype: torch.dtype = torch.float32,
    quantization: Quantization = Quantization.NONE,
    d_in: int = 512,
    d_out: int = 512,
    repeats: int = 7,
    lora_dtype: torch.dtype | None = None,
) -> CostModel:
    """Time every path on a few probe shapes here and fit its two coefficients.

    Calibrate at the served layers' own width: per-MAC costs depend on whether a weight
    fits in cache (merging W0 ∘ (BA)ᵀ at d = 512 is cache-resident, at d = 2048 it streams
    memory). ~1 s at d = 512, a few seconds at StarCoder-1B's 2048. The base weight and the LoRA
    slots are stored as the served model's (`quantization`, `lora_dtype`; None: `dtype`): int8 makes
    FLoRA's GEMMs cheaper, bf16 or int8 LoRA slots the paths that read adapters in place."""
    weight = base_weight(torch.randn(d_out, d_in, dtype=dtype) / math.sqrt(d_in), quantization)
    samples: dict[KernelPath | None, list[tuple[float, float, float]]] = {}
    for n, u, r in _PROBES:
        for path in (None, *KernelPath):
            shape = GroupShape(_kind_of(path), n, u, r, d_in, d_out)
            seconds = _time_path(path, shape, weight, repeats, lora_dtype)
            samples.setdefault(path, []).append((*path_load(path, shape), seconds))
    fitted = {path: _fit(points) for path, points in samples.items()}
    paths = {p: fitted[p] for p in KernelPath}
    stored = "auto" if lora_dtype is None else str(lora_dtype).removeprefix("torch.")
    return CostModel(fitted[None], paths, str(dtype).removeprefix("torch."), quantization.value, torch.get_num_threads(), stored)


def _kind_of(path: KernelPath | None) -> AdapterKind:
    return next((k for k, ps in PATHS_BY_KIND.items() if path in ps), AdapterKind.LORA)


def _time_path(path: KernelPath | None, s: GroupShape, weight: BaseWeight, repeats: int, lora_dtype: torch.dtype | None) -> float:
    """Seconds of one kernel call on random adapters (None: the base GEMM)."""
    x = torch.randn(s.rows, s.d_in, dtype=weight.dtype)
    y = torch.empty(s.rows, s.d_out, dtype=weight.dtype)
    if path is None:
        return _min_seconds(lambda: weight.mm_into(y, x), repeats)
    # Every other slot of a pool twice the size: rows' slots are never consecutive, so the probes
    # measure the gathering kernels as they run in general (consecutive slots only get faster).
    layout = SlotLayout((SlotPool(s.kind, 1 if s.kind is AdapterKind.IA3 else s.rank, 2 * s.adapters),), lora_dtype)
    slots = LayerSlots(layout, s.d_in, s.d_out, weight.dtype)
    for p in slots.pools:
        for t in vars(p).values():
            _randomize(t)
    ids = 2 * (torch.arange(s.rows) * s.adapters // s.rows)  # U equal segments
    group = AdapterBatch.build(ids, layout, FixedPaths(path, path), s.d_in, s.d_out).groups[0]
    kernel, pool = KERNELS[path], slots.pools[0]
    return _min_seconds(lambda: kernel(x, y, weight, None, pool, group), repeats)


def _randomize(stored: torch.Tensor | None) -> None:
    """Fill a pool tensor with random values in place (None: the scales a float pool has not)."""
    if stored is None:
        return
    if stored.dtype is torch.int8:
        stored.random_(-127, 128)
    else:
        stored.normal_()


def _min_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` calls: other processes on a shared machine only ever add time."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _fit(points: list[tuple[float, float, float]]) -> PathCost:
    """(launches, macs, seconds) probes -> the two coefficients, each from the probe that pins it best:
    the overhead from the one with the least work per launch, the per-MAC cost from the one with the
    most, after taking its launches' overhead off. Two well-separated points resist noise better
    than a least-squares fit, where one slow outlier can zero a coefficient."""
    small = min(points, key=lambda p: p[1] / p[0])
    large = max(points, key=lambda p: p[1] / p[0])
    overhead = small[2] / small[0]
    per_mac = max(large[2] - overhead * large[0], 0.0) / large[1]
    return PathCost(overhead, per_mac)
