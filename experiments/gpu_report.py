"""Turn the JSON files a GPU session wrote (benchmarks/gpu_session.sh, under $OUT) into one markdown
page of tables with the card, jax version and date of each run, and the targets of the GPU issue
computed from the runs that measure them: so a lent session spends its minutes measuring.

  python -m jaxinfer.experiments.gpu_report --dir=/path/to/out --out=benchmarks/results/gpu_2026-11-27.md

Every file is an experiment's record ({config, env, metrics} and optional `results` rows) or
bench_kernels' ({device, jax_version, date, results}); each becomes a section: where and how it ran,
its flat metrics, and its rows. The script's steps.tsv becomes the steps table (exit status and
seconds of each step, a failed one marked) and says whether the run was a rehearsal on the CPU,
which the page's title then says.
"""

from __future__ import annotations

import glob
import json
import os

from absl import flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("max_columns", 12, "Columns shown per rows table (the first ones of the rows' keys).")
for _name in ("out", "dir"):
    flags.declare_key_flag(_name)

# (measure, (file, metric) over (file, metric), the target)
RATIOS = [
    ("continuous / static throughput, skewed outputs", ("skewed_continuous", "throughput_tok_s"),
     ("skewed_static", "throughput_tok_s"), ">= 2x"),
    ("engine TPOT / bare jitted step, batch 1, overlap on", ("overhead_overlap-true", "engine_tpot_s"),
     ("overhead_overlap-true", "bare_step_s"), "<= 1.10x"),
    ("engine TPOT / bare jitted step, batch 1, overlap off", ("overhead_overlap-false", "engine_tpot_s"),
     ("overhead_overlap-false", "bare_step_s"), "(the control)"),
    ("speculative (synthetic, acceptance 0.8, k=5) / plain decode, TPOT speed-up",
     ("spec_synthetic", "synthetic/k=5/T=0/b=1/speedup"), None, ">= 2.5x"),
    ("speculative (a random EAGLE-3 head drafting, acceptance 0.8, k=5) / plain decode, TPOT speed-up",
     ("spec_synthetic", "eagle3:random/k=5/T=0/b=1/speedup"), None, "(the synthetic row less EAGLE-3's drafting)"),
    ("64 distinct LoRA adapters r16, batch 64 / base model, throughput", ("lora_64", "ratio"), None, ">= 0.8x"),
]  # a None denominator: the figure is already the ratio


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    return str(v)


def _env(record: dict) -> dict:
    env = record.get("env") or record.get("environment") or record
    return {k: env.get(k, "?") for k in ("device", "jax_version", "date", "command")}


def section(name: str, record: dict, max_columns: int) -> list[str]:
    env = _env(record)
    lines = [f"## {name}", "", f"{env['device']}, jax {env['jax_version']}, {env['date']}", "",
             f"`{env['command']}`", ""]
    metrics = {k: v for k, v in (record.get("metrics") or {}).items() if isinstance(v, (int, float))}
    if metrics:
        lines += ["| metric | value |", "| --- | ---: |"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
        lines.append("")
    rows = [r for r in record.get("results") or [] if isinstance(r, dict)]
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))))
        keys = keys[:max_columns]
        lines += ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
        lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
        lines.append("")
    return lines


def _value(records: dict[str, dict], name: str, key: str):
    """A record's figure: its flat metric, else its first row's (experiments that write rows only)."""
    record = records.get(name, {})
    rows = [r for r in record.get("results") or [] if isinstance(r, dict)]
    return (record.get("metrics") or {}).get(key, rows[0].get(key) if rows else None)


def targets(records: dict[str, dict]) -> list[str]:
    lines = ["## Targets measured in this session", "", "| measure | figure | target |", "| --- | ---: | --- |"]
    for label, (num_file, num), den, target in RATIOS:
        a = _value(records, num_file, num)
        b = 1.0 if den is None else _value(records, *den)
        if a and b:
            lines.append(f"| {label} | {a / b:.2f}x | {target} |")
    return lines + [""] if len(lines) > 4 else []


def steps(path: str) -> tuple[str, list[str]]:
    """The script's steps.tsv ("# mode\t<device|rehearsal>", then step, limit_s, exit, seconds, json
    rows) -> (mode, a table of the steps with a failed one marked)."""
    with open(path) as f:
        lines = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    mode = lines[0][1] if lines and lines[0][0] == "# mode" else "device"
    rows = [r for r in lines if r[0] not in ("# mode", "step") and len(r) >= 4]
    out = ["## Steps", "", "| step | limit (s) | exit | seconds |", "| --- | ---: | ---: | ---: |"]
    for name, limit, rc, seconds, *_ in rows:
        note = "" if rc == "0" else " (over its limit)" if rc == "124" else " (failed)"
        out.append(f"| {'tests' if name == '-' else name} | {limit} | {rc}{note} | {seconds} |")
    failed = sum(r[2] != "0" for r in rows)
    total = sum(int(r[3]) for r in rows if r[3].isdigit())
    out += ["", f"{len(rows)} steps, {failed} failed, {total} s in all.", ""]
    return mode, out


def main(argv):
    del argv
    if not (FLAGS.dir and os.path.isdir(FLAGS.dir)):
        raise ValueError(f"--dir={FLAGS.dir!r} is not a directory")
    paths = sorted(glob.glob(os.path.join(FLAGS.dir, "*.json")))
    if not paths:
        raise ValueError(f"--dir={FLAGS.dir}: no JSON files")
    records = {}
    for path in paths:
        with open(path) as f:
            try:
                records[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
    device = _env(next(iter(records.values())))["device"]
    tsv = os.path.join(FLAGS.dir, "steps.tsv")
    mode, step_lines = steps(tsv) if os.path.exists(tsv) else ("device", [])
    if mode == "rehearsal":
        lines = [f"# GPU session rehearsal on {device}", "",
                 ("A rehearsal (`REHEARSE=1 bash benchmarks/gpu_session.sh`): the session's steps on the CPU, the "
                  "kernels interpreted, a small shape for the 8B model. It shows that every step runs and writes its "
                  "JSON; its figures are not measurements."), ""]
    else:
        lines = [f"# GPU session on {device}", ""]
    lines += [(f"From {len(records)} files in {FLAGS.dir} (benchmarks/gpu_session.sh), by "
               "`python -m jaxinfer.experiments.gpu_report`."), ""]
    lines += step_lines + targets(records)
    for name, record in records.items():
        lines += section(name, record, FLAGS.max_columns)
    text = "\n".join(lines)
    print(text)
    if FLAGS.out:
        common.write_text(FLAGS.out, text)


if __name__ == "__main__":
    common.run(main)
