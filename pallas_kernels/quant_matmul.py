"""Weight-only int8 / int4 matmul that dequantises the packed weight in registers.

y = x @ W for a weight stored as in `jaxinfer.models.formats` (uint8 qweight, one scale per group
of `group_size` stored rows and output column, optional uint8 zero points, optional act-order
permutation, optional float per-group offsets `mins` (llama.cpp's Q4_1), padding rows Kp >= K).
The wrapper gathers x's columns by perm, zero-pads them to Kp and, for 4 bits, splits them into
the halves that meet the low and high nibbles (the rule of `format.split_halves`). The kernel
reads uint8 tiles, unpacks nibbles with `& 0xF` and `>> 4`, dequantises in float32,
(q - zero) * scale (+ min), casts to x's dtype and accumulates a dot in float32. Without zero
points the zero is 2**(bits-1), or 0 when there are mins (the rule of `formats.implicit_zero`).

Both paths run one kernel over the grid (M blocks, N blocks, K splits), each program looping over
its K slice in steps of `block_k` packed rows:
  decode  (M <= 16): block_m = 16 and split-K, so a GEMV launches enough programs to fill the GPU;
          every split writes a float32 partial (splits, 16, N), summed afterwards in jnp.
  prefill (M > 16): a tiled GEMM, one split, the output written in x's dtype.
A step never straddles a scale group when `block_k` divides the packed rows of a group (block_k
is lowered to make it so, down to 16); for groups narrower than that (8 bits: g % 16 != 0,
4 bits: g % 32 != 0) the step gathers one scale row per packed row instead.

Shapes that are not block multiples: x is zero-padded to block_m rows; the weight is never
padded or copied for N >= 16: its refs cover all N columns and the last column tile is shifted
left to end at column N (it recomputes columns of its neighbour, with the same values), so no
load or store leaves the arrays (the Triton backend does not mask edge blocks). Two shapes no
real model has make the wrapper copy the weight every call, zero-padded: fewer than 16 columns
(the smallest tensor-core dot) are padded to 16, and packed rows Kp * bits / 8 that are not a
multiple of 16 are padded to one (with the scales, zeros and mins to whole groups past them).

Axes: M rows of x (leading dims flattened), K input features, Kp padded K, Kw = Kp * bits / 8
stored (packed) rows, N output features, g group size, G = Kp / g groups.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import MIN_DOT, CompilerParams, pad_axis, round_up, tile_bytes, tuned

BITS = (4, 8)
# Rows of x up to which the decode (split-K) path is taken.
DECODE_MAX_ROWS = 16
_X_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles (powers of two, at least 16) and Triton launch parameters.

    block_m: rows of x per program. block_n: output columns per program. block_k: packed weight
    rows per inner step (lowered to fit the scale groups). num_splits: programs sharing one
    output tile's K range (split-K); 1 writes the output directly. Tiles shrink to fit small inputs.
    """

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def default(cls, M: int, N: int, Kw: int, dtype=jnp.bfloat16,
                capability: tuple[int, int] | None | str = "current") -> "BlockSizes":
        """From tuned.json. Decode shape (M <= 16): 16-row tiles, narrow column tiles, split-K up
        to about `target_programs` programs (about two per SM on an H100's 132), at most
        `max_splits` (each split adds a float32 partial of (16, N) to write and read back: 4096 x
        14336 int4, 2 splits: 1.8 MB per 30 MB of weight). Prefill: one tiled GEMM. float32 runs
        exact (IEEE) dots on CUDA cores, which Triton unrolls: 32-wide tiles keep its compile time
        short. Untuned guesses so far: see --sweep in experiments/bench_quant_matmul.py."""
        t = tuned("quant_matmul", capability)
        f32 = "_float32" if jnp.dtype(dtype) == jnp.float32 else ""
        if M <= DECODE_MAX_ROWS:
            d = t["decode" + f32]
            n_blocks = -(-N // d["block_n"])
            steps = max(Kw // d["block_k"], 1)
            want = -(-d["target_programs"] // n_blocks)
            num_splits = min(pl.next_power_of_2(want), d["max_splits"], pl.next_power_of_2(steps))
            return cls(block_m=DECODE_MAX_ROWS, block_n=d["block_n"], block_k=d["block_k"], num_splits=num_splits,
                       num_warps=d["num_warps"], num_stages=d["num_stages"])
        return cls(num_splits=1, **t["prefill" + f32])

    def shared_memory_bytes(self, bits: int, dtype, group_size: int = 32, mins: bool = False) -> int:
        """Shared memory of the tiles: num_stages copies of one K step's x tile (two halves for
        4 bits), packed weight tile, and the scale / zero (or min) rows of the groups it spans."""
        per_byte = 2 if bits == 4 else 1
        groups = max(self.block_k // max(group_size // per_byte, 1), 1)
        x = per_byte * tile_bytes(self.block_m, self.block_k, dtype)
        w = tile_bytes(self.block_k, self.block_n, jnp.uint8)
        group_rows = tile_bytes(groups, self.block_n, dtype) + tile_bytes(groups, self.block_n,
                                                                          dtype if mins else jnp.uint8)
        return self.num_stages * (x + w + group_rows)


def _implicit_zero(bits: int, has_mins: bool) -> int:
    """The zero point when no zeros are stored: 0 with mins, else 2**(bits-1)."""
    return 0 if has_mins else 2 ** (bits - 1)


def _quant_matmul_kernel(
    x_ref,  # (block_m, Kw): x in stored row order (8 bits), or its low halves (4 bits)
    x_hi_ref,  # (block_m, Kw): x's high halves (4 bits); None for 8 bits
    q_ref,  # (Kw, N) uint8: stored weight (two 4-bit values a byte for 4 bits)
    scales_ref,  # (G, N) float: one scale per group of rows_per_group packed rows
    zeros_ref,  # (G, N) uint8 zero points, or None: the implicit zero
    mins_ref,  # (G, N) float per-group offsets, or None
    o_ref,  # (block_m, N): output rows (float32 partial of this split when split)
    *,
    bits: int,
    block_n: int,
    block_k: int,
    rows_per_group: int,
    steps_per_split: int,
    num_splits: int,
):
    block_m = x_ref.shape[0]
    Kw, N = q_ref.shape
    num_steps = Kw // block_k
    if N % block_n == 0:
        col0 = pl.multiple_of(pl.program_id(1) * block_n, block_n)
    else:  # the last tile ends at column N, overlapping its neighbour
        col0 = jnp.minimum(pl.program_id(1) * block_n, N - block_n)
    cols = pl.ds(col0, block_n)
    grouped = rows_per_group % block_k == 0

    def dequantise(q, zero, scale, offset):  # (block_k, block_n) integers -> x's dtype
        w = (q.astype(jnp.float32) - zero) * scale
        return (w if offset is None else w + offset).astype(x_ref.dtype)

    def dot(a, b):  # (block_m, block_k) @ (block_k, block_n) -> (block_m, block_n) float32
        return lax.dot_general(
            a, b, (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST,
        )

    def step(kb, acc):  # acc (block_m, block_n) float32
        k0 = pl.multiple_of(kb * block_k, block_k)
        rows = pl.ds(k0, block_k)
        if grouped:  # the whole step lies in one group: one scale row, broadcast
            groups = pl.ds(lax.div(k0, rows_per_group), 1)
        else:  # a scale row per packed row
            groups = lax.div(k0 + jnp.arange(block_k, dtype=jnp.int32), rows_per_group)  # (block_k,)
        scale = scales_ref[groups, cols].astype(jnp.float32)  # (1 or block_k, block_n)
        if zeros_ref is None:
            zero = float(_implicit_zero(bits, mins_ref is not None))
        else:
            zero = zeros_ref[groups, cols].astype(jnp.float32)  # (1 or block_k, block_n)
        offset = None if mins_ref is None else mins_ref[groups, cols].astype(jnp.float32)  # (1 or block_k, block_n)
        q = q_ref[rows, cols]  # (block_k, block_n) uint8
        if bits == 8:
            return acc + dot(x_ref[:, rows], dequantise(q, zero, scale, offset))
        lo = dequantise(q & 0xF, zero, scale, offset)  # rows of the first halves of the groups
        hi = dequantise(q >> 4, zero, scale, offset)  # rows of the second halves
        return acc + dot(x_ref[:, rows], lo) + dot(x_hi_ref[:, rows], hi)

    acc = jnp.zeros((block_m, block_n), jnp.float32)
    if num_splits == 1:
        acc = lax.fori_loop(0, num_steps, step, acc)
    else:
        start = pl.program_id(2) * steps_per_split
        acc = lax.fori_loop(start, jnp.minimum(start + steps_per_split, num_steps), step, acc)
    o_ref[:, cols] = acc.astype(o_ref.dtype)


def _fit(size: int, limit: int) -> int:
    """The largest power of two <= limit that divides size."""
    block = 1
    while block * 2 <= limit and size % (block * 2) == 0:
        block *= 2
    return block


def _quant_matmul(x, qweight, scales, zeros, perm, mins, *, bits, group_size, block_sizes, interpret):
    """Prepares x (perm, pad, halves), picks tiles, builds the BlockSpecs, runs the kernel."""
    *lead, K = x.shape
    Kw, N = qweight.shape
    Kp = Kw * 8 // bits
    M = math.prod(lead)
    if M == 0:
        return jnp.zeros((*lead, N), x.dtype)
    x = x.reshape(M, K)
    if perm is not None:
        x = jnp.take(x, perm, axis=1)
    x = pad_axis(x, 1, Kp)  # (M, Kp)

    bs = block_sizes or BlockSizes.default(M, N, Kw, x.dtype)
    for field in ("block_m", "block_n", "block_k"):
        value = getattr(bs, field)
        if value < MIN_DOT or value & (value - 1):
            raise ValueError(f"block_sizes.{field}={value} must be a power of two >= {MIN_DOT}")
    if bs.num_splits < 1:
        raise ValueError(f"block_sizes.num_splits={bs.num_splits} must be >= 1")

    rows_per_group = group_size * bits // 8
    Np = max(N, MIN_DOT)  # shapes no real model has: the weight is copied, zero-padded
    Kw_pad = round_up(Kw, MIN_DOT)
    G_pad = -(-Kw_pad // rows_per_group)  # the padded rows' groups exist (with zero scales)
    if (Np, Kw_pad) != (N, Kw):
        qweight = pad_axis(pad_axis(qweight, 1, Np), 0, Kw_pad)
        scales = pad_axis(pad_axis(scales, 1, Np), 0, G_pad)
        zeros = None if zeros is None else pad_axis(pad_axis(zeros, 1, Np), 0, G_pad)
        mins = None if mins is None else pad_axis(pad_axis(mins, 1, Np), 0, G_pad)
        Kw = Kw_pad
    block_m = min(bs.block_m, max(MIN_DOT, pl.next_power_of_2(M)))
    block_n = min(bs.block_n, 1 << (Np.bit_length() - 1))  # <= Np: the last tile fits
    block_k = _fit(Kw, bs.block_k)
    if rows_per_group % block_k and _fit(rows_per_group, block_k) >= MIN_DOT:
        block_k = _fit(rows_per_group, block_k)  # steps inside one group
    num_steps = Kw // block_k
    num_splits = min(bs.num_splits, num_steps)
    steps_per_split = -(-num_steps // num_splits)
    num_splits = -(-num_steps // steps_per_split)  # no split left empty

    Mp = round_up(M, block_m)
    x = pad_axis(x, 0, Mp)  # (Mp, Kp)
    if bits == 4:
        x3 = x.reshape(Mp, Kp // group_size, 2, group_size // 2)  # format.split_halves
        x_lo, x_hi = x3[:, :, 0, :].reshape(Mp, Kp // 2), x3[:, :, 1, :].reshape(Mp, Kp // 2)
        x_lo, x_hi = pad_axis(x_lo, 1, Kw), pad_axis(x_hi, 1, Kw)  # (Mp, Kw)
    else:
        x_lo, x_hi = pad_axis(x, 1, Kw), None  # (Mp, Kw)

    grid = (Mp // block_m, -(-Np // block_n), num_splits)
    x_spec = pl.BlockSpec((block_m, Kw), lambda i, j, s: (i, 0))
    group_spec = pl.BlockSpec(scales.shape, lambda i, j, s: (0, 0))
    if num_splits == 1:
        out_spec = pl.BlockSpec((block_m, Np), lambda i, j, s: (i, 0))
        out_shape = jax.ShapeDtypeStruct((Mp, Np), x.dtype)
    else:
        out_spec = pl.BlockSpec((None, block_m, Np), lambda i, j, s: (s, i, 0))
        out_shape = jax.ShapeDtypeStruct((num_splits, Mp, Np), jnp.float32)
    kernel = functools.partial(
        _quant_matmul_kernel, bits=bits, block_n=block_n, block_k=block_k, rows_per_group=rows_per_group,
        steps_per_split=steps_per_split, num_splits=num_splits,
    )
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            x_spec,  # x or its low halves
            None if x_hi is None else x_spec,  # high halves
            pl.BlockSpec((Kw, Np), lambda i, j, s: (0, 0)),  # qweight
            group_spec,  # scales
            None if zeros is None else group_spec,  # zeros
            None if mins is None else group_spec,  # mins
        ],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="quant_matmul" if num_splits == 1 else "quant_matmul_split_k",
    )(x_lo, x_hi, qweight, scales, zeros, mins)
    if num_splits > 1:
        out = jnp.sum(out, axis=0)
    return out[:M, :N].astype(x.dtype).reshape(*lead, N)


def _check(x, qweight, scales, zeros, perm, mins, bits, group_size):
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not one of {BITS}")
    if jnp.dtype(x.dtype) not in _X_DTYPES:
        raise ValueError(f"x.dtype={x.dtype} is not one of float32, bfloat16, float16")
    if x.ndim < 1:
        raise ValueError(f"x must be (..., K), got shape {x.shape}")
    if qweight.ndim != 2 or qweight.dtype != jnp.uint8:
        raise ValueError(f"qweight must be uint8 (Kp * bits / 8, N), got {qweight.dtype} {qweight.shape}")
    Kw, N = qweight.shape
    Kp = Kw * 8 // bits
    if group_size < 1 or Kp % group_size or (bits == 4 and group_size % 2):
        raise ValueError(f"group_size={group_size} must divide Kp={Kp}" + (" and be even" if bits == 4 else ""))
    K = x.shape[-1]
    if not Kp - group_size < K <= Kp:
        raise ValueError(
            f"x.shape[-1]=K={K} does not fit qweight: K must satisfy Kp - group_size < K <= Kp "
            f"(Kp={Kp}, group_size={group_size})"
        )
    if scales.shape != (Kp // group_size, N):
        raise ValueError(f"scales must have shape (Kp // group_size, N)={(Kp // group_size, N)}, got {scales.shape}")
    if zeros is not None and (zeros.shape != scales.shape or zeros.dtype != jnp.uint8):
        raise ValueError(f"zeros must be uint8 {scales.shape} or None, got {zeros.dtype} {zeros.shape}")
    if perm is not None and (perm.shape != (K,) or not jnp.issubdtype(perm.dtype, jnp.integer)):
        raise ValueError(f"perm must be an integer (K,)=({K},) array or None, got {perm.dtype} {perm.shape}")
    if mins is not None and (mins.shape != scales.shape or not jnp.issubdtype(mins.dtype, jnp.floating)):
        raise ValueError(f"mins must be a float {scales.shape} array (scales' shape) or None, "
                         f"got {mins.dtype} {mins.shape}")


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "block_sizes", "interpret"))
def quant_matmul(
    x: jax.Array,  # (..., K) float32 / bfloat16 / float16
    qweight: jax.Array,  # (Kp * bits / 8, N) uint8
    scales: jax.Array,  # (Kp / group_size, N) float
    zeros: jax.Array | None = None,  # (Kp / group_size, N) uint8, or None: the implicit zero
    perm: jax.Array | None = None,  # (K,) int32: stored row i holds input row perm[i]
    mins: jax.Array | None = None,  # (Kp / group_size, N) float offsets, or None
    *,
    bits: int,
    group_size: int,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:  # (..., N), x.dtype
    """x @ dequant(qweight), dequantised in the kernel, accumulated in float32."""
    _check(x, qweight, scales, zeros, perm, mins, bits, group_size)
    return _quant_matmul(x, qweight, scales, zeros, perm, mins, bits=bits, group_size=group_size,
                         block_sizes=block_sizes, interpret=interpret)


def reference(x, qweight, scales, zeros=None, perm=None, mins=None, *, bits, group_size, block_sizes=None,
              interpret=False):
    """quant_matmul in plain jnp: each nibble plane dequantised in float32 (scales repeated per
    packed row), rounded to x.dtype, and met by the x columns it multiplies (chosen by index).
    The products run in float32 at HIGHEST precision, where x.dtype's products are exact (a CPU
    backend has no bfloat16 x bfloat16 -> float32 dot)."""
    del block_sizes, interpret
    *lead, K = x.shape
    Kw, N = qweight.shape
    Kp = Kw * 8 // bits
    xs = x.reshape(-1, K)
    if perm is not None:
        xs = xs[:, perm]
    xs = jnp.pad(xs, ((0, 0), (0, Kp - K))).astype(jnp.float32)  # (M, Kp) in stored row order
    rows_per_group = group_size * bits // 8
    scale = jnp.repeat(scales.astype(jnp.float32), rows_per_group, axis=0)  # (Kw, N)
    if zeros is None:
        zero = float(_implicit_zero(bits, mins is not None))
    else:
        zero = jnp.repeat(zeros.astype(jnp.float32), rows_per_group, axis=0)  # (Kw, N)
    offset = 0.0 if mins is None else jnp.repeat(mins.astype(jnp.float32), rows_per_group, axis=0)  # (Kw, N)
    if bits == 8:
        planes = [(qweight, jnp.arange(Kp))]
    else:
        r = jnp.arange(Kw)
        first = r // rows_per_group * group_size + r % rows_per_group  # stored row of each low nibble
        planes = [(qweight & 0xF, first), (qweight >> 4, first + rows_per_group)]
    y = jnp.zeros((xs.shape[0], N), jnp.float32)
    for q, rows in planes:
        w = ((q.astype(jnp.float32) - zero) * scale + offset).astype(x.dtype).astype(jnp.float32)  # (Kw, N)
        y = y + jnp.einsum("mk,kn->mn", xs[:, rows], w, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype).reshape(*lead, N)
