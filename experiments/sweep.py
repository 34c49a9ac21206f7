"""Sweep any experiment's flags over a grid; each point in its own process; resumable.

  python -m jaxinfer.experiments.sweep --grid=batching --out=runs/batching     # a shipped grid, by name
  python -m jaxinfer.experiments.sweep --grid=my_grid.json --out=runs/mine --dry_run
  python -m jaxinfer.experiments.sweep_report --dir=runs/batching --x=max_batch --y=throughput_tok_s --group=batching

--grid is a JSON file, or the name of a grid shipped in jaxinfer/configs/sweeps (batching, kv_capacity,
eval, lora, page_size, quant, spec). A grid file:
  {"experiment": "kv_capacity", "flags": {"models": "llama3_8b"},
   "grid": {"kv_dtype": ["bfloat16", "int8"], "context": [2048, 8192]}, "repeats": 1}
runs the product of the grid's values (and/or an explicit "points": [{flag: value, ...}] list), each
with the fixed "flags", `repeats` times; every flag must be one the experiment takes. Every point runs
as `python -m <this package>.<experiment> --flag=value ... --out=DIR/points/<key>.json` (the same
interpreter and package as the sweep: experiments.X from a checkout, jaxinfer.experiments.X from an
installed wheel) in the sweep's working directory, so relative paths in flags mean what they mean to
the sweep, with a time limit; its result (the experiment's JSON: config, env, metrics) or, if it
crashed or timed out, its error line and stderr tail, is appended as one line to DIR/results.jsonl.
Running the same command again skips the points already done (--rerun_failed retries the failed
ones). The sweep ends with exit status 1 when any point's latest run failed, each printed with its
error line. --workers=N runs N points at once, each pinned to its own GPU (CUDA_VISIBLE_DEVICES)
where there are GPUs; --launcher=ray hands each point to a Ray cluster as a task
(`pip install "jaxinfer[ray]"`; one GPU per task where the cluster has them).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib
import itertools
import json
import os
import queue
import subprocess
import sys
import time

from absl import flags
from tqdm.auto import tqdm

from jaxinfer import memory

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_string("grid", "", "The grid: a JSON file, or the name of a shipped one (see this module's docstring).")
flags.DEFINE_bool("dry_run", False, "List the points and run nothing.")
flags.DEFINE_bool("rerun_failed", False, "Run again the points that failed before.")
flags.DEFINE_integer("workers", 1, "Points run at once (each pinned to its own GPU where there are GPUs).")
flags.DEFINE_enum("launcher", "local", ["local", "ray"], "Run points as local processes or as Ray tasks.")
flags.DEFINE_integer("timeout_s", 3600, "Time limit of one point, in seconds.")
for _name in ("out",):
    flags.declare_key_flag(_name)

GRID_KEYS = ("experiment", "flags", "grid", "points", "repeats")
STDERR_TAIL = 4000


def grid_path(grid: str) -> str:
    """--grid as a file: the path itself, or a shipped grid's name (jaxinfer/configs/sweeps/NAME.json)."""
    if os.path.exists(grid):
        return grid
    shipped = memory.CONFIGS_DIR / "sweeps" / f"{grid}.json"
    if os.sep not in grid and not grid.endswith(".json") and shipped.is_file():
        return str(shipped)
    names = sorted(p.stem for p in (memory.CONFIGS_DIR / "sweeps").glob("*.json"))
    raise ValueError(f"--grid={grid}: no such file, nor a shipped grid ({', '.join(names)})")


