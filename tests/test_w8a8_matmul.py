"""w8a8_matmul (interpret mode) against its reference, the int8 accumulator against exact integer
arithmetic and the fp8 one against NumPy's float64 products of e4m3 values read through ml_dtypes
(an implementation of the format apart from XLA's); the model's dispatch point (linear) on W8A8
weights, Pallas against XLA.

Shapes are drawn by hypothesis and kept small (each new shape costs an interpret-mode compile).
Interpret mode starts outputs as NaN (test_quant_matmul.test_interpret_outputs_start_poisoned), so
a tile the kernel fails to write shows up. Odd N makes the last column tile overlap its neighbour;
M = 300 crosses several row blocks; K not a multiple of 32 pads the weight.

Tolerances: int8 accumulates exactly in int32 and the epilogue's float32 products are the same
operations in the same order, so int8 outputs equal the reference bit for bit. FP8 products are
exact in float32 but the sums run in another order: per-row relative error <= 1e-5 in float32;
an output rounded to bfloat16 or float16 may then land one rounding step off: 2e-2 / 1e-2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import INTERPRET, THOROUGH, assert_rows_close, draws
from hypothesis import given
from hypothesis import strategies as st

from jaxinfer.models import act_formats as af
from jaxinfer.models import matmul
from jaxinfer.models.matmul import linear
from pallas_kernels import w8a8_matmul as wm

FP8_TOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 1e-2}
BS = wm.BlockSizes
BLOCKS = [None, BS(16, 16, 32), BS(32, 64, 64), BS(64, 32, 128)]

_reference = jax.jit(wm.reference, static_argnames=("out_dtype", "block_sizes", "interpret"))


def _inputs(rng, M, K, N, fmt):
    """Random 8-bit x (M, K) and w (K, N) over the format's whole range, positive float32 scales."""
    if fmt == "int8":
        x = jnp.asarray(rng.integers(-128, 128, (M, K)), jnp.int8)  # -128 too: the kernel must not assume +-127
        w = jnp.asarray(rng.integers(-128, 128, (K, N)), jnp.int8)
    else:
        x = jnp.asarray(np.clip(rng.standard_normal((M, K)) * 100, -448, 448), jnp.float32).astype(jnp.float8_e4m3fn)
        w = jnp.asarray(np.clip(rng.standard_normal((K, N)) * 2, -448, 448), jnp.float32).astype(jnp.float8_e4m3fn)
    xs = jnp.asarray(rng.uniform(1e-3, 1e-1, M), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-3, 1e-1, N), jnp.float32)
    return x, xs, w, ws


@st.composite
def cases(draw):
    return dict(
        M=draw(st.one_of(st.sampled_from([1, 16, 17, 300]), st.integers(1, 300))),
        K=draw(st.sampled_from([32, 64, 96, 160, 256, 40])),
        N=draw(st.sampled_from([33, 97, 48, 16])),
        fmt=draw(st.sampled_from(["int8", "fp8"])),
        out=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
        blocks=draw(st.sampled_from(range(len(BLOCKS)))),
        data_seed=draw(st.integers(0, 2**16)),
    )


def _case(M, K, N, fmt, out, blocks=0, data_seed=0):
    return dict(M=M, K=K, N=N, fmt=fmt, out=out, blocks=blocks, data_seed=data_seed)


def _run_case(case, seed):
    """Scaled outputs: int8 bit for bit, fp8 within FP8_TOL; the raw accumulator of the same inputs
    (no scales) equals exact integer arithmetic (int8) or the reference (fp8)."""
    rng = np.random.default_rng([seed, case["data_seed"]])
    x, xs, w, ws = _inputs(rng, case["M"], case["K"], case["N"], case["fmt"])
    blocks = BLOCKS[case["blocks"]]
    out = wm.w8a8_matmul(x, xs, w, ws, out_dtype=case["out"], block_sizes=blocks, interpret=INTERPRET)
    want = _reference(x, xs, w, ws, out_dtype=case["out"])
    assert out.dtype == jnp.dtype(case["out"])
    if case["fmt"] == "int8":
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    else:
        assert_rows_close(out, want, FP8_TOL[case["out"]])
    acc = wm.w8a8_matmul(x, None, w, None, block_sizes=blocks, interpret=INTERPRET)
    if case["fmt"] == "int8":
        assert acc.dtype == jnp.int32
        np.testing.assert_array_equal(acc, np.asarray(x, np.int64) @ np.asarray(w, np.int64))
    else:
        assert acc.dtype == jnp.float32
        assert_rows_close(acc, _reference(x, None, w, None), FP8_TOL["float32"])
        exact = _numpy_fp8(x) @ _numpy_fp8(w)  # (M, N) float64
        assert_rows_close(acc, exact, FP8_TOL["float32"])
        scaled = exact * np.asarray(xs, np.float64)[:, None] * np.asarray(ws, np.float64)[None, :]
        assert_rows_close(out, scaled, FP8_TOL[case["out"]])


