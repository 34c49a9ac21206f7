"""Projection formats that round the activations too: W8A8 (int8 or FP8 e4m3 weights and
activations, served by an 8-bit GEMM) and simulated low-bit formats (NVFP4, MXFP4, W4A8, W4A16
with FP8 scales) for accuracy studies. Like `jaxinfer.models.formats`, these are pytrees that
`jaxinfer.models.matmul.linear` dispatches on; the functions here are the numerics every path shares.

W8A8Weight  y = (x_q @ w_q) * x_scale[m] * w_scale[n], the product of 8-bit values accumulated in
            int32 (int8) or float32 (fp8). Weights: one scale per output channel (or one per tensor,
            fp8), max |w| / QMAX. Activations: per token, max |x_m| / QMAX computed on the fly
            (dynamic), or one calibrated scale per projection (static, fp8): x / scale clipped to
            +-QMAX. QMAX is 127 for int8, 448 for e4m3.
SimWeight   simulated ("fake-quant") formats: the weight is rounded to its format when the model is
            quantised and kept dequantised in the model's dtype; the matmul rounds x to `act` first,
            then multiplies in float. Only the numerics are real: there is no memory or speed
            saving, and `nbytes` is what the format would store.

Simulated element formats (x in float32, rounded to the format and back):
  fp4     FP4 e2m1: +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}, round to nearest even, saturating at 6
  nvfp4   blocks of 16 along the reduction axis, each with an e4m3 scale (block max / 6, stored
          relative to a float32 tensor scale: tensor max / (448 * 6)); the tensor is one weight
          matrix, or one token of an activation (so a token's rounding never depends on its batch)
  mxfp4   blocks of 32 with an e8m0 (power-of-two) scale 2**(floor(log2(block max)) - 2), the OCP
          MX rule: the block max lands in [4, 8), and values past 6 times the scale saturate
  int8 / fp8  one scale per token (activations), as W8A8's dynamic activations
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.models import kv_cache

DTYPES = {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn)}
QMAX = {"int8": 127.0, "fp8": 448.0}
FP4_MAX = 6.0
BLOCKS = {"nvfp4": 16, "mxfp4": 32}
ACT_FORMATS = (None, "int8", "fp8", "nvfp4", "mxfp4")


def format_of(dtype) -> str:
    """The format name ("int8" or "fp8") of an 8-bit storage dtype."""
    for name, d in DTYPES.items():
        if jnp.dtype(dtype) == d:
            return name
    raise ValueError(f"dtype={jnp.dtype(dtype)} is not int8 or float8_e4m3fn")


# --- 8-bit values ---------------------------------------------------------------------------------


def quantize_rows(x: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array]:
    """Per-token dynamic quantisation: x (..., K) -> (values (..., K) int8 / e4m3, scales (...) float32),
    one scale per row, max |x| / QMAX (the KV cache's rule, `kv_cache.quantize`)."""
    return kv_cache.quantize(x, DTYPES[fmt])


def quantize_static(x: jax.Array, scale: jax.Array, fmt: str) -> jax.Array:
    """x (..., K) / scale (one calibrated float32 scale), clipped to +-QMAX, rounded to the format."""
    y = jnp.clip(x.astype(jnp.float32) / scale, -QMAX[fmt], QMAX[fmt])
    return (jnp.round(y) if fmt == "int8" else y).astype(DTYPES[fmt])


def quantize_columns(w: jax.Array, fmt: str, per_tensor: bool = False) -> tuple[jax.Array, jax.Array]:
    """w (..., K, N) -> (values (..., K, N), scales (..., N)), one scale per output column, max |w| / QMAX;
    per_tensor: one scale (..., 1) per matrix."""
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=(-2, -1) if per_tensor else -2)  # (...,) or (..., N)
    scale = amax[..., None] if per_tensor else amax
    scale = jnp.where(scale > 0, scale / QMAX[fmt], 1.0)
    y = wf / scale[..., None, :]
    if fmt == "int8":
        y = jnp.clip(jnp.round(y), -QMAX[fmt], QMAX[fmt])
    return y.astype(DTYPES[fmt]), scale


