"""The GPU session script's rehearsal: every step of benchmarks/gpu_session.sh, with the same
commands and flags, on the CPU (kernels interpreted, a small Llama-3 shape for the 8B one, the step
limits scaled), so that a change that would break the device run fails here, not on the card."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from experiments import gpu_report
from helpers import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")


def _device_limits() -> list[int]:
    """Every step's device limit, read from the script's `step NAME LIMIT` calls."""
    with open(SCRIPT) as f:
        return [int(n) for n in re.findall(r"^\s*step \S+ (\d+) ", f.read(), re.MULTILINE)]


def test_step_limits_fit_the_session():
    """The device run fits its 9 minutes by the limits' sum (the two overlap runs are one line in a
    loop), and the rehearsal's scaled limits fit 4 minutes."""
    limits = _device_limits()
    with open(SCRIPT) as f:
        text = f.read()
    total = sum(limits) + 35  # the overhead step runs twice (overlap false, true)
    assert len(limits) >= 9 and total < 9 * 60, (limits, total)
    assert f"add up to {total} s" in text  # the header says the true sum
    scale = int(re.search(r"^\s*SCALE=\$\{REHEARSE_SCALE:-(\d+)\}\s+#", text, re.MULTILINE).group(1))
    assert sum(limit * scale // 100 for limit in limits + [35]) < 4 * 60  # the script's integer arithmetic


@pytest.mark.slow  # about 2 minutes on a 2-core CPU
def test_rehearsal_runs_every_step(tmp_path):
    """Every step exits 0 and writes its JSON. Under the device limits, not the rehearsal's scaled
    ones: beside the other slow tests the machine is loaded past what the 4-minute budget assumes
    (measured: 107 s in all at load 4-5, five steps over their scaled limits at load 5-6)."""
    out = tmp_path / "session"
    env = {**os.environ, "REHEARSE": "1", "REHEARSE_SCALE": "100", "OUT": str(out), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(["bash", SCRIPT], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[2:]]
    assert len(rows) == len(_device_limits()) + 1, rows  # every step ran
    assert all(r[2] == "0" for r in rows), rows
    for name, *_ in rows:
        if name != "-":
            assert json.loads((out / f"{name}.json").read_text()), name
    report = tmp_path / "report.md"
    run_main(gpu_report, f"--dir={out}", f"--out={report}")
    text = report.read_text()
    assert text.startswith("# GPU session rehearsal on cpu") and f"{len(rows)} steps, 0 failed" in text
