"""Task accuracy (lm-evaluation-harness) of one model under one engine configuration, beside its
held-out bits per byte and the speed of the evaluation; JSON plus a markdown table. A sweep point.

  python -m jaxinfer.experiments.eval_tasks --model=smollm2-135m --quant=int4-gptq-g128 --kv_dtype=int8 \\
      --tasks=jaxinfer_pydoc_cloze --out=runs/eval/gptq.json --paired_with=runs/eval/dense.json
  python -m jaxinfer.experiments.sweep --grid=eval --out=runs/eval_sweep   # quant x kv_dtype x spec on tiny

Tasks are lm-eval task names: the shipped ones of configs/tasks/ (jaxinfer_pydoc_cloze: 400 questions
on the Python documentation's prose; jaxinfer_arith_mc / jaxinfer_arith_gen: 40 arithmetic questions)
or any task lm-eval knows (those read their data from the HF hub, which this run does not fetch).
The model runs as lm-eval's `jaxinfer` model (jaxinfer.evaluation.JaxInferLM) under --quant and the
engine and speculative flags; every metric comes with lm-eval's standard error.

--paired_with names another run's JSON (usually the dense model's, same tasks and --limit): the paired
differences on the documents both scored are added. A 135M model's accuracy on a few hundred
questions moves by a few points between equally good models (its stderr says so); the paired
difference of the same questions (mean and stderr of the per-question difference) and the shift of
each choice's log-likelihood see much smaller changes, which is what quantisation makes.
Metrics (flat, for sweeps): TASK/METRIC and TASK/METRIC_stderr, with a baseline TASK/METRIC_diff and
TASK/METRIC_diff_stderr, and for multiple-choice tasks TASK/ll_shift (mean change of the right
choice's log-likelihood), TASK/ll_abs_shift (mean |change| over every choice) and TASK/same_answer
(the fraction of questions whose highest-likelihood choice is unchanged); bits_per_byte (--windows
held-out windows of --seq_len tokens; --windows=0: not measured), eval_s (the evaluation's wall time),
prefill_tok_s and decode_tok_s (the engine's tokens over eval_s).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
from absl import flags

from jaxinfer import data

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("tasks", ["jaxinfer_pydoc_cloze"], "lm-eval tasks (the shipped configs/tasks/ ones, or lm-eval's).")
flags.DEFINE_string("quant", "dense", "Weight scheme (jaxinfer.quant.spec: dense, int8, int4-gptq-g128, "
                    "w8a8-int8-smooth, w8a8-fp8, ...); calibrated schemes draw --calib_sequences windows of "
                    "--calib_len held-out tokens with --seed.")
flags.DEFINE_integer("limit", 0, "Documents per task (0: all).")
flags.DEFINE_integer("num_fewshot", 0, "Few-shot examples per prompt.")
flags.DEFINE_string("paired_with", "", "Another eval_tasks JSON (the baseline): add paired differences against it.")
for _name in ("model", "dtype", "seed", "calib_sequences", "calib_len", "out", "table", "windows", "seq_len",
              *common.ENGINE_FLAGS, "spec", "spec_tokens", "spec_draft"):
    flags.declare_key_flag(_name)

MC_METRICS = ("acc", "acc_norm")


def model_args() -> dict:
    """The `jaxinfer` model's arguments from the flags (jaxinfer.evaluation.options)."""
    return {"model": FLAGS.model, "dtype": FLAGS.dtype, "quant": FLAGS.quant, "seed": FLAGS.seed,
            "calib_sequences": FLAGS.calib_sequences, "calib_len": FLAGS.calib_len, "spec": FLAGS.spec,
            "spec_tokens": FLAGS.spec_tokens, "spec_draft": FLAGS.spec_draft or None, **common.engine_values()}


def samples_of(task_samples: list[dict]) -> list[dict]:
    """What a paired comparison needs of lm-eval's logged samples, per document: its id, the
    right answer, each choice's log-likelihood (multiple choice) and each metric's value."""
    out = []
    for s in task_samples:
        row = {"doc_id": int(s["doc_id"]), "target": s["target"] if isinstance(s["target"], int) else str(s["target"]),
               "metrics": {m: float(s[m]) for m in s["metrics"]}}
        if s["resps"] and isinstance(s["resps"][0][0], (tuple, list)):  # loglikelihood: [(logprob, is_greedy)]
            row["loglikelihoods"] = [float(r[0][0]) for r in s["resps"]]
        out.append(row)
    return sorted(out, key=lambda r: r["doc_id"])


def paired(mine: list[dict], base: list[dict]) -> dict:
    """Paired differences of this run's samples against the baseline's, on the documents both have."""
    by_id = {r["doc_id"]: r for r in base}
    pairs = [(r, by_id[r["doc_id"]]) for r in mine if r["doc_id"] in by_id]
    if not pairs:
        raise ValueError("--paired_with: it scored none of this run's documents (same tasks and --limit?)")
    out = {"paired_docs": len(pairs)}
    for metric in pairs[0][0]["metrics"]:
        d = np.array([a["metrics"][metric] - b["metrics"][metric] for a, b in pairs])
        out[f"{metric}_diff"] = float(d.mean())
        out[f"{metric}_diff_stderr"] = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    if "loglikelihoods" in pairs[0][0]:
        a = [np.array(x["loglikelihoods"]) for x, _ in pairs]
        b = [np.array(y["loglikelihoods"]) for _, y in pairs]
        out["ll_shift"] = float(np.mean([x[r["target"]] - y[r["target"]] for (r, _), x, y in zip(pairs, a, b)]))
        out["ll_abs_shift"] = float(np.mean(np.concatenate([np.abs(x - y) for x, y in zip(a, b)])))
        out["same_answer"] = float(np.mean([np.argmax(x) == np.argmax(y) for x, y in zip(a, b)]))
    return out


