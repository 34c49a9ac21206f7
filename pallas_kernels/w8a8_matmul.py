"""W8A8 GEMM: 8-bit activations times 8-bit weights, the rescale fused in the epilogue.

y[m, n] = (sum_k x_q[m, k] w_q[k, n]) * x_scale[m] * w_scale[n] for x_q and w_q both int8 (the
products summed in int32: exact, SmoothQuant's INT8 x INT8 -> INT32 GEMM) or both float8_e4m3fn
(summed in float32, on the FP8 tensor cores of Ada (sm_89) and Hopper (sm_90)). The kernel reads
8-bit tiles, accumulates one (block_m, block_n) tile over K in steps of block_k, and in its
epilogue turns the accumulator into float32, multiplies by the row's and the column's scale and
writes out_dtype. Without scales (both None) it writes the accumulator itself (int32 for int8,
float32 for fp8): how the tests check int32 accumulation bit for bit.

Quantising x (per-token dynamic scales, or one static scale) is the caller's step
(`jaxinfer.models.act_formats.quantize_activations`); `jaxinfer.models.matmul` does it before the call.

One tiled GEMM over the grid (M blocks, N blocks); no split-K (a W8A8 layer earns its keep on
prefill-sized M, where the GEMM is compute-bound). Shapes that are not block multiples: x is
zero-padded to block_m rows; the weight's refs cover all N columns and the last column tile is
shifted left to end at column N (as in quant_matmul: it recomputes columns of its neighbour, with
the same values), so the weight is never copied for N >= 16. Fewer than 16 columns, or K not a
multiple of 32 (Triton's 8-bit dot takes K in steps of 32), make the wrapper copy it, zero-padded.

Axes: M rows of x (leading dims flattened), K input features (Kp padded), N output features.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import MIN_DOT, CompilerParams, check_fp8_supported, pad_axis, round_up, tuned

# Rows of x up to which the decode tiles (16 rows) are taken.
DECODE_MAX_ROWS = 16
# Triton's 8-bit tensor-core dot: K in steps of 32.
MIN_K = 32
_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
_OUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles (powers of two; block_m, block_n >= 16, block_k >= 32) and Triton launch parameters.
    Tiles shrink to fit small inputs."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def default(cls, M: int, capability: tuple[int, int] | None | str = "current") -> "BlockSizes":
        """From tuned.json: 16-row tiles for decode (M <= 16), the prefill tiles otherwise."""
        return cls(**tuned("w8a8_matmul", capability)["decode" if M <= DECODE_MAX_ROWS else "prefill"])

    def shared_memory_bytes(self) -> int:
        """Shared memory of the tiles: num_stages copies of one K step's 8-bit x and weight tiles
        (the row and column scales are read once, in the epilogue)."""
        return self.num_stages * (self.block_m * self.block_k + self.block_k * self.block_n)


def _w8a8_matmul_kernel(
    x_ref,  # (block_m, Kp) int8 / float8_e4m3fn
    xs_ref,  # (block_m, 1) float32 row scales, or None
    w_ref,  # (Kp, N) int8 / float8_e4m3fn
    ws_ref,  # (1, N) float32 column scales, or None
    o_ref,  # (block_m, N): out_dtype, or the accumulator's dtype without scales
    *,
    block_n: int,
    block_k: int,
):
    block_m = x_ref.shape[0]
    Kp, N = w_ref.shape
    if N % block_n == 0:
        col0 = pl.multiple_of(pl.program_id(1) * block_n, block_n)
    else:  # the last tile ends at column N, overlapping its neighbour
        col0 = jnp.minimum(pl.program_id(1) * block_n, N - block_n)
    cols = pl.ds(col0, block_n)
    acc_dtype = jnp.int32 if x_ref.dtype == jnp.int8 else jnp.float32

    def step(kb, acc):  # acc (block_m, block_n)
        rows = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
        return acc + lax.dot_general(x_ref[:, rows], w_ref[rows, cols], (((1,), (0,)), ((), ())),
                                     preferred_element_type=acc_dtype)

    acc = lax.fori_loop(0, Kp // block_k, step, jnp.zeros((block_m, block_n), acc_dtype))
    if xs_ref is None:
        o_ref[:, cols] = acc
    else:  # the epilogue: (block_m, 1) row scales times (1, block_n) column scales
        o_ref[:, cols] = (acc.astype(jnp.float32) * xs_ref[...] * ws_ref[:, cols]).astype(o_ref.dtype)


def _fit(size: int, limit: int) -> int:
    """The largest power of two <= limit that divides size."""
    block = 1
    while block * 2 <= limit and size % (block * 2) == 0:
        block *= 2
    return block


def _w8a8_matmul(x_q, x_scale, w_q, w_scale, *, out_dtype, block_sizes, interpret):
    """Flattens and pads x, broadcasts the scales, picks tiles, builds the BlockSpecs, runs the kernel."""
    *lead, K = x_q.shape
    N = w_q.shape[1]
    M = math.prod(lead)
    scaled = x_scale is not None
    acc_dtype = jnp.int32 if x_q.dtype == jnp.int8 else jnp.float32
    o_dtype = jnp.dtype(out_dtype) if scaled else jnp.dtype(acc_dtype)
    if M == 0:
        return jnp.zeros((*lead, N), o_dtype)
    bs = block_sizes or BlockSizes.default(M)
    for field, least in (("block_m", MIN_DOT), ("block_n", MIN_DOT), ("block_k", MIN_K)):
        value = getattr(bs, field)
        if value < least or value & (value - 1):
            raise ValueError(f"block_sizes.{field}={value} must be a power of two >= {least}")

    Np, Kp = max(N, MIN_DOT), round_up(K, MIN_K)  # shapes no real model has: the weight is copied
    if (Np, Kp) != (N, K):
        w_q = pad_axis(pad_axis(w_q, 1, Np), 0, Kp)
    block_m = min(bs.block_m, max(MIN_DOT, pl.next_power_of_2(M)))
    block_n = min(bs.block_n, 1 << (Np.bit_length() - 1))  # <= Np: the last tile fits
    block_k = _fit(Kp, bs.block_k)
    Mp = round_up(M, block_m)
    x_q = pad_axis(pad_axis(x_q.reshape(M, K), 1, Kp), 0, Mp)  # (Mp, Kp)
    if scaled:
        xs = pad_axis(jnp.broadcast_to(x_scale.astype(jnp.float32), lead).reshape(M, 1), 0, Mp)  # (Mp, 1)
        ws = pad_axis(jnp.broadcast_to(w_scale.astype(jnp.float32), (N,)).reshape(1, N), 1, Np)  # (1, Np)
    else:
        xs = ws = None

    kernel = functools.partial(_w8a8_matmul_kernel, block_n=block_n, block_k=block_k)
    out = pl.pallas_call(
        kernel,
        grid=(Mp // block_m, -(-Np // block_n)),
        in_specs=[
            pl.BlockSpec((block_m, Kp), lambda i, j: (i, 0)),  # x_q
            None if xs is None else pl.BlockSpec((block_m, 1), lambda i, j: (i, 0)),  # row scales
            pl.BlockSpec((Kp, Np), lambda i, j: (0, 0)),  # w_q
            None if ws is None else pl.BlockSpec((1, Np), lambda i, j: (0, 0)),  # column scales
        ],
        out_specs=pl.BlockSpec((block_m, Np), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), o_dtype),
        compiler_params=CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="w8a8_matmul_" + ("int8" if x_q.dtype == jnp.int8 else "fp8"),
    )(x_q, xs, w_q, ws)
    return out[:M, :N].reshape(*lead, N)


def _check(x_q, x_scale, w_q, w_scale, out_dtype, interpret):
    for name, a in (("x_q", x_q), ("w_q", w_q)):
        if jnp.dtype(a.dtype) not in _DTYPES:
            raise ValueError(f"{name}.dtype={a.dtype} is not int8 or float8_e4m3fn")
    if x_q.dtype != w_q.dtype:
        raise ValueError(f"x_q.dtype={x_q.dtype} and w_q.dtype={w_q.dtype} differ")
    if x_q.ndim < 1 or w_q.ndim != 2 or x_q.shape[-1] != w_q.shape[0]:
        raise ValueError(f"x_q (..., K) and w_q (K, N) do not fit: {x_q.shape} and {w_q.shape}")
    if (x_scale is None) != (w_scale is None):
        raise ValueError("x_scale and w_scale go together: both (a scaled output) or neither (the accumulator)")
    if x_scale is not None:
        if x_scale.shape not in (x_q.shape[:-1], ()):
            raise ValueError(f"x_scale must have shape x_q.shape[:-1]={x_q.shape[:-1]} or (), got {x_scale.shape}")
        if w_scale.shape not in ((w_q.shape[1],), (1,), ()):
            raise ValueError(f"w_scale must have shape (N,)=({w_q.shape[1]},), (1,) or (), got {w_scale.shape}")
        if jnp.dtype(out_dtype) not in _OUT_DTYPES:
            raise ValueError(f"out_dtype={jnp.dtype(out_dtype)} is not one of float32, bfloat16, float16")
    check_fp8_supported(x_q.dtype, interpret, "GEMM inputs", "run the reference (jaxinfer.models.matmul falls back to it)")


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret"))
def w8a8_matmul(
    x_q: jax.Array,  # (..., K) int8 / float8_e4m3fn
    x_scale: jax.Array | None,  # (...) float32 per row, or () one for all; None: no rescale
    w_q: jax.Array,  # (K, N) x_q's dtype
    w_scale: jax.Array | None,  # (N,) float32 per column, or (1,) / () one for all; None with x_scale
    *,
    out_dtype=jnp.float32,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:  # (..., N) out_dtype; without scales the accumulator (int32 / float32)
    """(x_q @ w_q) * x_scale[..., None] * w_scale, accumulated in int32 (int8) or float32 (fp8)."""
    _check(x_q, x_scale, w_q, w_scale, out_dtype, interpret)
    return _w8a8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=jnp.dtype(out_dtype), block_sizes=block_sizes,
                        interpret=interpret)


def reference(x_q, x_scale, w_q, w_scale, *, out_dtype=jnp.float32, block_sizes=None, interpret=False):
    """w8a8_matmul in plain jnp: int8 products summed by an int32 einsum; e4m3 values cast to
    float32 and multiplied at HIGHEST precision (exact products, float32 sums); the same epilogue."""
    del block_sizes, interpret
    if x_q.dtype == jnp.int8:
        acc = jnp.einsum("...k,kn->...n", x_q, w_q, preferred_element_type=jnp.int32)
    else:
        acc = jnp.einsum("...k,kn->...n", x_q.astype(jnp.float32), w_q.astype(jnp.float32),
                         precision=lax.Precision.HIGHEST)
    if x_scale is None:
        return acc
    y = acc.astype(jnp.float32) * x_scale.astype(jnp.float32)[..., None] * w_scale.astype(jnp.float32)
    return y.astype(out_dtype)