def _numpy_fp8(a) -> np.ndarray:
    """An e4m3 array's values in float64, decoded by ml_dtypes (checked against the format's table)."""
    a = np.asarray(a)
    assert a.dtype == ml_dtypes.float8_e4m3fn
    return a.astype(np.float64)


def test_ml_dtypes_decodes_e4m3_by_its_definition():
    """The fp8 reference's decoder against the format's definition, bit pattern by bit pattern:
    sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals at exponent 0, NaN at S.1111.111
    (no infinities: e4m3fn)."""
    bits = np.arange(256, dtype=np.uint8)
    sign, exponent, mantissa = bits >> 7, (bits >> 3) & 0xF, bits & 0x7
    value = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent.astype(int) - 7))
    value = np.where(sign == 1, -value, value)
    decoded = bits.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    nan = (exponent == 0xF) & (mantissa == 0x7)
    assert np.isnan(decoded[nan]).all() and nan.sum() == 2
    np.testing.assert_array_equal(decoded[~nan], value[~nan])
    assert decoded[~nan].max() == 448


@pytest.mark.parametrize("case", [
    _case(1, 256, 97, "int8", "bfloat16"),  # decode row, odd N
    _case(300, 160, 33, "fp8", "float32", blocks=3),  # several row blocks, K in 32-steps
    _case(17, 40, 48, "int8", "float16", blocks=1),  # K = 40: the weight padded to 64 rows
    _case(64, 96, 16, "fp8", "bfloat16", blocks=2),  # N = 16: one column tile
    _case(123, 64, 97, "int8", "float32", blocks=2),  # ragged M and N together
], ids=lambda c: f"{c['fmt']}-{c['M']}x{c['K']}x{c['N']}-{c['out']}")
def test_kernel_matches_reference(case, seed):
    _run_case(case, seed)


@draws(2)
@given(case=cases())
def test_kernel_matches_reference_on_drawn_shapes(case, seed):
    _run_case(case, seed)


@pytest.mark.slow
@THOROUGH
@given(case=cases())
def test_kernel_matches_reference_on_many_shapes(case, seed):
    _run_case(case, seed)


def test_int32_accumulation_is_exact_where_float32_is_not(rng):
    """K = 2048 rows of -128 * -128: sums past 2**24, where float32 stops holding every integer;
    odd entries make every sum odd, so a float32 accumulator would round them."""
    K, N = 2048, 16
    x = np.full((3, K), -128, np.int8)
    w = np.full((K, N), -128, np.int8)
    w[0] = rng.integers(-127, 128, N, dtype=np.int8) | 1
    x[:, 0] = 1
    out = wm.w8a8_matmul(jnp.asarray(x), None, jnp.asarray(w), None, block_sizes=BS(16, 16, 256), interpret=INTERPRET)
    want = x.astype(np.int64) @ w.astype(np.int64)
    assert want.min() > 2**24 and (want % 2 == 1).all()
    np.testing.assert_array_equal(out, want)


