"""Wall-clock timing for CPU kernels: warm-up, then the median of repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], min_total_s: float = 0.3, min_repeats: int = 3, max_repeats: int = 15) -> float:
    """Median wall time of fn(). One warm-up call; a call slower than a second is repeated once only."""
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    if warm > 1.0:
        min_repeats, max_repeats = 1, 1
    times: list[float] = []
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < min_total_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
