"""Quantisation, measured: quality, bytes and decode speed per weight scheme and KV-cache dtype.

  python -m jaxinfer.experiments.quant_eval                                    # the shipped tiny model
  python -m jaxinfer.experiments.quant_eval --schemes=dense,int8,int4-rtn-g32,int4-awq-g32,int4-gptq-g32 \
      --out=/tmp/quant.json --table=/tmp/quant.md
  python -m jaxinfer.experiments.quant_eval --schemes=dense,int4-gptq-g32 --kv_dtype=int8   # weights and KV cache

  python -m jaxinfer.experiments.quant_eval --schemes=dense,w8a8-int8-naive,w8a8-int8-smooth,w8a8-fp8,w8a8-fp8-static,\
nvfp4-sim,mxfp4-sim,nvfp4-sim-a4,w4a8-sim,w4a16-fp8scale-sim --smooth_alpha=0.5            # W8A8, simulated

For each scheme (named as in jaxinfer.quant.spec: dense, int8, int4-{rtn,awq,gptq}-g<N>[-asym][-act],
w8a8-int8-{naive,smooth}, w8a8-fp8[-static][-pt], {nvfp4,mxfp4}-sim[-a8|-a4], w4a8-sim, w4a16-fp8scale-sim):
held-out bits per byte, greedy next-token agreement with the dense model on the same held-out text
(teacher forcing), bytes of the quantised projection weights and of the whole model, the time
quantisation took (AWQ, GPTQ, SmoothQuant and static FP8 include collecting their calibration
activations), and batch-1 decode tokens/s through the engine. Simulated formats (fake-quant) report
the bytes their format would store (marked nominal) and no decode speed (they run dense matmuls).
With --kv_dtype=int8|fp8 the model reads keys and values as a quantised KV cache holds them (the
dense reference keeps a float cache). Calibration text is held-out text that the evaluation
windows do not contain. --outlier=100 gives the model a 100x activation outlier channel first (the
float function unchanged), the case SmoothQuant is for. The run record says which FP8 GEMM ran
(`fp8_gemm`): bits per byte and agreement always through the XLA reference numerics
(float8_e4m3fn values cast to float32); decode timing with --matmul=pallas (or auto on a GPU)
through the Pallas kernel on a card with FP8 tensor cores (sm_89+), interpreted on a CPU, and
through the XLA numerics on older cards.
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
from jaxinfer.models import decoder as model_lib
from jaxinfer.models import matmul
from jaxinfer.quant import w8a8
from jaxinfer.quant.spec import SimScheme, W8A8Scheme, scheme_from_name

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("schemes", ["dense", "int8", "int4-rtn-g32", "int4-awq-g32", "int4-gptq-g32", "int4-rtn-g128",
                              "int4-awq-g128", "int4-gptq-g128", "int4-gptq-g128-act", "int4-rtn-pc", "int4-awq-pc",
                              "int4-gptq-pc"], "Weight schemes to compare (first: the reference).")
flags.DEFINE_integer("decode_tokens", 128, "Tokens to decode when timing batch-1 decode (0: skip).")
flags.DEFINE_float("outlier", 0.0, "Make hidden channel 5 this many times larger at the q/k/v and gate/up inputs "
                   "before quantising (a float-exact change, quant.w8a8.inject_outlier; 0: none): the activation "
                   "outlier SmoothQuant is for.")
flags.DEFINE_float("smooth_alpha", 0.5, "SmoothQuant's migration strength for w8a8-int8-smooth names without an "
                   "-a<alpha> suffix (a suffix wins).")
for _name in ("model", "windows", "seq_len", "matmul", "out", "kv_dtype", "tp", "table", "calib_sequences",
              "calib_len"):
    flags.declare_key_flag(_name)


OUTLIER_CHANNEL = 5


def projection_bytes(params) -> int:
    """Bytes of the projections as stored (a simulated format: as its format would store them)."""
    layers = params["layers"]
    return sum(layers[n].nbytes if isinstance(layers[n], quant.PACKED) else layers[n].size * layers[n].dtype.itemsize
               for n in quant.LINEAR_WEIGHTS)


def total_bytes(params) -> int:
    """projection_bytes plus every other parameter."""
    rest = {**params, "layers": {k: v for k, v in params["layers"].items() if k not in quant.LINEAR_WEIGHTS}}
    return projection_bytes(params) + sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(rest))


def resolve(name: str):
    """The scheme a name stands for, with --smooth_alpha for a smooth name that gives no alpha."""
    scheme = scheme_from_name(name)
    if isinstance(scheme, W8A8Scheme) and scheme.smooth_alpha is not None and "-a" not in name.split("smooth")[1]:
        scheme = dataclasses.replace(scheme, smooth_alpha=FLAGS.smooth_alpha)
    return scheme


def fp8_gemm(names: list[str]) -> str | None:
    """Which FP8 GEMM this run's fp8 schemes ran through (None: no fp8 scheme). The quality figures
    always take the XLA path (jaxinfer.data); decode timing takes --matmul ("auto": pallas on a GPU)."""
    if not any(isinstance(s, W8A8Scheme) and s.dtype == "fp8" for s in map(scheme_from_name, names)):
        return None
    reference = "xla reference (float8_e4m3fn values cast to float32)"
    decode = reference if model_lib.auto_impl(FLAGS.matmul) == "xla" else matmul.fp8_gemm_path()
    return f"quality: {reference}; decode: {decode}"


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
    if FLAGS.outlier:
        dense = w8a8.inject_outlier(dense, OUTLIER_CHANNEL, FLAGS.outlier)
        source += f", hidden channel {OUTLIER_CHANNEL} made {FLAGS.outlier:g}x larger at the q/k/v and gate/up inputs"
    print(f"{FLAGS.model}: quantising from {source}")
    windows = data.heldout_windows(dense, FLAGS.seq_len, FLAGS.windows)
    calibration = dict(num_sequences=FLAGS.calib_sequences, seq_len=FLAGS.calib_len)
    rows = []
    for name in tqdm(names, desc="schemes", unit="scheme"):
        scheme = resolve(name)
        t0 = time.perf_counter()
        if scheme is None:
            model = dense
        elif quant.needs_calibration(scheme):
            model = quant.quantize_model(dense, scheme, progress=False, **calibration)
        else:
            model = quant.quantize_model(dense, scheme)
        jax.block_until_ready(model.params)
        quantize_s = time.perf_counter() - t0
        simulated = isinstance(scheme, SimScheme)
        rows.append({
            "scheme": scheme.name if isinstance(scheme, W8A8Scheme) else name,
            "bits_per_byte": data.bits_per_byte(model, windows, kv_dtype=FLAGS.kv_dtype or None),
            "greedy_agreement": data.greedy_agreement(model, dense, windows, kv_dtype=FLAGS.kv_dtype or None),
            "projection_bytes": projection_bytes(model.params),
            "model_bytes": total_bytes(model.params),
            "bytes_nominal": simulated,
            "quantize_s": quantize_s,
            "decode_tok_s": decode_speed(model, FLAGS.decode_tokens) if FLAGS.decode_tokens and not simulated else None,
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
        mark = " (nominal)" if r["bytes_nominal"] else ""
        lines.append(f"| {r['scheme']} | {r['bits_per_byte']:.4f} | {r['bits_per_byte_change']:+.2%} | "
                     f"{r['greedy_agreement']:.3f} | {r['projection_bytes'] / 2**20:.2f}{mark} | "
                     f"{r['model_bytes'] / 2**20:.2f}{mark} | {r['quantize_s']:.1f} | {tok_s} |")
    return "\n".join(lines)


def check_flags() -> None:
    """Refuse bad flags before any model loads: scheme names, counts and ranges."""
    if not FLAGS.schemes:
        raise ValueError("--schemes is empty: name at least the reference (dense)")
    if not 0.0 <= FLAGS.smooth_alpha <= 1.0:
        raise ValueError(f"--smooth_alpha={FLAGS.smooth_alpha} must be in [0, 1]")
    for name in FLAGS.schemes:  # after --smooth_alpha: a smooth name without an alpha takes the flag's
        try:
            resolve(name)
        except ValueError as e:
            raise ValueError(f"--schemes: {e}") from None
    for name in ("calib_sequences", "calib_len", "windows", "seq_len"):
        if FLAGS[name].value < 1:
            raise ValueError(f"--{name}={FLAGS[name].value} must be >= 1")
    if FLAGS.decode_tokens < 0 or FLAGS.outlier < 0:
        raise ValueError(f"--decode_tokens={FLAGS.decode_tokens} and --outlier={FLAGS.outlier:g} must be >= 0")


def main(argv):
    del argv
    check_flags()
    rows = evaluate(FLAGS.schemes)
    metrics = {r["scheme"]: r for r in rows} | (rows[0] if len(rows) == 1 else {})  # one scheme: unprefixed too
    record = common.record(__name__, metrics, results=rows, fp8_gemm=fp8_gemm(FLAGS.schemes))
    if record["fp8_gemm"]:
        print(f"fp8 GEMM: {record['fp8_gemm']}")
    md = table(rows)
    print(f"\n{FLAGS.model} on {record['env']['device']}, {FLAGS.windows} held-out windows of {FLAGS.seq_len}")
    print(md)
    if FLAGS.out:
        common.write_json(FLAGS.out, record)
    if FLAGS.table:
        common.write_text(FLAGS.table, md)


def cli() -> None:
    """The `jaxinfer-quant-eval` console script (the same as python -m jaxinfer.experiments.quant_eval)."""
    common.run(main)


if __name__ == "__main__":
    cli()
