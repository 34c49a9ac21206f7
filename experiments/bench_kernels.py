"""Checks the attention kernels against their references, then times them against XLA and cuDNN.

Run on a GPU:   python -m jaxinfer.experiments.bench_kernels
Smoke on a CPU: python -m jaxinfer.experiments.bench_kernels --quick   (interpret mode, tiny shapes, 2 runs)
On a CPU it refuses to start without --quick or --allow_cpu (the tiny shapes, interpreted, at
the usual --runs and --calls): the GPU shapes would run interpreted for hours.

(a) causal prefill, B=4 L=4096 N=32 K=32/8 H=128 bf16: flash_attention (a few BlockSizes),
    XLA and cuDNN (`jax.nn.dot_product_attention`), in TFLOP/s (causal: 2*2*B*N*L*L*H / 2).
(b) paged decode, B=32 N=32 K=8 H=128 L=4096 page 16 bf16, and B=1 L=32768: paged_decode_attention
    (a few BlockSizes) and XLA gather + dense attention, in GB/s of KV bytes read.
(c) the same decode with int8 pages and float32 per-token scales.

Every variant is first compared with the kernel's reference on the same inputs (max per-row
relative error). Timing: warm-up, then the median over --runs of --calls back-to-back calls,
rotating among input sets that together exceed the 50 MB L2. Compile time is reported apart.
Writes a JSON to --out and prints a table last.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from pallas_kernels import flash_attention as fa
from pallas_kernels import paged_attention as pa

from . import common
from .common import environment, median_call_time

FLAGS = flags.FLAGS
for _name in ("quick", "allow_cpu", "out", "runs", "calls", "interpret"):
    flags.declare_key_flag(_name)
RUNS = 20  # default timed runs per variant

_T0 = time.perf_counter()
L2_BYTES = 50 * 2**20
MAX_SETS = 4


def _row_error(actual, expected) -> float:
    """Largest ||a - e|| / ||e|| over rows (the last axis)."""
    a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64).reshape(-1, actual.shape[-1])
    e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64).reshape(-1, expected.shape[-1])
    num = np.linalg.norm(a - e, axis=-1)
    return float(np.max(num / np.maximum(np.linalg.norm(e, axis=-1), 1e-30)))


def _on_host(tree):
    """Moves arrays to the CPU backend (when there is one besides the GPU): the float32
    references at benchmark shapes then cost seconds of CPU time, not GPU GEMM autotuning."""
    try:
        return jax.device_put(tree, jax.devices("cpu")[0])
    except RuntimeError:
        return tree


def _log(message: str) -> None:
    print(f"  [{time.perf_counter() - _T0:5.0f} s] {message}", flush=True)


def _num_sets(set_bytes: int) -> int:
    return int(min(MAX_SETS, max(2, -(-2 * L2_BYTES // max(set_bytes, 1)))))


def _run_variant(rows, section, name, fn, arg_sets, expected, work, unit, runs, calls):
    """Checks fn on arg_sets[0] against expected (which may cover only a leading slice of the
    output), times it, appends a result row (or the error)."""
    row = dict(section=section, variant=name)
    try:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*arg_sets[0]))
        row["compile_s"] = time.perf_counter() - t0  # compile and first call
        row["max_row_error"] = _row_error(out[tuple(slice(0, n) for n in expected.shape)], expected)
        row["seconds_per_call"] = median_call_time(fn, arg_sets, runs, calls)
        row[unit] = work / row["seconds_per_call"] / (1e12 if unit == "TFLOP/s" else 1e9)
    except Exception as e:  # a variant that fails to compile or run is reported, not fatal
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    _log(f"{section:40s} {name:34s} "
          + (f"err {row['max_row_error']:.2e}  {row[unit]:8.1f} {unit}  (compile {row['compile_s']:.1f} s)"
             if "error" not in row else f"FAILED {row['error']}"))
    rows.append(row)


def bench_prefill(rows, key, *, B, L, N, K, H, configs, interpret, runs, calls):
    section = f"prefill B={B} L={L} N={N} K={K} H={H}"
    dtype = jnp.bfloat16
    set_bytes = 2 * B * L * (N + 2 * K) * H
    arg_sets = []
    for i in range(_num_sets(set_bytes)):
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, i), 3)
        arg_sets.append((
            jax.random.normal(kq, (B, L, N, H), dtype),
            jax.random.normal(kk, (B, L, K, H), dtype),
            jax.random.normal(kv, (B, L, K, H), dtype),
        ))
    zeros = jnp.zeros((B,), jnp.int32)
    full = jnp.full((B,), L, jnp.int32)
    # The float32 reference materialises (T, S) scores per head: check sequence 0 and the first
    # 8 query heads (with their kv heads) only, which keeps it to seconds at L=4096.
    n_check = min(N, 8)
    k_check = max(1, n_check * K // N)
    q0, k0, v0 = arg_sets[0]
    expected = fa.reference(*_on_host((q0[:1, :, :n_check], k0[:1, :, :k_check], v0[:1, :, :k_check],
                                       zeros[:1], full[:1])))
    _log(f"{section}: {len(arg_sets)} input sets and the reference ready {jax.block_until_ready(expected).shape}")
    flops = 2 * 2 * B * N * L * L * H / 2
    for bs in configs:
        bs = bs or fa.BlockSizes.default(H)
        fn = jax.jit(lambda q, k, v, bs=bs: fa.flash_attention(q, k, v, zeros, full, block_sizes=bs, interpret=interpret))
        name = f"ours q{bs.block_q} k{bs.block_k} w{bs.num_warps} s{bs.num_stages}"
        _run_variant(rows, section, name, fn, arg_sets, expected, flops, "TFLOP/s", runs, calls)
    for impl in ("xla", "cudnn"):
        if impl == "cudnn" and jax.default_backend() != "gpu":
            continue
        fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl))
        _run_variant(rows, section, impl, fn, arg_sets, expected, flops, "TFLOP/s", runs, calls)
    del arg_sets, expected


def xla_paged_decode(q, k_pages, v_pages, block_tables, lengths, k_scales=None, v_scales=None):
    """The XLA baseline: gather the pages, dequantise in q's dtype, dense masked attention."""
    B, N, H = q.shape
    K, _, page_size, _ = k_pages.shape
    S = block_tables.shape[1] * page_size
    k = k_pages[:, block_tables]  # (K, B, max_pages, page_size, H)
    v = v_pages[:, block_tables]
    if k_scales is not None:
        k = k.astype(q.dtype) * k_scales[:, block_tables][..., None].astype(q.dtype)
        v = v.astype(q.dtype) * v_scales[:, block_tables][..., None].astype(q.dtype)
    k = k.reshape(K, B, S, H)
    v = v.reshape(K, B, S, H)
    qg = q.reshape(B, K, N // K, H)
    s = jnp.einsum("BKGH,KBSH->BKGS", qg, k, preferred_element_type=jnp.float32) * H**-0.5
    s = jnp.where(jnp.arange(S)[None, None, None, :] < lengths[:, None, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    return jnp.einsum("BKGS,KBSH->BKGH", p, v, preferred_element_type=jnp.float32).astype(q.dtype).reshape(B, N, H)


def bench_decode(rows, key, *, B, L, N, K, H, page_size, kv_dtype, configs, interpret, runs, calls):
    quantised = kv_dtype == jnp.int8
    section = f"decode{' int8' if quantised else ''} B={B} L={L} N={N} K={K} page={page_size}"
    max_pages = L // page_size
    P = B * max_pages
    itemsize = jnp.dtype(kv_dtype).itemsize
    kv_bytes = 2 * B * L * K * H * itemsize + (2 * B * L * K * 4 if quantised else 0)
    arg_sets = []
    for i in range(_num_sets(kv_bytes)):
        kq, kk, kv, kt = jax.random.split(jax.random.fold_in(key, i), 4)
        q = jax.random.normal(kq, (B, N, H), jnp.bfloat16)
        if quantised:
            k_pages = jax.random.randint(kk, (K, P, page_size, H), -127, 128, jnp.int8)
            v_pages = jax.random.randint(kv, (K, P, page_size, H), -127, 128, jnp.int8)
            scales = jax.random.uniform(kt, (2, K, P, page_size), jnp.float32, 0.002, 0.02)
        else:
            k_pages = jax.random.normal(kk, (K, P, page_size, H), kv_dtype)
            v_pages = jax.random.normal(kv, (K, P, page_size, H), kv_dtype)
        block_tables = jax.random.permutation(kt, P).reshape(B, max_pages).astype(jnp.int32)
        lengths = jnp.full((B,), L, jnp.int32)
        args = (q, k_pages, v_pages, block_tables, lengths)
        arg_sets.append(args + ((scales[0], scales[1]) if quantised else ()))

    def scale_kwargs(args):
        return dict(k_scales=args[5], v_scales=args[6]) if quantised else {}

    host_args = _on_host(arg_sets[0])
    expected = pa.reference(*host_args[:5], **scale_kwargs(host_args))
    _log(f"{section}: {len(arg_sets)} input sets and the reference ready {jax.block_until_ready(expected).shape}")
    for bs in configs:
        if bs is None:
            bs = pa.BlockSizes.default(B, K, max_pages, page_size, H, kv_dtype)
        fn = jax.jit(lambda *a, bs=bs: pa.paged_decode_attention(*a[:5], **scale_kwargs(a), block_sizes=bs,
                                                                 interpret=interpret))
        name = f"ours ppb{bs.pages_per_block} splits{bs.num_splits} w{bs.num_warps} s{bs.num_stages}"
        _run_variant(rows, section, name, fn, arg_sets, expected, kv_bytes, "GB/s", runs, calls)
    _run_variant(rows, section, "xla gather+dense", jax.jit(xla_paged_decode), arg_sets, expected, kv_bytes,
                 "GB/s", runs, calls)
    del arg_sets, expected


def check_small_shapes(rows, *, interpret):
    """Untimed checks of the paths the benchmark shapes miss: paged prefill, windows, float32,
    head dims 64 and 96, page sizes 8 and 32, fp8 pages. Each must compile and match."""
    rng = np.random.default_rng(0)
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2}

    def normal(shape, dtype):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    def paged_case(dtype, B, T, N, K, H, page_size, window, block_sizes):
        max_pages = 8
        P = B * max_pages + 3
        k_pages, v_pages = normal((K, P, page_size, H), dtype), normal((K, P, page_size, H), dtype)
        tables = jnp.asarray(rng.permutation(P)[: B * max_pages].reshape(B, max_pages), jnp.int32)
        kv_lens = jnp.asarray(rng.integers(T, max_pages * page_size + 1, B), jnp.int32)
        args = (normal((B, T, N, H), dtype), k_pages, v_pages, tables, kv_lens - T, kv_lens)
        kw = dict(window=window)
        return (fa.paged_flash_attention(*args, **kw, block_sizes=block_sizes, interpret=interpret),
                fa.paged_reference(*args, **kw))

    def dense_case(dtype, B, T, N, K, H, window):
        args = (normal((B, T, N, H), dtype), normal((B, T, K, H), dtype), normal((B, T, K, H), dtype),
                jnp.zeros((B,), jnp.int32), jnp.asarray(rng.integers(1, T + 1, B), jnp.int32))
        return fa.flash_attention(*args, window=window, interpret=interpret), fa.reference(*args, window=window)

    def decode_case(dtype, kv_dtype, B, N, K, H, page_size, window, block_sizes):
        max_pages = 12
        P = B * max_pages
        if kv_dtype in (jnp.int8, jnp.float8_e4m3fn):
            k_pages = jnp.asarray(rng.integers(-100, 101, (K, P, page_size, H))).astype(kv_dtype)
            v_pages = jnp.asarray(rng.integers(-100, 101, (K, P, page_size, H))).astype(kv_dtype)
            scales = dict(k_scales=jnp.asarray(rng.uniform(0.002, 0.02, (K, P, page_size)), jnp.float32),
                          v_scales=jnp.asarray(rng.uniform(0.002, 0.02, (K, P, page_size)), jnp.float32))
        else:
            k_pages, v_pages, scales = normal((K, P, page_size, H), kv_dtype), normal((K, P, page_size, H), kv_dtype), {}
        tables = jnp.asarray(rng.permutation(P).reshape(B, max_pages), jnp.int32)
        lengths = jnp.asarray(rng.integers(1, max_pages * page_size + 1, B), jnp.int32)
        args = (normal((B, N, H), dtype), k_pages, v_pages, tables, lengths)
        kw = dict(scales, window=window)
        return (pa.paged_decode_attention(*args, **kw, block_sizes=block_sizes, interpret=interpret),
                pa.reference(*args, **kw))

    cases = {
        "paged prefill bf16 H128 G4 page16": lambda: paged_case(jnp.bfloat16, 2, 37, 8, 2, 128, 16, 0, None),
        "paged prefill bf16 window 50": lambda: paged_case(jnp.bfloat16, 2, 37, 8, 2, 128, 16, 50, fa.BlockSizes(32, 32, 4, 2)),
        "paged prefill f32 H64 page8": lambda: paged_case(jnp.float32, 2, 20, 4, 4, 64, 8, 0, fa.BlockSizes(16, 16, 4, 2)),
        "flash f32 H64 G8 window 17": lambda: dense_case(jnp.float32, 2, 100, 8, 1, 64, 17),
        "flash bf16 H96 (padded to 128)": lambda: dense_case(jnp.bfloat16, 1, 64, 4, 2, 96, 0),
        "decode f32 H64 G1 page32 window 40": lambda: decode_case(jnp.float32, jnp.float32, 3, 4, 4, 64, 32, 40, pa.BlockSizes(1, 2)),
        "decode bf16 fp8 pages": lambda: decode_case(jnp.bfloat16, jnp.float8_e4m3fn, 3, 8, 1, 128, 16, 0, None),
        "decode f32 int8 pages page8": lambda: decode_case(jnp.float32, jnp.int8, 3, 8, 2, 128, 8, 0, pa.BlockSizes(2, 4)),
    }
    for name, case in cases.items():
        row = dict(section="checks", variant=name)
        try:
            out, expected = case()
            row["max_row_error"] = _row_error(out, expected)
            row["tolerance"] = tolerance[jnp.dtype(out.dtype).name]
            row["passed"] = bool(row["max_row_error"] <= row["tolerance"] and np.isfinite(np.asarray(out, np.float32)).all())
        except Exception as e:  # reported, so one failing path does not hide the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        _log(f"check {name:40s} " + (f"err {row['max_row_error']:.2e} {'ok' if row['passed'] else 'FAILED'}"
                                         if "error" not in row else f"FAILED {row['error']}"))
        rows.append(row)


