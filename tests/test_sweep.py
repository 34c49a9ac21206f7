"""Sweeps: a grid of an experiment's flags runs point by point into results.jsonl, resumes, records
failures without stopping, and renders a report; bad grid files are refused before anything runs."""

from __future__ import annotations

import json
import os

import pytest

from experiments import kv_capacity, sweep, sweep_report
from helpers import REPO, run_main

METRIC = "h100_80gb/llama3_8b/max_batch_at_context"
# The swept experiment's flags are defined at import; importing it here defines them before
# run_main's flagsaver takes its snapshot (flags a saver did not see are dropped when it restores).
assert kv_capacity.FLAGS is sweep.FLAGS


def write_grid(tmp_path, **spec):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(spec))
    return str(path)


@pytest.mark.slow  # 9 s: the fast tier stays under 5 minutes on the 2-core CPU (CI runs both)
def test_sweep_runs_resumes_and_reports(tmp_path, capsys):
    grid = write_grid(tmp_path, experiment="kv_capacity", flags={"models": "llama3_8b", "cards": "h100_80gb"},
                      grid={"kv_dtype": ["bfloat16", "int8"], "context": [2048, 8192]}, repeats=1)
    out = tmp_path / "sweep"
    run_main(sweep, f"--grid={grid}", f"--out={out}")
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(r["status"] == "ok" for r in lines)
    by = {(r["flags"]["kv_dtype"], r["flags"]["context"]): r["record"]["metrics"][METRIC] for r in lines}
    assert by[("int8", 2048)] > by[("bfloat16", 2048)] > by[("bfloat16", 8192)]  # int8 KV: more sequences fit
    run_main(sweep, f"--grid={grid}", f"--out={out}")  # everything done: nothing runs
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    assert "0 of 0 points ran (4 done before)" in capsys.readouterr().out

    run_main(sweep_report, f"--dir={out}", "--x=context", f"--y={METRIC}", "--group=kv_dtype")
    report = (out / "report.md").read_text()
    assert "| int8 | 2048 |" in report and "4 points finished, 0 failed" in report
    assert (out / f"{METRIC.replace('/', '_')}_vs_context.png").stat().st_size > 1000


@pytest.mark.slow  # 4 s: a sweep of script runs
def test_a_failing_point_is_recorded_and_the_others_finish(tmp_path, capsys):
    grid = write_grid(tmp_path, experiment="kv_capacity", flags={"models": "llama3_8b", "cards": "h100_80gb"},
                      points=[{"kv_dtype": "int8"}, {"kv_dtype": "int3"}])
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_status:  # a sweep with a failed point ends with status 1
        run_main(sweep, f"--grid={grid}", f"--out={out}", "--workers=2")
    assert exit_status.value.code == 1
    rows = {r["flags"]["kv_dtype"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert rows["int8"]["status"] == "ok" and rows["int3"]["status"] == "failed"
    error_line = "exit status 2: error: kv_dtype='int3' is not one of"  # the point's last stderr line
    assert rows["int3"]["error"].startswith(error_line)
    assert f"failed {rows['int3']['key']} (--models=llama3_8b --cards=h100_80gb --kv_dtype=int3): {error_line}" in \
        capsys.readouterr().err
    run_main(sweep_report, f"--dir={out}", "--x=kv_dtype", f"--y={METRIC}")
    assert error_line in (out / "report.md").read_text()
    run_main(sweep, f"--grid={grid}", f"--out={out}", "--dry_run")
    assert "2 points, 0 to run" in capsys.readouterr().out
    run_main(sweep, f"--grid={grid}", f"--out={out}", "--dry_run", "--rerun_failed")
    assert "2 points, 1 to run" in capsys.readouterr().out


@pytest.mark.parametrize("spec, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"experiment": "nope", "grid": {"a": [1]}}), "experiment='nope' is not an experiment"),
    (json.dumps({"experiment": "kv_capacity", "grid": {"no_such_flag": [1]}}), "kv_capacity has no flag --no_such_flag"),
    (json.dumps({"experiment": "kv_capacity", "grid": {"context": 5}}), "must map flags to non-empty lists"),
    (json.dumps({"experiment": "kv_capacity", "grid": {"context": [1]}, "repeat": 2}), "unknown keys \\['repeat'\\]"),
    (json.dumps({"experiment": "kv_capacity", "flags": {"out": "x"}, "grid": {"context": [1]}}), "--out is the sweep's"),
])
def test_bad_grid_files_are_refused_before_anything_runs(tmp_path, spec, message):
    path = tmp_path / "grid.json"
    path.write_text(spec)
    with pytest.raises(ValueError, match=message):
        run_main(sweep, f"--grid={path}", f"--out={tmp_path / 'out'}")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ray_launcher_runs_the_points_as_tasks(tmp_path):
    """--launcher=ray on a local Ray instance (needs the [ray] extra)."""
    pytest.importorskip("ray")
    grid = write_grid(tmp_path, experiment="kv_capacity", flags={"models": "llama3_8b", "cards": "h100_80gb"},
                      grid={"context": [2048, 4096]})
    out = tmp_path / "sweep"
    run_main(sweep, f"--grid={grid}", f"--out={out}", "--launcher=ray")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["flags"]["context"] for r in rows) == [2048, 4096] and all(r["status"] == "ok" for r in rows)


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(REPO, "configs", "sweeps"))))
def test_shipped_grids_name_real_flags(name):
    spec = sweep.load_grid(os.path.join(REPO, "configs", "sweeps", name))
    assert len(sweep.expand(spec)) >= 2


def test_a_shipped_grid_runs_by_name(tmp_path, capsys):
    """--grid=NAME finds jaxinfer/configs/sweeps/NAME.json wherever the package is installed."""
    run_main(sweep, "--grid=kv_capacity", f"--out={tmp_path / 'o'}", "--dry_run")
    shipped = sweep.expand(sweep.load_grid(os.path.join(REPO, "configs", "sweeps", "kv_capacity.json")))
    assert f"{len(shipped)} points, {len(shipped)} to run" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--grid=kv_capacity.json: no such file, nor a shipped grid"):
        run_main(sweep, "--grid=kv_capacity.json", f"--out={tmp_path / 'o'}")


def test_an_integer_flag_gets_integer_ticks():
    matplotlib = pytest.importorskip("matplotlib.pyplot").matplotlib
    table = [{"group": "", "x": x, "median": 1.0 / x, "min": 1.0 / x, "max": 1.0 / x, "n": 1} for x in (1, 2, 3)]
    fig = sweep_report.figure(table, "max_batch", "tpot_s", "")
    low, high = fig.axes[0].get_xlim()
    ticks = [t for t in fig.axes[0].get_xticks() if low <= t <= high]
    matplotlib.pyplot.close(fig)
    assert ticks and all(float(t).is_integer() for t in ticks), ticks  # no 1.25, 2.75 between batch sizes
