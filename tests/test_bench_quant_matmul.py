"""experiments/bench_quant_matmul.py --quick: the GPU benchmark's smoke version runs on the CPU."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from helpers import run_main

from experiments import bench_quant_matmul

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 8-15 s; the matmul kernels' own tests stay fast
def test_bench_quant_matmul_quick_writes_json(tmp_path):
    out = tmp_path / "quant_matmul.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_quant_matmul", "--quick", "--sweep", f"--out={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] and result["interpret"]
    assert {"device", "jax_version", "command", "date", "bandwidth_gb_per_s", "card"} <= result.keys()
    assert result["bandwidth_gb_per_s"] == 3350  # configs/hardware/h100_80gb.json
    rows = result["results"]
    shapes = sorted({(r["M"], r["K"], r["N"]) for r in rows})
    assert [m for m, _, _ in shapes] == [1, 40]  # the decode (split-K) and the GEMM path
    for shape in shapes:
        variants = [r["variant"] for r in rows if (r["M"], r["K"], r["N"]) == shape]
        assert variants[0] == "dense bf16"
        for scheme in ("int8-pc", "int4-g128", "int4-g128-zeros"):
            assert f"xla {scheme}" in variants
            assert f"pallas {scheme} default" in variants
            assert sum(v.startswith(f"pallas {scheme} m") for v in variants) == 1  # one swept BlockSizes
        for w8 in ("int8", "fp8"):
            assert {f"xla w8a8-{w8}", f"pallas w8a8-{w8} default"} <= set(variants)
    for row in rows:
        assert "error" not in row, row
        assert row["passed"] and row["max_row_error"] <= 2e-2, row  # bfloat16 outputs
        assert row["seconds_per_call"] > 0 and row["compile_s"] > 0
        assert row["gb_per_s"] > 0
        assert abs(row["pct_bandwidth"] - 100 * row["gb_per_s"] / 3350) < 1e-9 * row["pct_bandwidth"]
        assert row["speedup_vs_bf16"] > 0
    dense = next(r for r in rows if r["variant"] == "dense bf16")
    int4 = next(r for r in rows if r["variant"] == "xla int4-g128" and r["M"] == dense["M"])
    assert dense["weight_bytes"] == dense["K"] * dense["N"] * 2
    assert int4["weight_bytes"] == dense["K"] * dense["N"] // 2 + dense["K"] // 128 * dense["N"] * 2  # bf16 scales
    table = (out.parent / "quant_matmul.md").read_text()
    assert table.count("| pallas ") == 2 * (3 * 2 + 2) and "% BW" in table  # 2 shapes x (3 schemes x 2 + 2 W8A8)
    assert table.strip() in proc.stdout


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU rule: on a GPU the benchmark runs its own shapes")
def test_a_cpu_needs_allow_cpu_and_then_runs_small_shapes_unless_given(monkeypatch):
    seen = []
    monkeypatch.setattr(bench_quant_matmul, "bench_shape", lambda rows, key, shape, **kw: seen.append(shape))
    with pytest.raises(ValueError, match="--allow_cpu: bench_quant_matmul times GPU kernels"):
        run_main(bench_quant_matmul)
    run_main(bench_quant_matmul, "--allow_cpu")
    assert seen == [(1, 256, 97), (40, 256, 97)]
    seen.clear()
    run_main(bench_quant_matmul, "--allow_cpu", "--shapes=2x128x64")  # shapes given: those
    assert seen == [(2, 128, 64)]
