"""Drafter quality against training data: the EAGLE-3 paper's scaling figure, from recorded runs.

  python -m jaxinfer.experiments.drafter_scaling --dir=benchmarks/results/speculative \
      --out=benchmarks/results/speculative/smollm2_scaling.json --plot=benchmarks/results/speculative/smollm2_scaling.png

Reads every JSON in --dir: train_drafter's records (`heldout_agreement`, the data size, the steps,
the command and its --out_dir) and spec_decode's (`results`, one row per method and k). A
spec_decode row whose method names a drafter folder (`eagle3:/path`, `eagle3_tree:/path`) is joined
to the training record that wrote that folder. For each drafter method (EAGLE-3's with the layers it
fuses) and shape (chain or tree) it
tabulates tokens per target pass at --scaling_k (greedy, batch 1) against the training tokens, and
fits tokens per pass = a + b * log10(tokens) over the best-trained head of each data size (the one
with the most steps; several steps on one data size are epochs, not data). --levels: where that fit
reaches each of these tokens per pass, in training tokens (an extrapolation: the fit is two to four
points, and steps and data grow together in them). With matplotlib, --plot draws tokens per pass and
the held-out first-guess agreement against the training tokens.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

import numpy as np
from absl import flags

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("scaling_k", 5, "Draft length whose tokens per target pass are read.")
flags.DEFINE_string("levels", "2.5,3.0", "Tokens per pass whose training tokens the fit is solved for.")
for _name in ("dir", "out", "plot", "table"):
    flags.declare_key_flag(_name)


def records(folder: str) -> list[tuple[str, dict]]:
    """(file name, object) of each JSON object in folder (other JSON values are skipped)."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            try:
                rec = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"--dir: {path} is not JSON ({e.msg})") from None
        if isinstance(rec, dict):
            out.append((os.path.basename(path), rec))
    return out


def training_records(found: list[tuple[str, dict]]) -> dict[str, dict]:
    """Drafter folder (the record's --out_dir, normalised) -> train_drafter's record."""
    out = {}
    for name, rec in found:
        out_dir = re.search(r"--out_dir=(\S+)", str(rec.get("command", "")))
        if out_dir and "heldout_agreement" in rec:
            out[os.path.normpath(out_dir.group(1))] = {**rec, "file": name}
    return out


def data_tokens(rec: dict) -> int:
    """Self-distilled tokens a training record learned from (older records: sequences x seq_len)."""
    return int(rec.get("distill_tokens") or rec["self_distill"] * rec["seq_len"])


def joined_rows(folder: str, k: int) -> list[dict]:
    """One row per spec_decode measurement at draft length k, greedy, batch 1, of a recorded head."""
    found = records(folder)
    heads = training_records(found)
    rows = []
    for name, rec in found:
        for r in rec.get("results", []):
            method, _, draft = str(r.get("method", "")).partition(":")
            head = heads.get(os.path.normpath(draft)) if draft else None
            if head is None or r.get("k") != k or r.get("temperature") != 0 or r.get("batch") != 1:
                continue
            tokens = data_tokens(head)
            rows.append({
                "method": head["method"] + (f" {','.join(map(str, head['aux_layers']))}" if head.get("aux_layers") else ""),
                "shape": "tree" if method.endswith("_tree") else "chain",
                "data_tokens": tokens, "steps": head["steps"],
                "epochs": round(head["steps"] * head["batch"] * head["seq_len"] / tokens, 2),
                "tokens_per_pass": r["tokens_per_pass"], "speedup": r.get("speedup"),
                "agreement_first": head["heldout_agreement"][0], "training": head["file"],
                "measured": name})
    return rows


def fits(rows: list[dict], levels: list[float]) -> list[dict]:
    """Per (method, shape): the least-squares line through the best-trained head of each data size,
    and the training tokens where it reaches each level (None where it never does)."""
    out = []
    for key in sorted({(r["method"], r["shape"]) for r in rows}):
        best = {}
        for r in rows:
            if (r["method"], r["shape"]) == key:
                held = best.get(r["data_tokens"])
                if held is None or r["steps"] > held["steps"]:
                    best[r["data_tokens"]] = r
        if len(best) < 2:
            continue
        slope, icpt = (float(v) for v in np.polyfit(np.log10(list(best)), [r["tokens_per_pass"] for r in best.values()], 1))
        reach = {f"{v:g}": (10 ** ((v - icpt) / slope) if slope > 0 else None) for v in levels}
        out.append({"method": key[0], "shape": key[1], "points": len(best), "intercept": icpt,
                    "per_decade": slope, "tokens_to_reach": reach})
    return out