@struct.dataclass
class W8A8Weight:
    """A projection with 8-bit weights that meets 8-bit activations (see the module docstring).

      qweight    (..., K, N) int8 or float8_e4m3fn
      scales     (..., N) float32 per output channel, or (..., 1) one per tensor
      act_scale  (...) float32, one static activation scale per matrix; None: per token, dynamic
    """

    qweight: jax.Array
    scales: jax.Array
    act_scale: jax.Array | None = None

    @property
    def fmt(self) -> str:
        return format_of(self.qweight.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.qweight.shape

    @property
    def nbytes(self) -> int:
        arrays = (self.qweight, self.scales, self.act_scale)
        return sum(a.size * a.dtype.itemsize for a in arrays if a is not None)


def quantize_activations(x: jax.Array, w: W8A8Weight) -> tuple[jax.Array, jax.Array]:
    """x (..., K) -> (8-bit values (..., K), float32 scales (...)) as w's matmul takes them."""
    if w.act_scale is None:
        return quantize_rows(x, w.fmt)
    return quantize_static(x, w.act_scale, w.fmt), jnp.broadcast_to(w.act_scale, x.shape[:-1])


def w8a8_reference(x: jax.Array, w: W8A8Weight) -> jax.Array:
    """x (..., K) @ w -> (..., N) in x.dtype: the XLA path. int8 products summed in int32 (exact);
    e4m3 values cast to float32 and multiplied at HIGHEST precision (a product of two e4m3 values
    is exact in float32), so any backend runs it."""
    xq, xs = quantize_activations(x, w)
    if w.fmt == "int8":
        acc = product("...k,kn->...n", xq, w.qweight, jnp.int32)
    else:
        acc = jnp.einsum("...k,kn->...n", xq.astype(jnp.float32), w.qweight.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
    y = acc.astype(jnp.float32) * xs[..., None] * w.scales.astype(jnp.float32)
    return y.astype(x.dtype)


def product(equation: str, x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """einsum(equation, x, w) accumulated and returned in out_dtype. XLA's CPU backend multiplies
    bfloat16 and int8 operands natively only from two rows up; with one row it converts the whole
    weight first, every call (benchmarks/results/cpu_dots.md, cpu_int8.md). So on the CPU a single
    row that is not float32 is multiplied as two (matmul.dense and W8A8's int8 product use this)."""
    lead = x.shape[:-1]
    if math.prod(lead) == 1 and x.dtype != jnp.float32 and jax.default_backend() == "cpu":
        two = jnp.broadcast_to(x.reshape(1, -1), (2, x.shape[-1]))
        return jnp.einsum(equation, two, w, preferred_element_type=out_dtype)[:1].reshape(*lead, -1)
    return jnp.einsum(equation, x, w, preferred_element_type=out_dtype)


def dequantize_w8a8(w: W8A8Weight, dtype=jnp.float32) -> jax.Array:
    """The dense (..., K, N) weight the 8-bit values stand for."""
    return (w.qweight.astype(jnp.float32) * w.scales[..., None, :]).astype(dtype)


# --- simulated formats ----------------------------------------------------------------------------


def fp4(x: jax.Array) -> jax.Array:
    """x rounded to FP4 e2m1 (nearest, ties to even, saturating at +-6), as float32.

    Rounded on the grid itself (spacing 0.5 below 2, 1 below 4, then 2; dividing by a power of two
    is exact) rather than by converting to float4_e2m1fn: XLA's classic CPU emitters convert
    through an intermediate type and round about 1 value in 6,000 near a midpoint the wrong way."""
    x = x.astype(jnp.float32)
    a = jnp.minimum(jnp.abs(x), FP4_MAX)
    step = jnp.where(a < 2, 0.5, jnp.where(a < 4, 1.0, 2.0))
    return jnp.sign(x) * jnp.round(a / step) * step  # jnp.round: ties to even, the even e2m1 mantissa


def _blocks(x: jax.Array, axis: int, block: int) -> tuple[jax.Array, int]:
    """x with `axis` moved last, zero-padded to whole blocks and split: (..., nb, block); and its length."""
    x = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
    K = x.shape[-1]
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -K % block)])
    return x.reshape(*x.shape[:-1], -1, block), K


