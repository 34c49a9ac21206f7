"""A sweep's table and plot: one metric against one flag, a line per value of another.

  python -m jaxinfer.experiments.sweep_report --dir=runs/batching --x=max_batch --y=throughput_tok_s --group=batching

Reads DIR/results.jsonl (the last line of each point), takes the metric from each finished point's
JSON (`metrics`, flat names such as "ttft_s/p50"), and over the repeats of a point its median, min
and max. --x and --group must be flags the sweep sets, --y a metric its points report. Writes
DIR/report.md (a markdown table; failed points listed with their error line) and, with matplotlib
installed (`pip install 'jaxinfer[plots]'`), DIR/<y>_vs_<x>.png.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import statistics

from absl import flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_string("x", "", "The flag on the x axis.")
flags.DEFINE_string("y", "", "The metric (a name in the experiment's `metrics`).")
flags.DEFINE_string("group", "", "A flag whose values get one line each ('' = one line).")
flags.declare_key_flag("dir")


def latest_rows(path: str) -> list[dict]:
    """The last results.jsonl line of each point; ValueError naming the file and line of a bad one."""
    if not os.path.exists(path):
        raise ValueError(f"--dir: no results.jsonl at {path}")
    latest = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--dir: {path} line {number} is not JSON ({e.msg}): not a sweep's results") from None
            if not isinstance(row, dict) or not {"key", "status", "flags"} <= row.keys() or (
                    row["status"] == "ok" and not isinstance(row.get("record"), dict)):
                raise ValueError(f"--dir: {path} line {number} is not a sweep's result line (key, status, flags, "
                                 "and a record when ok)")
            latest[row["key"]] = row
    if not latest:
        raise ValueError(f"--dir: {path} has no points")
    return list(latest.values())


def check_names(rows: list[dict], x: str, y: str, group: str) -> None:
    """Refuse an --x or --group that is not a flag the sweep sets, or a --y no finished point reports."""
    flags_set = sorted({k for r in rows for k in r["flags"]})
    for name, value in (("x", x), ("group", group)):
        if value and value not in flags_set:
            raise ValueError(f"--{name}={value} is not a flag this sweep varies or sets: {', '.join(flags_set)}")
    metrics = sorted({m for r in rows if r["status"] == "ok" for m in r["record"].get("metrics", {})})
    if metrics and y not in metrics:
        raise ValueError(f"--y={y} is not a metric of this sweep; its metrics: {', '.join(metrics[:40])}")


def summarise(rows: list[dict], x: str, y: str, group: str) -> tuple[list[dict], list[dict]]:
    """(one row per (group, x) with the median/min/max of y over its finished points that report
    it, the failed points)."""
    values = collections.defaultdict(list)
    failed = [r for r in rows if r["status"] != "ok"]
    for r in rows:
        metrics = r["record"].get("metrics", {}) if r["status"] == "ok" else {}
        if y in metrics and x in r["flags"]:
            values[(r["flags"].get(group, "") if group else "", r["flags"][x])].append(metrics[y])
    table = [{"group": g, "x": xv, "median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
             for (g, xv), v in sorted(values.items(), key=lambda kv: (str(kv[0][0]), _sortable(kv[0][1])))]
    return table, failed


def _sortable(v):
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def figure(table: list[dict], x: str, y: str, group: str):
    """The plot of the table: y's median (min-max bars) against x, a line per group."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for g in dict.fromkeys(r["group"] for r in table):
        rows = [r for r in table if r["group"] == g]
        xs = list(range(len(rows))) if not all(isinstance(r["x"], (int, float)) for r in rows) else [r["x"] for r in rows]
        ax.errorbar(xs, [r["median"] for r in rows], yerr=[[r["median"] - r["min"] for r in rows],
                                                           [r["max"] - r["median"] for r in rows]],
                    marker="o", capsize=3, label=f"{group}={g}" if group else None)
        if xs and not isinstance(rows[0]["x"], (int, float)):
            ax.set_xticks(xs, [str(r["x"]) for r in rows])
    if all(isinstance(r["x"], int) for r in table):  # whole-number flags: no ticks between them
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if group:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv):
    del argv
    if not (FLAGS.dir and FLAGS.x and FLAGS.y):
        raise ValueError("--dir, --x and --y are required")
    rows = latest_rows(os.path.join(FLAGS.dir, "results.jsonl"))
    check_names(rows, FLAGS.x, FLAGS.y, FLAGS.group)
    table, failed = summarise(rows, FLAGS.x, FLAGS.y, FLAGS.group)
    experiment = rows[0].get("experiment", "?")
    lines = [f"# {experiment}: {FLAGS.y} against {FLAGS.x}" + (f" by {FLAGS.group}" if FLAGS.group else ""), "",
             f"{len(rows) - len(failed)} points finished, {len(failed)} failed; median, min and max over repeats.", "",
             f"| {FLAGS.group or '-'} | {FLAGS.x} | {FLAGS.y} (median) | min | max | n |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['group']} | {r['x']} | {r['median']:.4g} | {r['min']:.4g} | {r['max']:.4g} | {r['n']} |" for r in table]
    if failed:
        lines += ["", "Failed points:", ""] + [f"- `{r['key']}` {r['flags']}: {r.get('error', '')}" for r in failed]
    report = os.path.join(FLAGS.dir, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {report}")
    if not table:
        return
    if importlib.util.find_spec("matplotlib") is None:
        print(f"no plot: it needs matplotlib: pip install 'jaxinfer[{common.EXTRAS['matplotlib']}]'")
        return
    png = os.path.join(FLAGS.dir, f"{FLAGS.y.replace('/', '_')}_vs_{FLAGS.x}.png")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (the optional [plots] extra)

    fig = figure(table, FLAGS.x, FLAGS.y, FLAGS.group)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {png}")


def cli() -> None:
    """The `jaxinfer-sweep-report` console script (the same as python -m jaxinfer.experiments.sweep_report)."""
    common.run(main)


if __name__ == "__main__":
    cli()
