"""The wheel works outside the checkout: configs ship as package data, the experiments install as
jaxinfer.experiments (no generic top-level `experiments` package), and the console script exists."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from helpers import REPO


def test_wheel_carries_configs_and_experiments_under_jaxinfer(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), REPO], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("jaxinfer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxinfer/configs/hardware/h100_80gb.json" in names and "pallas_kernels/tuned.json" in names
    assert "jaxinfer/experiments/kv_capacity.py" in names
    assert not any(n.startswith("experiments/") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "jaxinfer-generate = jaxinfer.experiments.generate:cli" in entry_points

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "jaxinfer.experiments.kv_capacity", "--models=llama3_8b",
                          "--cards=h100_80gb"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert run.returncode == 0 and "llama3_8b" in run.stdout, run.stderr[-2000:]