def _unblock(xb: jax.Array, K: int, axis: int, dtype) -> jax.Array:
    x = xb.reshape(*xb.shape[:-2], -1)[..., :K]
    return jnp.moveaxis(x, -1, axis).astype(dtype)


def fake_nvfp4(x: jax.Array, axis: int, tensor_axes: tuple[int, ...]) -> jax.Array:
    """x rounded to NVFP4 with blocks of 16 along `axis` and one tensor scale per slice over
    `tensor_axes` (of the original x: (-2, -1) for a weight matrix, (-1,) for each token)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tensor_axes, keepdims=True)
    tensor_scale = jnp.where(amax > 0, amax / (QMAX["fp8"] * FP4_MAX), 1.0)  # float32
    xb, K = _blocks(x / tensor_scale, axis, BLOCKS["nvfp4"])  # (..., nb, 16), in tensor-scale units
    block_scale = jnp.max(jnp.abs(xb), axis=-1, keepdims=True) / FP4_MAX
    block_scale = jnp.minimum(block_scale, QMAX["fp8"]).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    safe = jnp.where(block_scale > 0, block_scale, 1.0)
    return _unblock(fp4(xb / safe) * block_scale, K, axis, jnp.float32) * tensor_scale


def fake_mxfp4(x: jax.Array, axis: int) -> jax.Array:
    """x rounded to MXFP4: blocks of 32 along `axis`, each with a power-of-two (e8m0) scale."""
    xb, K = _blocks(x, axis, BLOCKS["mxfp4"])  # (..., nb, 32)
    amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    exponent = jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 1.0))) - 2  # e2m1's largest exponent is 2
    scale = jnp.ldexp(jnp.float32(1.0), jnp.clip(exponent, -127, 127).astype(jnp.int32))  # exact (exp2 is not)
    return _unblock(fp4(xb / scale) * scale, K, axis, jnp.float32)


def fake_quantize_activation(x: jax.Array, fmt: str | None) -> jax.Array:
    """x (..., K) rounded to an activation format and back, in x.dtype (None: x itself)."""
    if fmt is None:
        return x
    if fmt in DTYPES:
        return kv_cache.fake_quantize(x, DTYPES[fmt])
    if fmt == "nvfp4":
        return fake_nvfp4(x, -1, (-1,)).astype(x.dtype)
    if fmt == "mxfp4":
        return fake_mxfp4(x, -1).astype(x.dtype)
    raise ValueError(f"activation format {fmt!r} is not one of {ACT_FORMATS}")


@struct.dataclass
class SimWeight:
    """A projection in a simulated format (see the module docstring).

      weight   (..., K, N) the weight rounded to its format, dequantised, in the model's dtype
      act      static: the activation format x is rounded to in the matmul (None: x as it is)
      stored   static: bytes the format would store for the whole (stacked) weight, scales included
    """

    weight: jax.Array
    act: str | None = struct.field(pytree_node=False, default=None)
    stored: int = struct.field(pytree_node=False, default=0)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    @property
    def nbytes(self) -> int:
        return self.stored


def sim_reference(x: jax.Array, w: SimWeight) -> jax.Array:
    """x (..., K) rounded to w.act, times the rounded weight, accumulated in float32, in x.dtype."""
    xq = fake_quantize_activation(x, w.act)
    return jnp.einsum("...k,kn->...n", xq, w.weight.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