def test_leading_dims_scalar_scales_and_empty(rng):
    """x (B, T, K) keeps its leading dims; one scale for all rows / columns broadcasts; an empty batch."""
    x, _, w, _ = _inputs(rng, 6, 64, 33, "int8")
    x3 = x.reshape(2, 3, 64)
    out = wm.w8a8_matmul(x3, jnp.float32(0.5), w, jnp.asarray([0.25]), interpret=INTERPRET)
    assert out.shape == (2, 3, 33)
    want = (np.asarray(x, np.int64) @ np.asarray(w, np.int64)) * 0.125
    np.testing.assert_array_equal(np.asarray(out).reshape(6, 33), want.astype(np.float32))
    assert wm.w8a8_matmul(x3[:0], jnp.ones((0, 3)), w, jnp.ones(33), interpret=INTERPRET).shape == (0, 3, 33)


@pytest.mark.parametrize("fmt, static", [("int8", False), ("fp8", False), ("fp8", True)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_pallas_equals_xla(fmt, dtype, static, rng):
    """The dispatch point: impl="pallas" quantises x as the weight says (per token, or fp8's static
    scale) and runs the kernel, and gives the XLA path's result (int8: exactly; fp8: within FP8_TOL).
    M = 37 rows, N = 97."""
    w = jnp.asarray(rng.standard_normal((96, 97)) * 0.05, jnp.float32)
    qw_arrays = af.quantize_columns(w, fmt)
    qw = af.W8A8Weight(*qw_arrays, act_scale=jnp.float32(0.02) if static else None)
    x = jnp.asarray(rng.standard_normal((37, 96)), dtype)
    b = jnp.asarray(rng.standard_normal(97), dtype)
    pallas, xla = linear(x, qw, b, impl="pallas"), linear(x, qw, b, impl="xla")
    assert pallas.dtype == x.dtype
    if fmt == "int8":
        np.testing.assert_array_equal(np.asarray(pallas, np.float32), np.asarray(xla, np.float32))
    else:
        assert_rows_close(pallas, xla, FP8_TOL[dtype])
    assert_rows_close(xla, x.astype(jnp.float32) @ w + b, 0.05)  # and near the float product


def test_fp8_falls_back_to_the_reference_on_a_card_without_fp8(rng, monkeypatch):
    """On a GPU before sm_89 impl="pallas" runs the XLA numerics for fp8 (and says so); the kernel
    called directly there refuses fp8 with a clear error."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(matmul, "fp8_supported", lambda: False)
    qw = af.W8A8Weight(*af.quantize_columns(jnp.asarray(rng.standard_normal((64, 33)), jnp.float32), "fp8"))
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
    np.testing.assert_array_equal(linear(x, qw, impl="pallas"), af.w8a8_reference(x, qw))
    assert "no FP8 tensor cores" in matmul.fp8_gemm_path()
    monkeypatch.setattr("pallas_kernels.common.capability", lambda: (8, 6))
    xq, xs = af.quantize_rows(x, "fp8")
    with pytest.raises(ValueError, match="float8_e4m3fn GEMM inputs need a GPU of compute capability >= 8.9"):
        wm.w8a8_matmul(xq, xs, qw.qweight, qw.scales)


def test_bad_input_raises_value_error(rng):
    x, xs, w, ws = _inputs(rng, 4, 64, 32, "int8")
    with pytest.raises(ValueError, match="x_q.dtype=float32"):
        wm.w8a8_matmul(x.astype(jnp.float32), xs, w, ws, interpret=True)
    with pytest.raises(ValueError, match="differ"):
        wm.w8a8_matmul(x, xs, w.astype(jnp.float8_e4m3fn), ws, interpret=True)
    with pytest.raises(ValueError, match="do not fit"):
        wm.w8a8_matmul(x[:, :32], xs, w, ws, interpret=True)
    with pytest.raises(ValueError, match="go together"):
        wm.w8a8_matmul(x, xs, w, None, interpret=True)
    with pytest.raises(ValueError, match="x_scale must have shape"):
        wm.w8a8_matmul(x, xs[:2], w, ws, interpret=True)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        wm.w8a8_matmul(x, xs, w, ws[:3], interpret=True)
    with pytest.raises(ValueError, match="out_dtype=int32"):
        wm.w8a8_matmul(x, xs, w, ws, out_dtype=jnp.int32, interpret=True)
    with pytest.raises(ValueError, match="block_sizes.block_k=16"):
        wm.w8a8_matmul(x, xs, w, ws, block_sizes=BS(block_k=16), interpret=True)
