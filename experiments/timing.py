"""Timing and run records shared by the GPU benchmarks."""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import time

import jax


def environment(module: str) -> dict:
    """When, where and how a benchmark ran: date (UTC), device, backend, jax version, command."""
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        jax_version=jax.__version__,
        command=" ".join([os.path.basename(sys.executable), "-m", module, *sys.argv[1:]]),
    )


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
