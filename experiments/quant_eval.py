"""Quantisation, measured: quality, bytes and decode speed per weight scheme and KV-cache dtype.

  python -m experiments.quant_eval                                    # the shipped tiny model
  python -m experiments.quant_eval --schemes=dense,int8,int4-rtn-g32,int4-awq-g32,int4-gptq-g32 \
      --out=/tmp/quant.json --table=/tmp/quant.md
  python -m experiments.quant_eval --schemes=dense,int4-gptq-g32 --kv_dtype=int8   # weights and KV cache

For each scheme (named as in jaxinfer.quant.spec: dense, int8, int4-{rtn,awq,gptq}-g<N>[-asym][-act]):
held-out bits per byte, greedy next-token agreement with the dense model on the same held-out text
(teacher forcing), bytes of the quantised projection weights and of the whole model, the time
quantisation took (AWQ and GPTQ include collecting their calibration activations), and batch-1
decode tokens/s through the engine. With --kv_dtype=int8|fp8 the model reads keys and values as a
quantised KV cache holds them (the dense reference keeps a float cache). Calibration text is
held-out text that the evaluation windows do not contain.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from absl import flags
from tqdm.auto import tqdm

import jaxinfer as ji
from jaxinfer import data, quant
from jaxinfer.quant.spec import scheme_from_name

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("schemes", ["dense", "int8", "int4-rtn-g32", "int4-awq-g32", "int4-gptq-g32", "int4-rtn-g128",
                              "int4-awq-g128", "int4-gptq-g128", "int4-gptq-g128-act", "int4-rtn-pc", "int4-awq-pc",
                              "int4-gptq-pc"], "Weight schemes to compare (first: the reference).")
flags.DEFINE_integer("calib_sequences", 256, "Calibration sequences (AWQ, GPTQ).")
flags.DEFINE_integer("calib_len", 256, "Tokens per calibration sequence.")
flags.DEFINE_integer("decode_tokens", 128, "Tokens to decode when timing batch-1 decode (0: skip).")
for _name in ("model", "windows", "seq_len", "matmul", "out", "kv_dtype", "tp"):
    flags.declare_key_flag(_name)
flags.DEFINE_string("table", "", "Write a markdown table here.")


def projection_bytes(params) -> int:
    layers = params["layers"]
    return sum(int(np.prod(layers[n].shape)) * layers[n].dtype.itemsize if not isinstance(layers[n], quant.QuantizedWeight)
               else layers[n].nbytes for n in quant.LINEAR_WEIGHTS)


def total_bytes(params) -> int:
    leaves = jax.tree.leaves(params)
    return sum(x.size * x.dtype.itemsize for x in leaves)


def decode_speed(model, num_tokens: int, runs: int = 5) -> float:
    """Batch-1 greedy decode tokens/s through the engine (its KV cache in --kv_dtype): the median of
    `runs` runs after one that compiles."""
    sp = ji.SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    prompt = "def main(argv):\n"
    config = ji.EngineConfig(max_batch=1, matmul=FLAGS.matmul, kv_dtype=FLAGS.kv_dtype or None, tp=FLAGS.tp)
    speeds = []
    for _ in range(runs + 1):
        out = ji.Engine(model, config).generate([prompt], sp)[0]
        m = out.metrics
        speeds.append((len(out.token_ids) - 1) / (m["latency_s"] - m["ttft_s"]))
    return float(np.median(speeds[1:]))


def load_dense(name: str):
    """The model with float projections, and what they came from: a checkpoint whose projections
    load packed (GGUF blocks, AWQ/GPTQ) is dequantised first, so every scheme re-quantises from
    the dequantised weights (not from the original float model, which that checkpoint does not carry)."""
    model = ji.load_model(name)
    packed = any(isinstance(w, quant.QuantizedWeight) for w in model.params["layers"].values())
    if not packed:
        return model, "the checkpoint's float weights"
    return dataclasses.replace(model, params=quant.dequantize_params(model.params)), "dequantised packed weights"


def evaluate(names: list[str]) -> list[dict]:
    dense, source = load_dense(FLAGS.model)
    print(f"{FLAGS.model}: quantising from {source}")
    windows = data.heldout_windows(dense, FLAGS.seq_len, FLAGS.windows)
    calibration = dict(num_sequences=FLAGS.calib_sequences, seq_len=FLAGS.calib_len)
    rows = []
    for name in tqdm(names, desc="schemes", unit="scheme"):
        scheme = scheme_from_name(name)
        t0 = time.perf_counter()
        if scheme is None:
            model = dense
        elif scheme.method == "rtn":
            model = quant.quantize_model(dense, scheme)
        else:
            model = quant.quantize_model(dense, scheme, progress=False, **calibration)
        jax.block_until_ready(model.params)
        quantize_s = time.perf_counter() - t0
        rows.append({
            "scheme": name,
            "bits_per_byte": data.bits_per_byte(model, windows, kv_dtype=FLAGS.kv_dtype or None),
            "greedy_agreement": data.greedy_agreement(model, dense, windows, kv_dtype=FLAGS.kv_dtype or None),
            "projection_bytes": projection_bytes(model.params),
            "model_bytes": total_bytes(model.params),
            "quantize_s": quantize_s,
            "decode_tok_s": decode_speed(model, FLAGS.decode_tokens) if FLAGS.decode_tokens else None,
        })
    base = rows[0]
    for r in rows:
        r["bits_per_byte_change"] = r["bits_per_byte"] / base["bits_per_byte"] - 1.0
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| scheme | bits/byte | vs first | greedy agreement | projection MiB | model MiB | quantise s | decode tok/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        tok_s = f"{r['decode_tok_s']:,.0f}" if r["decode_tok_s"] else "-"
        lines.append(f"| {r['scheme']} | {r['bits_per_byte']:.4f} | {r['bits_per_byte_change']:+.2%} | "
                     f"{r['greedy_agreement']:.3f} | {r['projection_bytes'] / 2**20:.2f} | {r['model_bytes'] / 2**20:.2f} | "
                     f"{r['quantize_s']:.1f} | {tok_s} |")
    return "\n".join(lines)


def main(argv):
    del argv
    for name in FLAGS.schemes:
        scheme_from_name(name)  # fail on a bad name before any work
    rows = evaluate(FLAGS.schemes)
    metrics = {r["scheme"]: r for r in rows} | (rows[0] if len(rows) == 1 else {})  # one scheme: unprefixed too
    record = common.record(__name__, metrics, results=rows)
    md = table(rows)
    print(f"\n{FLAGS.model} on {record['env']['device']}, {FLAGS.windows} held-out windows of {FLAGS.seq_len}")
    print(md)
    if FLAGS.out:
        common.write_json(FLAGS.out, record)
    if FLAGS.table:
        common.write_text(FLAGS.table, md)


if __name__ == "__main__":
    common.run(main)
