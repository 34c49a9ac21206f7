"""Timing shared by the GPU benchmarks."""

from __future__ import annotations

import statistics
import time

import jax


def median_call_time(fn, arg_sets, runs: int, calls: int) -> float:
    """Median seconds per call over `runs` runs of `calls` back-to-back calls, cycling through
    arg_sets (several weight sets defeat the L2 cache). Each set is called once first (compile)."""
    for args in arg_sets:
        jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for i in range(calls):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / calls)
    return statistics.median(per_call)
