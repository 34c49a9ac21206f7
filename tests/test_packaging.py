"""The wheel works outside the checkout: configs ship as package data, the experiments install as
jaxinfer.experiments (no generic top-level `experiments` package) with a console script per main
experiment, and, installed into a fresh virtual environment, the main job, a sweep, its report and
seed_claims run from any directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO

# What the wheel is built from: the package's sources, as tracked (a build/ folder left in the
# checkout by an earlier build could carry stale files into the wheel, so a clean copy is built).
SOURCES = ("pyproject.toml", "README.md", "jaxinfer", "experiments", "pallas_kernels", "configs")
SCRIPTS = ("generate", "serve", "sweep", "sweep_report", "seed_claims", "bench_batching", "bench_serving",
           "kv_capacity", "quant_eval", "spec_decode", "lora_batching", "soak")


def build_wheel(tmp_path) -> str:
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("jaxinfer-*.whl")
    return str(wheel)


def test_wheel_carries_configs_and_experiments_under_jaxinfer(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxinfer/configs/hardware/h100_80gb.json" in names and "pallas_kernels/tuned.json" in names
    assert "jaxinfer/configs/sweeps/batching.json" in names  # sweep --grid=batching from an install
    assert "jaxinfer/experiments/kv_capacity.py" in names
    # the lm-eval backend and its shipped task (YAML + data) for jaxinfer-lm-eval from an install
    assert {"jaxinfer/evaluation/backend.py", "jaxinfer/configs/tasks/arith_mc.yaml",
            "jaxinfer/configs/tasks/arith_mc.jsonl"} <= set(names)
    assert not any(n.startswith("experiments/") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for name in SCRIPTS:
        assert f"jaxinfer-{name.replace('_', '-')} = jaxinfer.experiments.{name}:cli" in entry_points
    assert "jaxinfer-lm-eval = jaxinfer.evaluation.__main__:cli" in entry_points

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              wheel], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "jaxinfer.experiments.kv_capacity", "--models=llama3_8b",
                          "--cards=h100_80gb"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert run.returncode == 0 and "llama3_8b" in run.stdout, run.stderr[-2000:]


@pytest.mark.slow
def test_installed_wheel_runs_the_main_job_a_sweep_and_seed_claims_from_any_directory(tmp_path):
    """pip install of the wheel into a fresh venv (its dependencies from the system's site-packages),
    then, from a folder that is not the checkout: the main job by its console script, a two-point
    sweep with relative paths and its report, and seed_claims' cheapest claim."""
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python, scripts = str(venv / "bin" / "python"), venv / "bin"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", wheel], check=True, timeout=300)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout on the path

    def sh(*argv) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(a) for a in argv], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{argv}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc

    where = sh(python, "-c", "import jaxinfer, jaxinfer.experiments.sweep as s; print(jaxinfer.__file__, s.__file__)")
    assert all(p.startswith(str(venv)) for p in where.stdout.split()), where.stdout  # the wheel's, not the checkout's

    job = sh(scripts / "jaxinfer-generate", "--prompt=def add(a, b):", "--max_tokens=8", "--temperature=0",
             "--out=generate.json")
    assert "generated 8 tokens" in job.stdout and json.loads((work / "generate.json").read_text())["outputs"]

    metric = "h100_80gb/llama3_8b/max_batch_at_context"
    (work / "grid.json").write_text(json.dumps({"experiment": "kv_capacity", "flags": {
        "models": "llama3_8b", "cards": "h100_80gb"}, "grid": {"context": [2048, 8192]}}))
    sh(python, "-m", "jaxinfer.experiments.sweep", "--grid=grid.json", "--out=sweep")  # points run in work/
    rows = [json.loads(line) for line in (work / "sweep" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("error") for r in rows]
    assert all("-m jaxinfer.experiments.kv_capacity" in r["record"]["env"]["command"] for r in rows)
    sh(scripts / "jaxinfer-sweep-report", "--dir=sweep", "--x=context", f"--y={metric}")
    assert "2 points finished, 0 failed" in (work / "sweep" / "report.md").read_text()

    claims = sh(python, "-m", "jaxinfer.experiments.seed_claims", "--only=kv_formula", "--report=claims.md")
    assert "2,147,483,648 bytes" in (work / "claims.md").read_text() and "**holds**" in claims.stdout