def load_grid(path: str) -> dict:
    """The grid file, checked: a known experiment, flags it takes, lists of values; no work done."""
    try:
        with open(path) as f:
            spec = json.load(f)
    except OSError as e:
        raise ValueError(f"--grid={path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--grid={path} is not valid JSON: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("experiment"), str):
        raise ValueError(f"--grid={path}: needs an object with \"experiment\" (a module of experiments/)")
    unknown = sorted(set(spec) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"--grid={path}: unknown keys {unknown}; the keys are {GRID_KEYS}")
    name = spec["experiment"]
    if name in ("sweep", "sweep_report", "common") or not os.path.exists(
            os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")):
        raise ValueError(f"--grid={path}: experiment={name!r} is not an experiment in experiments/")
    module = importlib.import_module(f"{__package__}.{name}")  # defines its flags
    grid, points, fixed = spec.get("grid", {}), spec.get("points", []), spec.get("flags", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"--grid={path}: \"grid\" must map flags to non-empty lists of values")
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points) or not isinstance(fixed, dict):
        raise ValueError(f"--grid={path}: \"points\" must be a list of objects and \"flags\" an object")
    if not grid and not points:
        raise ValueError(f"--grid={path}: give \"grid\", \"points\" or both")
    repeats = spec.get("repeats", 1)
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"--grid={path}: repeats={repeats!r} must be an integer >= 1")
    taken = {f.name for f in FLAGS.get_key_flags_for_module(module)}
    for flag in sorted(set(fixed) | set(grid) | {k for p in points for k in p}):
        if flag == "out":
            raise ValueError(f"--grid={path}: --out is the sweep's to set")
        if flag not in taken:
            raise ValueError(f"--grid={path}: {name} has no flag --{flag}")
    return {"experiment": name, "flags": fixed, "grid": grid, "points": points, "repeats": repeats}


def expand(spec: dict) -> list[dict]:
    """Every point: {"key", "flags", "repeat"} (the key names the flags and the repeat)."""
    names = list(spec["grid"])
    combos = [dict(zip(names, values)) for values in itertools.product(*(spec["grid"][n] for n in names))]
    combos = (combos if names else []) + list(spec["points"])
    out = []
    for combo in combos:
        point = {**spec["flags"], **combo}
        for repeat in range(spec["repeats"]):
            digest = hashlib.sha1(json.dumps([spec["experiment"], point, repeat], sort_keys=True).encode())
            out.append({"key": digest.hexdigest()[:12], "flags": point, "repeat": repeat})
    return out


def command(experiment: str, point: dict, out: str) -> list[str]:
    args = [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in point["flags"].items()]
    return [sys.executable, "-m", f"{__package__}.{experiment}", *args, f"--out={out}"]


def run_point(argv: list[str], out: str, timeout_s: int, gpu: str | None, cwd: str) -> dict:
    """Run one point in `cwd` (the sweep's working directory); its outcome as a results.jsonl line
    (without the point's own fields): "ok" with its record, or "failed" with its error line."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-STDERR_TAIL:]
        return {"status": "failed", "seconds": time.perf_counter() - t0, "error": f"timed out after {timeout_s} s",
                "stderr": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.exists(out):
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        why = f"exit status {proc.returncode}" if proc.returncode else "no result file"
        last = lines[-1].strip() if lines else "no stderr"
        return {"status": "failed", "seconds": seconds, "error": f"{why}: {last}", "stderr": proc.stderr[-STDERR_TAIL:]}
    with open(out) as f:
        return {"status": "ok", "seconds": seconds, "record": json.load(f)}


def gpus() -> list[str]:
    """The GPUs this machine has (their indices, from nvidia-smi), or none."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def latest(results: str) -> dict[str, dict]:
    """The latest results.jsonl line of each point, by key."""
    rows = {}
    if os.path.exists(results):
        with open(results) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    rows[row["key"]] = row
    return rows


def done_keys(results: str, rerun_failed: bool) -> set[str]:
    """Keys already finished (and, unless rerunning them, failed) in results.jsonl."""
    return {k for k, row in latest(results).items() if row["status"] == "ok" or not rerun_failed}


