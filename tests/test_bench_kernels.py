"""experiments/bench_kernels.py --quick: the GPU benchmark's smoke version runs on the CPU."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from helpers import run_main

from experiments import bench_kernels

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 8-16 s of interpreted kernels; the kernels' own tests stay fast
def test_bench_kernels_quick_writes_json(tmp_path):
    out = tmp_path / "kernels.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_kernels", "--quick", f"--out={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] and result["interpret"]
    assert {"device", "jax_version", "command", "date"} <= result.keys()
    sections = {r["section"].split(" B=")[0] for r in result["results"]}
    assert sections == {"prefill", "decode", "decode int8"}
    for row in result["results"]:
        assert "error" not in row, row
        assert row["max_row_error"] <= 2e-2, row  # bfloat16 inputs
        assert row["seconds_per_call"] > 0
    lines = proc.stdout.splitlines()
    assert "max row err" in lines[-len(result["results"]) - 2] and lines[-1] == f"wrote {out}"


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU rule: on a GPU the benchmark runs its own shapes")
def test_a_cpu_needs_allow_cpu_and_then_runs_the_small_shapes(monkeypatch):
    seen = []  # (section, L, runs) of every benchmark the run would time
    for name in ("bench_prefill", "bench_decode"):
        monkeypatch.setattr(bench_kernels, name, lambda rows, key, name=name, **kw: seen.append((name, kw["L"],
                                                                                                  kw["runs"])))
    monkeypatch.setattr(bench_kernels, "check_small_shapes", lambda rows, **kw: seen.append(("checks", 0, 0)))
    with pytest.raises(ValueError, match="--allow_cpu: bench_kernels times GPU kernels"):
        run_main(bench_kernels)
    assert not seen
    run_main(bench_kernels, "--allow_cpu", "--runs=3")
    assert seen and all(L <= 64 and runs == 3 for _, L, runs in seen), seen  # small shapes, the runs asked for
