"""Tensor and expert parallel: the same model at each --tps degree (and, for a mixture of experts,
each --eps degree), through the engine. For each (tp, ep): the largest per-row logits error of one
full pass against tp = ep = 1, whether the greedy tokens equal its tokens,
the bytes each device holds (params and KV cache, measured from the arrays' shards), compile time,
and throughput (the median of --runs generate runs after warm-up, taken in rounds over the tps).

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m jaxinfer.experiments.bench_tp --tps=1,2,4
  python -m jaxinfer.experiments.bench_tp --model=random:llama3_8b --dtype=bfloat16 --tps=1,2   # on 2 GPUs
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m jaxinfer.experiments.bench_tp \
      --model=random:/path/to/moe/config.json --tps=1,2 --eps=1,4   # a mixture of experts' config.json

On fake CPU devices every "device" shares the same cores, so tp > 1 only adds the collectives'
cost: the figures there check correctness and memory, not speed.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import numpy as np
from absl import flags

import jaxinfer as ji
from jaxinfer import sharding

from . import common

FLAGS = flags.FLAGS
_TPS = flags.DEFINE_list("tps", ["1", "2", "4"], "Tensor-parallel degrees to run (each needs that many devices).")
_EPS = flags.DEFINE_list("eps", ["1"], "Expert-parallel degrees to run with each tp (a mixture of experts; tp x ep "
                         "devices each).")
# --tp and --ep are not among them: --tps and --eps set each run's.
for _name in ("model", "dtype", "seed", "out", "prompt_len", "max_tokens", "runs",
              *(f for f in common.ENGINE_FLAGS if f not in ("tp", "ep")), *common.SPEC_FLAGS):
    flags.declare_key_flag(_name)
PROMPT_LEN, MAX_TOKENS, RUNS = 16, 32, 3  # defaults of --prompt_len, --max_tokens, --runs


def _prompts(model, n: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(FLAGS.seed)
    return rng.integers(0, min(model.config.vocab_size, 256), size=(n, length)).tolist()


def build(model, tp: int, ep: int, prompts, sampling) -> tuple[ji.Engine, dict]:
    """An engine at this tp and ep, warmed up and run once: placement and compile time, bytes per
    device, its greedy tokens and one full pass's logits (for the comparison with tp = ep = 1)."""
    t0 = time.perf_counter()
    engine = ji.Engine(model, common.engine_config(tp=tp, ep=ep))
    place_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.warmup(max_prompt_len=len(prompts[0]), max_len=min(len(prompts[0]) + sampling.max_tokens, engine.max_seq_len))
    compile_s = time.perf_counter() - t0
    outs = engine.generate(prompts, sampling)
    placed = engine.runner.model
    return engine, {
        "tp": tp,
        "ep": ep,
        "devices": [str(d) for d in sharding.nbytes_per_device(engine.runner.cache)],
        "params_bytes_per_device": max(sharding.nbytes_per_device(placed.params).values()),
        "kv_cache_bytes_per_device": max(sharding.nbytes_per_device(engine.runner.cache).values()),
        "kv_heads_per_device": placed.config.num_kv_heads // tp,
        "place_s": place_s,
        "compile_s": compile_s,
        "tokens": [o.token_ids for o in outs],
        "logits": np.asarray(ji.forward_logits(placed, np.asarray(prompts[:2], np.int32)), np.float64),
    }


def main(argv) -> None:
    del argv
    degrees = {}
    for flag, values in (("tps", _TPS.value), ("eps", _EPS.value)):
        try:
            degrees[flag] = [int(t) for t in values]
        except ValueError:
            raise ValueError(f"--{flag}={','.join(values)}: not a list of integers") from None
        if not degrees[flag] or degrees[flag][0] != 1:
            raise ValueError(f"--{flag}={','.join(values)} must start with 1 (the reference)")
    meshes = [(tp, ep) for tp in degrees["tps"] for ep in degrees["eps"]]
    most = max(tp * ep for tp, ep in meshes)
    if most > jax.device_count():
        raise ValueError(f"--tps x --eps asks for {most} devices; {jax.device_count()} are present (on a CPU: "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={most})")
    model = common.load_bench_model(FLAGS.model, FLAGS.dtype)
    for tp, ep in meshes:
        sharding.check(model.config, tp, ep=ep)  # every degree refused up front, before anything compiles
    prompts = _prompts(model, FLAGS.max_batch, common.value_or("prompt_len", PROMPT_LEN))
    sampling = ji.SamplingParams(max_tokens=common.value_or("max_tokens", MAX_TOKENS), temperature=0.0,
                                 ignore_eos=True)
    engines, rows = [], []
    for tp, ep in meshes:
        engine, row = build(model, tp, ep, prompts, sampling)
        engines.append(engine)
        rows.append(row)
    reference = rows[0]
    for row in rows[1:]:
        err = np.linalg.norm(row["logits"] - reference["logits"], axis=-1) / np.linalg.norm(reference["logits"],
                                                                                            axis=-1)
        row["max_row_error_vs_tp1"] = float(err.max())
        row["tokens_equal_tp1"] = row["tokens"] == reference["tokens"]
    # Timed runs in rounds, one run of every tp per round, so drift in the machine's load hits all alike.
    for row in rows:
        row["throughput_runs_tok_s"] = []
    for _ in range(common.value_or("runs", RUNS)):
        for engine, row in zip(engines, rows):
            engine.generate(prompts, sampling)
            row["throughput_runs_tok_s"].append(engine.last_run["throughput_tok_s"])
    for row in rows:
        row["throughput_tok_s"] = statistics.median(row["throughput_runs_tok_s"])
    cores = os.cpu_count()
    print(f"{model.name or FLAGS.model}: {model.config.num_params() / 1e6:.2f}M params, {FLAGS.dtype}, "
          f"{len(prompts)} prompts x {len(prompts[0])} tokens, {rows[0]['tokens'] and len(rows[0]['tokens'][0])} "
          f"generated each | {jax.device_count()} {jax.devices()[0].device_kind} devices, {cores} cores")
    print(f"{'tp':>3} {'ep':>3} {'params MB/dev':>14} {'KV MB/dev':>10} {'compile s':>10} {'tok/s':>8} {'min-max':>11} "
          f"{'row err':>9} {'tokens':>7}")
    for r in rows:
        err = f"{r['max_row_error_vs_tp1']:.1e}" if "max_row_error_vs_tp1" in r else "-"
        same = "" if r is reference else ("equal" if r["tokens_equal_tp1"] else "DIFFER")
        spread = f"{min(r['throughput_runs_tok_s']):.0f}-{max(r['throughput_runs_tok_s']):.0f}"
        print(f"{r['tp']:>3} {r['ep']:>3} {r['params_bytes_per_device'] / 1e6:>14.2f} {r['kv_cache_bytes_per_device'] / 1e6:>10.2f} "
              f"{r['compile_s']:>10.1f} {r['throughput_tok_s']:>8.1f} {spread:>11} {err:>9} {same:>7}")
    for r in rows:
        del r["logits"]
    if FLAGS.out:
        metrics = {f"tp{r['tp']}" + (f"_ep{r['ep']}" if r["ep"] > 1 else ""): {k: v for k, v in r.items() if not isinstance(v, list)} for r in rows}
        common.write_json(FLAGS.out, common.record(__name__, metrics, rows=rows))


if __name__ == "__main__":
    common.run(main)