def figure(rows: list[dict], lines: list[dict], levels: list[float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_agree) = plt.subplots(1, 2, figsize=(10, 3.8))
    xmax = max([r["data_tokens"] for r in rows] + [n for f in lines for n in f["tokens_to_reach"].values() if n])
    for key in sorted({(r["method"], r["shape"]) for r in rows}):
        group = sorted((r for r in rows if (r["method"], r["shape"]) == key), key=lambda r: r["data_tokens"])
        line, = ax.plot([r["data_tokens"] for r in group], [r["tokens_per_pass"] for r in group], "o",
                        label=f"{key[0]} {key[1]}")
        for r in group:
            ax.annotate(f"{r['epochs']:g} ep", (r["data_tokens"], r["tokens_per_pass"]), fontsize=6,
                        xytext=(3, -8), textcoords="offset points")
        for f in lines:
            if (f["method"], f["shape"]) == key:
                xs = [min(r["data_tokens"] for r in group), xmax]
                ax.plot(xs, [f["intercept"] + f["per_decade"] * math.log10(x) for x in xs], "--",
                        color=line.get_color(), linewidth=0.8)
        if key[1] == "chain":
            ax_agree.plot([r["data_tokens"] for r in group], [r["agreement_first"] for r in group], "o",
                          label=key[0])
    for v in levels:
        ax.axhline(v, color="grey", linewidth=0.6, linestyle=":")
    ax.set(xscale="log", xlabel="self-distilled training tokens", ylabel=f"tokens per target pass (k={FLAGS.scaling_k})",
           title="greedy, batch 1; dashed: log-linear fit")
    ax_agree.set(xscale="log", xlabel="self-distilled training tokens", ylabel="held-out first-guess agreement")
    ax.legend(fontsize=7)
    ax_agree.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv):
    del argv
    if not FLAGS.dir:
        raise ValueError("--dir is required: a folder of train_drafter and spec_decode JSON records")
    try:
        levels = [float(v) for v in FLAGS.levels.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--levels={FLAGS.levels!r} must be numbers separated by commas") from None
    if FLAGS.scaling_k < 1:
        raise ValueError(f"--scaling_k={FLAGS.scaling_k} must be >= 1")
    if FLAGS.plot:
        common.require("--plot", "matplotlib")
    rows = joined_rows(FLAGS.dir, FLAGS.scaling_k)
    if not rows:
        raise ValueError(f"--dir={FLAGS.dir}: no spec_decode result at k={FLAGS.scaling_k} (greedy, batch 1) names "
                         "a drafter folder that a train_drafter record there wrote")
    lines = fits(rows, levels)
    table = ["| method | shape | data tokens | steps | epochs | tok/pass | speedup | first-guess agreement | measured |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    table += [f"| {r['method']} | {r['shape']} | {r['data_tokens']:,} | {r['steps']} | {r['epochs']:g} | "
              f"{r['tokens_per_pass']:.2f} | {r['speedup'] or 0:.2f}x | {r['agreement_first']:.3f} | {r['measured']} |"
              for r in sorted(rows, key=lambda r: (r["method"], r["shape"], r["data_tokens"], r["steps"]))]
    table += ["", "| method | shape | points | tok/pass per decade of data | " +
              " | ".join(f"tokens for {v:g}" for v in levels) + " |", "| --- | --- | ---: | ---: |" + " ---: |" * len(levels)]
    table += [f"| {f['method']} | {f['shape']} | {f['points']} | {f['per_decade']:+.2f} | " +
              " | ".join("never" if n is None else f"{n:.3g}" for n in f["tokens_to_reach"].values()) + " |"
              for f in lines]
    print("\n".join(table))
    if FLAGS.table:
        common.write_text(FLAGS.table, "\n".join(table))
    if FLAGS.out:
        common.write_json(FLAGS.out, common.record(__name__, {}, rows=rows, fits=lines))
    if FLAGS.plot:
        import matplotlib.pyplot as plt  # noqa: PLC0415  (the optional [plots] extra)

        fig = figure(rows, lines, levels)
        fig.savefig(FLAGS.plot, dpi=120)
        plt.close(fig)
        print(f"wrote {FLAGS.plot}")


def cli() -> None:
    common.run(main)


if __name__ == "__main__":
    cli()
