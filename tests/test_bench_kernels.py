"""experiments/bench_kernels.py --quick: the GPU benchmark's smoke version runs on the CPU."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


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
