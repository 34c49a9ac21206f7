"""Every experiment from the command line, as a user meets it without the optional extras
(torch, httpx, fastapi, matplotlib, ray, ... cannot be imported): --help prints the usage, and each
bad input ends the run with one `error: ...` line naming the flag and exit status 2, before any
model loads; never a traceback. The command lines run in forks of one process (tests/without_extras.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import REPO

EXPERIMENTS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "experiments"))
                     if f.endswith(".py") and not f.startswith("_") and f != "common.py")  # _x.py: a helper module
MISSING = "/nonexistent/folder"

# (experiment, arguments, what its one error line says); {tmp} is a folder the test fills first.
BAD_INPUT = [
    # the cases
    ("quant_eval", [f"--out={MISSING}/q.json"], f"--out={MISSING}/q.json: the directory {MISSING} does not exist"),
    ("quant_eval", ["--schemes=dense,int4-rtn-g7"], "--schemes: .*group_size=7: 4-bit packing needs an even group_size"),
    ("quant_eval", ["--calib_sequences=-4"], "--calib_sequences=-4 must be >= 1"),
    ("bench_batching", ["--workload_file=/missing.jsonl"], "--workload_file=/missing.jsonl: no such file"),
    ("bench_batching", ["--workload_file={tmp}/abc.jsonl"], r"abc.jsonl line 1: prompt_len='abc' must be an integer"),
    ("bench_batching", ["--workload_file={tmp}/short.jsonl"], r"short.jsonl line 2: output_len=None must be an integer"),
    ("bench_batching", ["--workload_file={tmp}/garbage.jsonl"], r"garbage.jsonl line 1 is not JSON"),
    ("bench_peers", ["--systems=hf"], r"needs torch: pip install 'jaxinfer\[peers\]'"),
    ("bench_serving", [], r"bench_serving needs aiohttp: pip install 'jaxinfer\[serve\]'"),
    ("serve", [], r"serve needs fastapi: pip install 'jaxinfer\[serve\]'"),
    ("bench_batching", ["--plot={tmp}/p.png"], r"--plot needs matplotlib: pip install 'jaxinfer\[plots\]'"),
    ("sweep", ["--grid={tmp}/grid.json", "--out={tmp}/o", "--launcher=ray"], r"needs ray: pip install 'jaxinfer\[ray\]'"),
    ("bench_kernels", [], "--allow_cpu: bench_kernels times GPU kernels"),
    ("bench_quant_matmul", [], "--allow_cpu: bench_quant_matmul times GPU kernels"),
    ("kv_capacity", ["--context=-10"], "--context=-10 must be >= 1"),
    ("kv_capacity", ["--models=llama9"], "--models: model='llama9' is unknown"),
    ("spec_decode", ["--methods=eagle:/nonexistent"], "--methods=eagle:/nonexistent: /nonexistent is neither a directory"),
    ("spec_decode", ["--methods=medusa:{tmp}"], "--methods=medusa:.*holds no drafter.json"),
    ("spec_decode", ["--methods=draft:tiny-eagle"], "tiny-eagle is the shipped eagle drafter, not one for method draft"),
    ("sweep_report", ["--dir={tmp}/sweep", "--x=context", "--y=m", "--group=foo"],
     "--group=foo is not a flag this sweep varies or sets: context, kv_dtype"),
    ("sweep_report", ["--dir={tmp}/sweep", "--x=context", "--y=nope"], "--y=nope is not a metric of this sweep"),
    ("sweep_report", ["--dir={tmp}/garbage_sweep", "--x=a", "--y=b"], "results.jsonl line 1 is not JSON"),
    ("sweep_report", ["--dir={tmp}/sweep", "--x=context", "--y=m", "--grid=g.json"], "Unknown command line flag 'grid'"),
    ("sweep", ["--grid=nope", "--out={tmp}/o"], r"--grid=nope: no such file, nor a shipped grid \(batching"),
    ("sweep", ["--grid={tmp}/grid.json", "--out={tmp}/abc.jsonl"], "--out=.*abc.jsonl is a file, not a folder"),
    ("seed_claims", ["--only=speed"], "--only: 'speed' is not a claim"),
    ("seed_claims", [f"--report={MISSING}/r.md"], f"--report={MISSING}/r.md: the directory {MISSING} does not exist"),
    # the rule for every experiment: flags, positional arguments, paths, drafters
    ("generate", ["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    ("generate", ["--max_batch=abc"], "flag --max_batch=abc: invalid literal"),
    ("generate", ["stray"], r"unexpected arguments \['stray'\]"),
    ("generate", ["--plot={tmp}/p.png"], "--plot is not a flag of generate, which would ignore it"),
    ("generate", ["--prompts_file=/missing.txt"], "--prompts_file=/missing.txt: no such file"),
    ("generate", ["--weights=int5"], "--weights='int5': bits=5 is not one of"),
    ("generate", ["--spec=eagle", "--spec_draft=/nonexistent"], "--spec_draft=/nonexistent: /nonexistent is neither"),
    ("generate", ["--top_p=0"], "top_p"),
    ("bench_tp", ["--tp=2"], "--tp is not a flag of bench_tp"),
    ("bench_tp", ["--tps=1,x"], "--tps=1,x: not a list of integers"),
    ("bench_tp", ["--ep=2"], "--ep is not a flag of bench_tp"),
    ("bench_tp", ["--eps=2,4"], r"--eps=2,4 must start with 1 \(the reference\)"),
    ("lora_batching", ["--max_batch=4"], "--max_batch is not a flag of lora_batching"),
    ("serve", ["--port=abc"], "flag --port=abc"),
    ("train_drafter", ["--evaluate=/nonexistent"], "--evaluate=/nonexistent: no such directory"),
    ("train_drafter", ["--train_dtype=bfloat16"], "--train_dtype=bfloat16 applies to --method=eagle3 only, not 'eagle'"),
    ("train_drafter", ["--aux_layers=2,15,29"], "--aux_layers applies to --method=eagle3 only, not 'eagle'"),
    ("train_drafter", ["--method=eagle3", "--aux_layers=2,15"], "--aux_layers='2,15' must be three distinct layer"),
    ("train_drafter", ["--method=eagle3", "--aux_layers=2,x,3"], "--aux_layers='2,x,3' must be three layer numbers"),
    ("drafter_scaling", ["--dir={tmp}"], "no spec_decode result at k=5 .* names a drafter folder"),
    ("drafter_scaling", ["--dir={tmp}", "--levels=2.5,x"], "--levels='2.5,x' must be numbers"),
    ("drafter_scaling", ["--dir={tmp}", "--plot={tmp}/p.png"], r"--plot needs matplotlib: pip install 'jaxinfer\[plots\]'"),
    ("train_tiny", [f"--save_corpus={MISSING}/c.npz"], f"--save_corpus={MISSING}/c.npz: the directory"),
    ("gpu_report", [f"--dir={MISSING}"], f"--dir={MISSING}: no such directory"),
    ("qat", ["--qat_schemes=int9"], "--qat_schemes: weights='int9': bits=9 is not one of"),
    ("eval_tiny", ["--windows=0"], "--windows=0 must be >= 1"),
    ("soak", ["--max_lora_rank=8"], "--max_lora_rank is not a flag of soak"),
    ("eval_tasks", [], r"eval_tasks needs lm_eval: pip install 'jaxinfer\[eval\]'"),
]


def fill(tmp_path) -> None:
    """The files the cases read: workload files, a grid, a sweep's results (good and garbled)."""
    (tmp_path / "abc.jsonl").write_text('{"prompt_len": "abc", "output_len": 4}\n')
    (tmp_path / "short.jsonl").write_text('{"prompt_len": 4, "output_len": 4}\n{"prompt_len": 4}\n')
    (tmp_path / "garbage.jsonl").write_text("prompt_len=4\n")
    (tmp_path / "grid.json").write_text(json.dumps({"experiment": "kv_capacity", "grid": {"context": [1024, 2048]}}))
    rows = [{"key": f"k{c}", "experiment": "kv_capacity", "flags": {"context": c, "kv_dtype": "int8"}, "repeat": 0,
             "status": "ok", "record": {"metrics": {"m": float(c)}}} for c in (1024, 2048)]
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "garbage_sweep").mkdir()
    (tmp_path / "garbage_sweep" / "results.jsonl").write_text("not json\n")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case's {rc, stdout, stderr}: the --help of each experiment, then BAD_INPUT."""
    tmp = tmp_path_factory.mktemp("cli")
    fill(tmp)
    cases = [[f"experiments.{name}", ["--help"]] for name in EXPERIMENTS]
    cases += [[f"experiments.{name}", [a.replace("{tmp}", str(tmp)) for a in args]] for name, args, _ in BAD_INPUT]
    proc = subprocess.run([sys.executable, os.path.join("tests", "without_extras.py")], input=json.dumps(cases),
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout)
    return {"help": dict(zip(EXPERIMENTS, outcome)), "bad": outcome[len(EXPERIMENTS):]}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_help_without_the_optional_extras(results, name):
    r = results["help"][name]
    assert "Traceback" not in r["stderr"] + r["stdout"], r["stderr"][-3000:]
    assert r["rc"] in (0, 1) and "flags:" in r["stdout"], r  # absl's --help exits with status 1
    assert f"experiments/{name}.py:" in r["stdout"]  # its own flags, listed under its file


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[f"{n}:{' '.join(a)}" for n, a, _ in BAD_INPUT])
def test_bad_input_is_one_error_line_and_status_2(results, case):
    name, args, message = BAD_INPUT[case]
    r = results["bad"][case]
    assert "Traceback" not in r["stderr"], r["stderr"][-3000:]
    errors = [line for line in r["stderr"].splitlines() if line.startswith("error: ")]
    assert r["rc"] == 2 and len(errors) == 1, r
    assert re.search(message, errors[0]), errors[0]
    assert "loaded" not in r["stdout"] and "compil" not in r["stdout"].lower(), r["stdout"]  # refused before any work


def test_experiments_import_side_by_side():
    """Every flag is defined once (common.py holds the shared ones): the experiments import into one
    process, as the tests import them, without absl's DuplicateFlagError."""
    code = "import importlib\n" + "".join(f"importlib.import_module('experiments.{name}')\n" for name in EXPERIMENTS)
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