def evaluate(lm, manager) -> tuple[dict, dict, float]:
    """lm-eval's results and this run's samples per task (tasks found by `manager`, an lm-eval
    TaskManager), and the evaluation's wall time."""
    import lm_eval

    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=list(FLAGS.tasks), num_fewshot=FLAGS.num_fewshot or None,
                                      task_manager=manager, limit=FLAGS.limit or None,
                                      log_samples=True, random_seed=FLAGS.seed, numpy_random_seed=FLAGS.seed,
                                      torch_random_seed=FLAGS.seed, fewshot_random_seed=FLAGS.seed)
    wall = time.perf_counter() - start
    return results["results"], {t: samples_of(s) for t, s in results["samples"].items()}, wall


def task_metrics(results: dict) -> dict:
    """lm-eval's per-task results as flat TASK/METRIC (filter names dropped: one filter per metric)."""
    metrics = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                name = key.split(",")[0]
                metrics[f"{task}/{name}"] = float(value) if not math.isnan(value) else None
    return metrics


def table(record: dict) -> str:
    m = record["metrics"]
    lines = [f"{FLAGS.model}, quant={FLAGS.quant}, kv_dtype={FLAGS.kv_dtype or 'model'}, spec={FLAGS.spec}: "
             f"bits/byte {m['bits_per_byte']:.4f}" if m.get("bits_per_byte") is not None else FLAGS.model, "",
             "| task | metric | value | stderr | vs baseline (paired) |", "| --- | --- | ---: | ---: | ---: |"]
    for task in record["samples"]:
        names = sorted({k.split("/")[1] for k in m if k.startswith(task + "/")} - {"paired_docs", "ll_shift",
                       "ll_abs_shift", "same_answer"})
        for name in (n for n in names if not n.endswith(("_stderr", "_diff"))):
            diff = m.get(f"{task}/{name}_diff")
            paired_text = f"{diff:+.4f} ± {m[f'{task}/{name}_diff_stderr']:.4f}" if diff is not None else "-"
            lines.append(f"| {task} | {name} | {m[f'{task}/{name}']:.4f} | {m.get(f'{task}/{name}_stderr') or 0:.4f} | "
                         f"{paired_text} |")
        if f"{task}/ll_shift" in m:
            lines.append(f"| {task} | log-likelihood shift (right choice; mean abs, all) | {m[f'{task}/ll_shift']:+.4f} | "
                         f"- | {m[f'{task}/ll_abs_shift']:.4f} |")
            lines.append(f"| {task} | same answer as baseline | {m[f'{task}/same_answer']:.4f} | - | - |")
    lines.append(f"\nevaluation {m['eval_s']:.1f} s; prefill {m['prefill_tok_s']:,.0f} tok/s, "
                 f"decode {m['decode_tok_s']:,.0f} tok/s")
    return "\n".join(lines)


def check_flags() -> None:
    common.require("eval_tasks", "lm_eval")
    from jaxinfer.evaluation import check_options

    if not FLAGS.tasks:
        raise ValueError("--tasks is empty: name at least one lm-eval task")
    for name in ("limit", "num_fewshot", "windows"):
        if FLAGS[name].value < 0:
            raise ValueError(f"--{name}={FLAGS[name].value} must be >= 0")
    if FLAGS.windows and FLAGS.seq_len < 1:
        raise ValueError(f"--seq_len={FLAGS.seq_len} must be >= 1")
    common.check_draft(FLAGS.spec, FLAGS.spec_draft, "--spec_draft")
    try:
        check_options(model_args())
    except ValueError as e:
        raise ValueError(f"--{e!s}") from None
    if FLAGS.paired_with:
        common.check_in(FLAGS.paired_with, "paired_with")


def main(argv):
    check_flags()
    from lm_eval.tasks import TaskManager

    from jaxinfer.evaluation import TASKS_DIR, JaxInferLM

    manager = TaskManager(include_path=TASKS_DIR)
    unknown = sorted(set(FLAGS.tasks) - set(manager.all_tasks))
    if unknown:
        raise ValueError(f"--tasks: {', '.join(unknown)} is not a task lm-eval knows (with configs/tasks/)")
    baseline = None
    if FLAGS.paired_with:
        with open(FLAGS.paired_with) as f:
            baseline = json.load(f)
    lm = JaxInferLM(**model_args())
    before = lm.engine.stats  # a snapshot
    results, samples, wall = evaluate(lm, manager)
    after = lm.engine.stats
    metrics = task_metrics(results)
    metrics.update(eval_s=wall, prefill_tok_s=(after["prefill_tokens"] - before["prefill_tokens"]) / wall,
                   decode_tok_s=(after["decode_tokens"] - before["decode_tokens"]) / wall)
    if baseline is not None:
        for task, rows in samples.items():
            if task not in baseline.get("samples", {}):
                raise ValueError(f"--paired_with: {FLAGS.paired_with} has no samples of task {task}")
            metrics.update({f"{task}/{k}": v for k, v in paired(rows, baseline["samples"][task]).items()})
    metrics["bits_per_byte"] = None
    if FLAGS.windows:
        windows = data.heldout_windows(lm.model, FLAGS.seq_len, FLAGS.windows)
        metrics["bits_per_byte"] = data.bits_per_byte(lm.model, windows, kv_dtype=FLAGS.kv_dtype or None)
    record = common.record(__name__, metrics, samples=samples, model_args=lm.options)
    md = table(record)
    print(md)
    if FLAGS.out:
        common.write_json(FLAGS.out, record)
    if FLAGS.table:
        common.write_text(FLAGS.table, md)


def cli() -> None:
    common.run(main)


if __name__ == "__main__":
    cli()