def main(argv):
    del argv
    quick = FLAGS.quick
    small = common.gpu_or_allow_cpu("bench_kernels", "prefill B=4 L=4096, paged decode up to L=32768") or quick
    interpret = FLAGS.interpret if FLAGS.interpret is not None else jax.default_backend() != "gpu"
    runs, calls = (2, 2) if quick else (FLAGS.runs or RUNS, FLAGS.calls)
    key = jax.random.key(0)
    rows: list[dict] = []
    t_start = time.perf_counter()
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, interpret={interpret}, "
          f"started after {time.perf_counter() - _T0:.0f} s", flush=True)

    FB = fa.BlockSizes
    if small:
        prefill_shapes = [dict(B=1, L=64, N=4, K=4, H=64), dict(B=1, L=64, N=4, K=2, H=64)]
        prefill_configs = [None]
        decode_shapes = [dict(B=2, L=64, N=4, K=2, H=64, page_size=16)]
        decode_configs = [pa.BlockSizes(2, 2)]
        int8_configs = [pa.BlockSizes(2, 2)]
    else:
        prefill_shapes = [dict(B=4, L=4096, N=32, K=32, H=128), dict(B=4, L=4096, N=32, K=8, H=128)]
        # The default for this device, then the defaults for A100 and for ~99 KB shared-memory cards.
        prefill_configs = [None, FB(128, 64, 8, 3), FB(64, 64, 4, 2)]
        decode_shapes = [dict(B=32, L=4096, N=32, K=8, H=128, page_size=16),
                         dict(B=1, L=32768, N=32, K=8, H=128, page_size=16)]
        decode_configs = [None, pa.BlockSizes(8, 4), pa.BlockSizes(4, 16), pa.BlockSizes(2, 16, 4, 3)]
        int8_configs = [None, pa.BlockSizes(8, 8)]

    if not small:
        check_small_shapes(rows, interpret=interpret)
    for shape in prefill_shapes:
        bench_prefill(rows, key, **shape, configs=prefill_configs, interpret=interpret, runs=runs, calls=calls)
    for shape in decode_shapes:
        configs = decode_configs if shape["B"] > 1 else [None, pa.BlockSizes(8, 32), pa.BlockSizes(16, 16)]
        if small:
            configs = decode_configs
        bench_decode(rows, key, **shape, kv_dtype=jnp.bfloat16, configs=configs, interpret=interpret,
                     runs=runs, calls=calls)
    bench_decode(rows, key, **decode_shapes[0], kv_dtype=jnp.int8, configs=int8_configs, interpret=interpret,
                 runs=runs, calls=calls)

    result = dict(
        **environment("experiments.bench_kernels"),
        quick=quick,
        small_shapes=small,
        interpret=interpret,
        runs=runs,
        calls_per_run=calls,
        total_seconds=time.perf_counter() - t_start,
        results=rows,
    )
    print(f"\n{result['device']} | jax {result['jax_version']} | {result['total_seconds']:.0f} s")
    print(f"{'section':40s} {'variant':34s} {'max row err':>11s} {'us/call':>9s} {'figure':>16s}")
    for r in rows:
        if r["section"] == "checks" and "error" not in r:
            print(f"{'check':40s} {r['variant']:34s} {r['max_row_error']:11.2e} {'ok' if r['passed'] else 'FAILED':>9s}")
            continue
        if "error" in r:
            print(f"{r['section']:40s} {r['variant']:34s} FAILED")
            continue
        unit = "TFLOP/s" if "TFLOP/s" in r else "GB/s"
        print(f"{r['section']:40s} {r['variant']:34s} {r['max_row_error']:11.2e} "
              f"{r['seconds_per_call'] * 1e6:9.1f} {r[unit]:9.1f} {unit:>6s}")
    if any("error" in r for r in rows) and quick:
        sys.exit(1)

    if FLAGS.out:
        metrics = {f"{r['section']}/{r['variant']}": r for r in rows}
        common.write_json(FLAGS.out, common.record(__name__, metrics, **result))

if __name__ == "__main__":
    common.run(main)
