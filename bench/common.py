"""Timing helpers shared by the benchmarks: best-of-N wall time of a callable after warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 2) -> float:
    """The fastest of ``repeat`` runs (seconds), after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def report(title: str, rows: list[tuple[str, float]], baseline: str) -> None:
    """Print times and ratios against the ``baseline`` row."""
    base = dict(rows)[baseline]
    print(title)
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"  {name:<{width}}  {seconds * 1000:9.1f} ms   x{base / seconds:5.2f} vs {baseline}")
