"""Wall-clock timing for CPU kernels on a shared, noisy machine.

Speeds are compared as ratios measured in the same run: `paired` alternates the
reference and the candidate call, so drift in machine load hits both alike, and
reports the median of the per-pair ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Paired:
    reference_s: float  # median seconds of the reference call
    candidate_s: float  # median seconds of the candidate call
    ratio: float  # median of candidate / reference over adjacent pairs


def seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(reference: Callable[[], object], candidate: Callable[[], object], min_total_s: float = 0.5, min_pairs: int = 3, max_pairs: int = 15) -> Paired:
    """Warm both up, then time them alternately; a candidate slower than a second gets one pair only."""
    reference(), candidate()
    if seconds(candidate) > 1.0:
        min_pairs = max_pairs = 1
    refs: list[float] = []
    cands: list[float] = []
    while len(refs) < max_pairs and (len(refs) < min_pairs or sum(refs) + sum(cands) < min_total_s):
        refs.append(seconds(reference))
        cands.append(seconds(candidate))
    return Paired(statistics.median(refs), statistics.median(cands), statistics.median(c / r for c, r in zip(cands, refs)))


def machine() -> str:
    """CPU model, core count, whether it has native bf16, and torch: the context every result needs."""
    import os
    import platform

    import torch

    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.machine())
    bf16 = "with" if "avx512_bf16" in info or "amx_bf16" in info else "without"
    return f"{model}, {os.cpu_count()} cores, {bf16} AVX512-BF16, torch {torch.__version__}"