def run_local(todo, spec, out_dir, bar, results):
    slots: queue.Queue = queue.Queue()
    devices = gpus()
    for i in range(FLAGS.workers):
        slots.put(devices[i % len(devices)] if devices else None)

    def task(point):
        gpu = slots.get()
        try:
            out = os.path.join(out_dir, "points", f"{point['key']}.json")
            return point, run_point(command(spec["experiment"], point, out), out, FLAGS.timeout_s, gpu, os.getcwd())
        finally:
            slots.put(gpu)

    with concurrent.futures.ThreadPoolExecutor(FLAGS.workers) as pool:
        for point, outcome in map(lambda f: f.result(), concurrent.futures.as_completed(
                [pool.submit(task, p) for p in todo])):
            results(point, outcome)
            bar.update()


def run_ray(todo, spec, out_dir, bar, results):
    import ray  # the optional [ray] extra

    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)
    per_task_gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    remote = ray.remote(num_gpus=per_task_gpus)(
        lambda argv, out, timeout_s, cwd: run_point(argv, out, timeout_s, None, cwd))
    pending = {}
    for point in todo:
        out = os.path.join(out_dir, "points", f"{point['key']}.json")
        pending[remote.remote(command(spec["experiment"], point, out), out, FLAGS.timeout_s, os.getcwd())] = point
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        results(pending.pop(ready[0]), ray.get(ready[0]))
        bar.update()


def main(argv):
    del argv
    if not FLAGS.grid or not FLAGS.out:
        raise ValueError("--grid and --out are required")
    if FLAGS.workers < 1 or FLAGS.timeout_s < 1:
        raise ValueError(f"--workers={FLAGS.workers} and --timeout_s={FLAGS.timeout_s} must be >= 1")
    if FLAGS.launcher == "ray":
        common.require("--launcher=ray", "ray")
    spec = load_grid(grid_path(FLAGS.grid))
    points = expand(spec)
    out_dir = os.path.abspath(FLAGS.out)
    results_path = os.path.join(out_dir, "results.jsonl")
    done = done_keys(results_path, FLAGS.rerun_failed)
    todo = [p for p in points if p["key"] not in done]
    if FLAGS.dry_run:
        for p in points:
            state = "done" if p["key"] in done else "to run"
            print(f"{p['key']}  {state:6}  repeat {p['repeat']}  " + " ".join(f"--{k}={v}" for k, v in p["flags"].items()))
        print(f"{len(points)} points, {len(todo)} to run")
        return
    os.makedirs(os.path.join(out_dir, "points"), exist_ok=True)
    failed = []

    def results(point, outcome):
        with open(results_path, "a") as f:
            f.write(json.dumps({"key": point["key"], "experiment": spec["experiment"], "flags": point["flags"],
                                "repeat": point["repeat"], **outcome}) + "\n")
        if outcome["status"] != "ok":
            failed.append(point["key"])

    bar = tqdm(total=len(todo), desc=f"sweep {spec['experiment']}", unit="point")
    (run_ray if FLAGS.launcher == "ray" else run_local)(todo, spec, out_dir, bar, results)
    bar.close()
    print(f"{len(todo) - len(failed)} of {len(todo)} points ran ({len(points) - len(todo)} done before); "
          f"{len(failed)} failed")
    print(f"wrote {results_path}")
    rows = latest(results_path)
    failures = [rows[p["key"]] for p in points if rows[p["key"]]["status"] != "ok"]
    for row in failures:
        flags_text = " ".join(f"--{k}={v}" for k, v in row["flags"].items())
        print(f"failed {row['key']} ({flags_text}): {row['error']}", file=sys.stderr)
    if failures:
        print(f"error: {len(failures)} of {len(points)} points failed (--rerun_failed runs them again)",
              file=sys.stderr)
        sys.exit(1)


def cli() -> None:
    """The `jaxinfer-sweep` console script (the same as python -m jaxinfer.experiments.sweep)."""
    common.run(main, folders=("out",))


if __name__ == "__main__":
    cli()
