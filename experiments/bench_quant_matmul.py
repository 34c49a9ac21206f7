"""Checks the weight-only quantised matmul kernel and the W8A8 GEMM against their references, then
times them against a dense bf16 matmul and the XLA paths.

Run on a GPU:   python -m jaxinfer.experiments.bench_quant_matmul [--sweep]
Smoke on a CPU: python -m jaxinfer.experiments.bench_quant_matmul --quick   (interpret mode, tiny shapes, 2 runs)
On a CPU it refuses to start without --quick or --allow_cpu (then the tiny shapes unless --shapes
is given, interpreted): the default shapes would run interpreted for minutes each.

For each shape M x K x N (--shapes; default 1, 16 and 256 rows of Llama-3-8B's MLP up projection,
4096 x 14336), bf16 activations:
  dense bf16      x @ w
  xla <scheme>    jaxinfer.models.formats.reference_matmul (dequantise to bf16, one matmul)
  pallas <scheme> pallas_kernels.quant_matmul (default BlockSizes; --sweep adds a few others)
for the schemes int8 per-channel, int4 g128 symmetric and int4 g128 with zero points (RTN); then W8A8:
  xla w8a8-<int8|fp8>     jaxinfer.models.act_formats.w8a8_reference (x quantised per token, int32 / float32 einsum)
  pallas w8a8-<int8|fp8>  the same per-token quantisation, then pallas_kernels.w8a8_matmul (rescale in its
                          epilogue); fp8 needs sm_89+ (elsewhere the row reports the kernel's refusal)
The W8A8 timings include quantising x, as the model's matmul does.

Each variant is first compared with quant_matmul.reference on the same inputs (max per-row
relative error; the dense matmul with a float32 matmul of its own weight). Timing: warm-up, then
the median over --runs of --calls back-to-back calls, rotating among weight sets that together
exceed the card's L2. Reported: ms per call, GB/s of weight bytes read (qweight + scales + zeros;
dense: K * N * 2), that as % of the card's bandwidth (--card, or --bandwidth_gbs), and the speed-up
over dense bf16. Compile time (compile and first call) is reported apart. Writes a JSON to --out,
the markdown table next to it (.md), and prints the table last.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from jaxinfer.memory import load_hardware
from jaxinfer.models import act_formats as af
from jaxinfer.models import formats as fmt
from jaxinfer.quant import rtn
from pallas_kernels import quant_matmul as qm
from pallas_kernels import w8a8_matmul as wm

from . import common
from .common import environment, median_call_time

FLAGS = flags.FLAGS
for _name in ("quick", "allow_cpu", "out", "runs", "calls", "interpret"):
    flags.declare_key_flag(_name)
RUNS = 10  # default timed runs per variant
_SHAPES = flags.DEFINE_list("shapes", ["1x4096x14336", "16x4096x14336", "256x4096x14336"],
                            "comma-separated MxKxN shapes (ignored with --quick; on a CPU with --allow_cpu "
                            "the default is the --quick shapes)")
_CARD = flags.DEFINE_string("card", "h100_80gb", "configs/hardware card whose bandwidth and L2 size are used")
_BANDWIDTH = flags.DEFINE_float("bandwidth_gbs", None, "memory bandwidth in GB/s (default: the card's datasheet)")
_SWEEP = flags.DEFINE_bool("sweep", False, "also time a few non-default BlockSizes per shape (interpret mode: one)")

_T0 = time.perf_counter()
MAX_SETS = 4
TOLERANCE = 2e-2  # bfloat16 outputs
SCHEMES = {  # name: (bits, group_size or None for per-channel, symmetric)
    "int8-pc": (8, None, True),
    "int4-g128": (4, 128, True),
    "int4-g128-zeros": (4, 128, False),
}
BS = qm.BlockSizes
SWEEP_DECODE = [BS(16, 64, 128, 1), BS(16, 64, 128, 2), BS(16, 128, 128, 4), BS(16, 32, 128, 8)]
SWEEP_PREFILL = [BS(128, 128, 64, 1, 8, 3), BS(64, 64, 64, 1, 4, 4), BS(32, 128, 128, 1, 4, 3)]


def _log(message: str) -> None:
    print(f"  [{time.perf_counter() - _T0:5.0f} s] {message}", flush=True)


def _row_error(actual, expected) -> float:
    """Largest ||a - e|| / ||e|| over rows (the last axis)."""
    a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64).reshape(-1, actual.shape[-1])
    e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64).reshape(-1, expected.shape[-1])
    num = np.linalg.norm(a - e, axis=-1)
    return float(np.max(num / np.maximum(np.linalg.norm(e, axis=-1), 1e-30)))


def _block_name(bs: qm.BlockSizes | None) -> str:
    if bs is None:
        return "default"
    return f"m{bs.block_m} n{bs.block_n} k{bs.block_k} s{bs.num_splits} w{bs.num_warps} st{bs.num_stages}"


def _run_variant(rows, shape, variant, fn, arg_sets, expected, weight_bytes, bandwidth, runs, calls):
    """Checks fn on arg_sets[0], times it, appends a result row (or the error)."""
    M, K, N = shape
    row = dict(M=M, K=K, N=N, variant=variant, weight_bytes=weight_bytes)
    try:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*arg_sets[0]))
        row["compile_s"] = time.perf_counter() - t0
        row["max_row_error"] = _row_error(out, expected)
        row["passed"] = bool(row["max_row_error"] <= TOLERANCE and np.isfinite(np.asarray(out, np.float32)).all())
        row["seconds_per_call"] = median_call_time(fn, arg_sets, runs, calls)
        row["ms"] = row["seconds_per_call"] * 1e3
        row["gb_per_s"] = weight_bytes / row["seconds_per_call"] / 1e9
        row["pct_bandwidth"] = 100 * row["gb_per_s"] * 1e9 / bandwidth
    except Exception as e:  # a variant that fails to compile or run is reported, not fatal
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    _log(f"{M}x{K}x{N} {variant:44s} "
         + (f"err {row['max_row_error']:.2e} {row['ms']:8.4f} ms {row['gb_per_s']:7.1f} GB/s "
            f"(compile {row['compile_s']:.1f} s)" if "error" not in row else f"FAILED {row['error']}"))
    rows.append(row)
    return row


def bench_shape(rows, key, shape, *, bandwidth, l2_bytes, sweep, interpret, runs, calls):
    M, K, N = shape
    dtype = jnp.bfloat16
    dense_bytes = K * N * 2
    num_sets = int(min(MAX_SETS, max(2, -(-2 * l2_bytes // dense_bytes))))
    kx, kw = jax.random.split(key)
    xs = [jax.random.normal(jax.random.fold_in(kx, i), (M, K), dtype) for i in range(num_sets)]
    ws = [(0.02 * jax.random.normal(jax.random.fold_in(kw, i), (K, N), jnp.float32)).astype(dtype)
          for i in range(num_sets)]

    dense_expected = jnp.einsum("mk,kn->mn", xs[0].astype(jnp.float32), ws[0].astype(jnp.float32),
                                precision="highest")
    dense = _run_variant(rows, shape, "dense bf16", jax.jit(lambda x, w: x @ w), list(zip(xs, ws)),
                         dense_expected, dense_bytes, bandwidth, runs, calls)

    swept = SWEEP_DECODE if M <= qm.DECODE_MAX_ROWS else SWEEP_PREFILL
    configs = [None] + (swept[: 1 if interpret else None] if sweep else [])
    for scheme, (bits, group_size, symmetric) in SCHEMES.items():
        qws = [rtn.quantize_weight(w, bits, group_size, symmetric=symmetric) for w in ws]
        arg_sets = list(zip(xs, qws))
        weight_bytes = qws[0].nbytes
        reference = jax.jit(qm.reference, static_argnames=("bits", "group_size"))
        expected = reference(xs[0], qws[0].qweight, qws[0].scales, qws[0].zeros, qws[0].perm,
                             bits=bits, group_size=qws[0].group_size)
        variants = [(f"xla {scheme}", jax.jit(fmt.reference_matmul))]
        for bs in configs:
            fn = jax.jit(lambda x, w, bs=bs: qm.quant_matmul(
                x, w.qweight, w.scales, w.zeros, w.perm, bits=w.bits, group_size=w.group_size,
                block_sizes=bs, interpret=interpret))
            variants.append((f"pallas {scheme} {_block_name(bs)}", fn))
        for name, fn in variants:
            row = _run_variant(rows, shape, name, fn, arg_sets, expected, weight_bytes, bandwidth, runs, calls)
            if "error" not in row and "error" not in dense:
                row["speedup_vs_bf16"] = dense["seconds_per_call"] / row["seconds_per_call"]
        del qws, arg_sets, expected
    for w8 in ("int8", "fp8"):
        qws = [af.W8A8Weight(*af.quantize_columns(w, w8)) for w in ws]
        arg_sets = list(zip(xs, qws))
        expected = jax.jit(af.w8a8_reference)(xs[0], qws[0])

        def kernel(x, w):
            xq, x_scale = af.quantize_activations(x, w)
            return wm.w8a8_matmul(xq, x_scale, w.qweight, w.scales, out_dtype=x.dtype, interpret=interpret)

        variants = [(f"xla w8a8-{w8}", jax.jit(af.w8a8_reference)), (f"pallas w8a8-{w8} default", jax.jit(kernel))]
        for name, fn in variants:
            row = _run_variant(rows, shape, name, fn, arg_sets, expected, qws[0].nbytes, bandwidth, runs, calls)
            if "error" not in row and "error" not in dense:
                row["speedup_vs_bf16"] = dense["seconds_per_call"] / row["seconds_per_call"]
        del qws, arg_sets, expected
    if "error" not in dense:
        dense["speedup_vs_bf16"] = 1.0


def _markdown(result) -> str:
    lines = [
        f"{result['device']} | jax {result['jax_version']} | interpret={result['interpret']} | "
        f"bandwidth {result['bandwidth_gb_per_s']:.0f} GB/s ({result['bandwidth_source']})",
        "",
        "| M | K | N | variant | ms | GB/s | % BW | x bf16 | max row err | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        head = f"| {r['M']} | {r['K']} | {r['N']} | {r['variant']} |"
        if "error" in r:
            lines.append(f"{head} FAILED: {r['error'][:80]} | | | | | |")
            continue
        mark = "" if r["passed"] else " FAILED"
        lines.append(f"{head} {r['ms']:.4f} | {r['gb_per_s']:.1f} | {r['pct_bandwidth']:.1f} | "
                     f"{r.get('speedup_vs_bf16', float('nan')):.2f} | {r['max_row_error']:.2e}{mark} | "
                     f"{r['compile_s']:.1f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    quick = FLAGS.quick
    on_cpu = common.gpu_or_allow_cpu("bench_quant_matmul", "up to 256x4096x14336")
    interpret = FLAGS.interpret if FLAGS.interpret is not None else (quick or jax.default_backend() != "gpu")
    runs, calls = (2, 2) if quick else (FLAGS.runs or RUNS, FLAGS.calls)
    card = load_hardware(_CARD.value)
    if _BANDWIDTH.value is not None:
        bandwidth, source = _BANDWIDTH.value * 1e9, "--bandwidth_gbs"
    else:
        bandwidth, source = card.memory_bandwidth_bytes_per_s, f"{_CARD.value} datasheet"
    if quick or (on_cpu and not _SHAPES.present):
        shapes = [(1, 256, 97), (40, 256, 97)]
    else:
        shapes = []
        for s in _SHAPES.value:
            parts = s.lower().split("x")
            if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"--shapes entry {s!r} is not MxKxN with positive integers")
            shapes.append(tuple(int(p) for p in parts))
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, interpret={interpret}, "
          f"started after {time.perf_counter() - _T0:.0f} s", flush=True)

    rows: list[dict] = []
    t_start = time.perf_counter()
    key = jax.random.key(0)
    for i, shape in enumerate(shapes):
        bench_shape(rows, jax.random.fold_in(key, i), shape, bandwidth=bandwidth, l2_bytes=card.l2_bytes,
                    sweep=_SWEEP.value, interpret=interpret, runs=runs, calls=calls)

    result = dict(
        **environment("experiments.bench_quant_matmul"),
        quick=quick,
        interpret=interpret,
        runs=runs,
        calls_per_run=calls,
        card=_CARD.value,
        bandwidth_gb_per_s=bandwidth / 1e9,
        bandwidth_source=source,
        total_seconds=time.perf_counter() - t_start,
        results=rows,
    )
    table = _markdown(result)
    print(f"\n{result['total_seconds']:.0f} s\n")
    print(table)
    if FLAGS.out:
        metrics = {f"{r['M']}x{r['K']}x{r['N']}/{r['variant']}": r for r in rows}
        common.write_json(FLAGS.out, common.record(__name__, metrics, **result))
        with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
            f.write(table + "\n")
        print(f"wrote {os.path.splitext(FLAGS.out)[0]}.md")
    if quick and any("error" in r or not r["passed"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    common.run(main)
