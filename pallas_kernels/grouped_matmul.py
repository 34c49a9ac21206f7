"""Grouped matmul for mixtures of experts (megablox style): rows of x sorted by group, group g's
rows multiplied by w[g].

y[r] = x[r] @ w[g(r)] for rows r of group g(r): group 0 holds the first group_sizes[0] rows, group
1 the next group_sizes[1], and so on (`jax.lax.ragged_dot`'s contract; rows past the sum of the
sizes give zeros). The wrapper lays the rows out with each group padded to a multiple of block_m
(a scatter of x into a zero buffer, static size M + E * (block_m - 1) rounded up), so that every
row tile belongs to one group; `tile_group` (one int32 per tile) says which. The kernel runs over
(row tiles, column tiles): it reads its tile's group, then loops over K in steps of block_k,
loading x's (block_m, block_k) tile and w[group]'s (block_k, block_n) tile (the expert index is a
value read at run time, like the page ids of the paged attention kernels) and accumulates in
float32; the output is gathered back to the caller's row order. An empty group has no tile.

Padding: K and N to multiples of block_k / block_n (zeros: they add nothing). Wasted work: at most
block_m - 1 padding rows per group.

`grouped_quant_matmul` is the same over int8 / int4 experts stored as pallas_kernels.quant_matmul
stores one weight (uint8 codes, per-group scales, optional zero points and Q4_1-style mins), each
array with a leading expert axis: every row tile reads its group's packed tiles and dequantises
them in registers with quant_matmul's own kernel body, over views of the refs at its group
(`ref.at[group]`), so the experts are never dequantised in memory.

Axes: M rows, K input features, N output features, E groups (experts), T row tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import MIN_DOT, CompilerParams, pad_axis, round_up
from pallas_kernels.quant_matmul import BITS, _fit, _implicit_zero, _quant_matmul_kernel


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles (powers of two, at least 16) and Triton launch parameters (untuned guesses)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2


def _kernel(tile_group_ref, x_ref, w_ref, o_ref, *, block_k: int, num_k: int):
    """One (block_m, block_n) output tile: x's row tile times its group's weight columns."""
    group = tile_group_ref[0]
    x_dtype = x_ref.dtype

    def step(kb, acc):
        cols = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
        x = x_ref[:, cols]  # (block_m, block_k)
        w = w_ref[group, cols, :].astype(x_dtype)  # (block_k, block_n)
        return acc + lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                                     precision=lax.Precision.HIGHEST)

    acc = lax.fori_loop(0, num_k, step, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def layout(group_sizes: jax.Array, M: int, block_m: int) -> tuple[jax.Array, jax.Array, int]:
    """(dest (M,): each row's place in the padded layout, tile_group (T,): each row tile's group,
    the padded row count T * block_m). Rows past the sum of the sizes go to a last tile of their
    own, whose output is discarded."""
    E = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    padded = (sizes + block_m - 1) // block_m * block_m
    starts, padded_starts = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded  # (E,)
    rows = jnp.arange(M, dtype=jnp.int32)
    group = jnp.searchsorted(jnp.cumsum(sizes), rows, side="right").astype(jnp.int32)  # (M,) E past the sum
    inside = group < E
    g = jnp.minimum(group, E - 1)
    Mp = round_up(M + E * (block_m - 1), block_m) + block_m  # the last tile: rows past the sum
    dest = jnp.where(inside, padded_starts[g] + rows - starts[g], Mp - block_m + rows % block_m)
    tile_start = jnp.arange(Mp // block_m, dtype=jnp.int32) * block_m
    tile_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), tile_start, side="right"), E - 1)
    return dest, tile_group.astype(jnp.int32), Mp


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def grouped_matmul(
    x: jax.Array,  # (M, K), rows sorted by group
    w: jax.Array,  # (E, K, N)
    group_sizes: jax.Array,  # (E,) int32
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:  # (M, N), x.dtype
    """x's rows of group g times w[g], accumulated in float32 (module docstring)."""
    _check(x, w, group_sizes)
    M, K = x.shape
    E, _, N = w.shape
    bs = block_sizes or BlockSizes()
    if any(b < MIN_DOT or b & (b - 1) for b in (bs.block_m, bs.block_n, bs.block_k)):
        raise ValueError(f"{bs}: block sizes must be powers of two >= {MIN_DOT}")
    block_n = min(bs.block_n, max(MIN_DOT, pl.next_power_of_2(N)))
    block_k = min(bs.block_k, max(MIN_DOT, pl.next_power_of_2(K)))
    Kp, Np = round_up(K, block_k), round_up(N, block_n)
    dest, tile_group, Mp = layout(group_sizes, M, bs.block_m)
    xp = jnp.zeros((Mp, Kp), x.dtype).at[dest, :K].set(x)
    wp = pad_axis(pad_axis(w, 1, Kp), 2, Np)
    kernel = functools.partial(_kernel, block_k=block_k, num_k=Kp // block_k)
    out = pl.pallas_call(
        kernel,
        grid=(Mp // bs.block_m, Np // block_n),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j: (i,)),  # tile_group
            pl.BlockSpec((bs.block_m, Kp), lambda i, j: (i, 0)),  # x's row tile, every column
            pl.BlockSpec((E, Kp, block_n), lambda i, j: (0, 0, j)),  # every group's column tile
        ],
        out_specs=pl.BlockSpec((bs.block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), x.dtype),
        compiler_params=CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="grouped_matmul",
    )(tile_group, xp, wp)
    total = jnp.sum(group_sizes)
    return jnp.where((jnp.arange(M) < total)[:, None], out[dest, :N], 0).astype(x.dtype)


def _check(x, w, group_sizes):
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be (M, K) and w (E, K, N) with the same K, got {x.shape} and {w.shape}")
    if group_sizes.shape != (w.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integer (E,)=({w.shape[0]},), got {group_sizes.dtype} "
                         f"{group_sizes.shape}")


def reference(x, w, group_sizes, *, block_sizes=None, interpret=False):
    """grouped_matmul in plain jnp: each row times its group's weight (a gather of w per row), in
    float32 at HIGHEST precision, rows past the sum of the sizes zero."""
    del block_sizes, interpret
    M = x.shape[0]
    ends = jnp.cumsum(group_sizes)
    group = jnp.searchsorted(ends, jnp.arange(M), side="right")
    inside = group < w.shape[0]
    wr = w[jnp.minimum(group, w.shape[0] - 1)].astype(jnp.float32)  # (M, K, N)
    y = jnp.einsum("MK,MKN->MN", x.astype(jnp.float32), wr, precision="highest")
    return jnp.where(inside[:, None], y, 0).astype(x.dtype)


# --- int8 / int4 experts, dequantised in the kernel ----------------------------------------------


def _quant_kernel(tile_group_ref, x_ref, x_hi_ref, q_ref, scales_ref, zeros_ref, mins_ref, o_ref, **static):
    """One row tile: quant_matmul's kernel body over the views of its group's expert."""
    group = tile_group_ref[0]
    at = lambda ref: None if ref is None else ref.at[group]
    _quant_matmul_kernel(x_ref, x_hi_ref, at(q_ref), at(scales_ref), at(zeros_ref), at(mins_ref), o_ref,
                         steps_per_split=0, num_splits=1, **static)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "block_sizes", "interpret"))
def grouped_quant_matmul(
    x: jax.Array,  # (M, K), rows sorted by group, columns in the weights' stored row order
    qweight: jax.Array,  # (E, Kp * bits / 8, N) uint8
    scales: jax.Array,  # (E, Kp / group_size, N) float
    zeros: jax.Array | None,  # (E, Kp / group_size, N) uint8, or None: the implicit zero
    mins: jax.Array | None,  # (E, Kp / group_size, N) float, or None
    group_sizes: jax.Array,  # (E,) int32
    *,
    bits: int,
    group_size: int,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:  # (M, N), x.dtype
    """x's rows of group g times dequant(expert g), dequantised in the kernel, accumulated in float32
    (module docstring; the weight's layout is quant_matmul's, without act-order permutations)."""
    _check_quant(x, qweight, scales, zeros, mins, group_sizes, bits, group_size)
    M, K = x.shape
    _, Kw, N = qweight.shape
    Kp = Kw * 8 // bits
    bs = block_sizes or BlockSizes()
    if any(b < MIN_DOT or b & (b - 1) for b in (bs.block_m, bs.block_n, bs.block_k)):
        raise ValueError(f"{bs}: block sizes must be powers of two >= {MIN_DOT}")
    rows_per_group = group_size * bits // 8
    Np, Kw_pad = max(N, MIN_DOT), round_up(Kw, MIN_DOT)  # shapes no real model has: copied, zero-padded
    if (Np, Kw_pad) != (N, Kw):
        G_pad = -(-Kw_pad // rows_per_group)
        pad = lambda a, rows: None if a is None else pad_axis(pad_axis(a, 2, Np), 1, rows)
        qweight, scales, zeros, mins = pad(qweight, Kw_pad), pad(scales, G_pad), pad(zeros, G_pad), pad(mins, G_pad)
        Kw = Kw_pad
    block_n = min(bs.block_n, 1 << (Np.bit_length() - 1))  # <= Np: the last tile fits
    block_k = _fit(Kw, bs.block_k)
    if rows_per_group % block_k and _fit(rows_per_group, block_k) >= MIN_DOT:
        block_k = _fit(rows_per_group, block_k)  # steps inside one group

    dest, tile_group, Mp = layout(group_sizes, M, bs.block_m)
    xp = jnp.zeros((Mp, Kp), x.dtype).at[dest, :K].set(x)
    if bits == 4:
        x3 = xp.reshape(Mp, Kp // group_size, 2, group_size // 2)  # formats.split_halves
        x_lo, x_hi = x3[:, :, 0, :].reshape(Mp, Kp // 2), x3[:, :, 1, :].reshape(Mp, Kp // 2)
        x_lo, x_hi = pad_axis(x_lo, 1, Kw), pad_axis(x_hi, 1, Kw)  # (Mp, Kw)
    else:
        x_lo, x_hi = pad_axis(xp, 1, Kw), None
    x_spec = pl.BlockSpec((bs.block_m, Kw), lambda i, j: (i, 0))
    whole = lambda a: None if a is None else pl.BlockSpec(a.shape, lambda i, j: (0, 0, 0))
    kernel = functools.partial(_quant_kernel, bits=bits, block_n=block_n, block_k=block_k,
                               rows_per_group=rows_per_group)
    out = pl.pallas_call(
        kernel,
        grid=(Mp // bs.block_m, -(-Np // block_n)),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j: (i,)),  # tile_group
            x_spec,  # x or its low halves
            None if x_hi is None else x_spec,  # high halves
            whole(qweight), whole(scales), whole(zeros), whole(mins),  # every expert; the tile picks one
        ],
        out_specs=pl.BlockSpec((bs.block_m, Np), lambda i, j: (i, 0)),  # the kernel writes its columns
        out_shape=jax.ShapeDtypeStruct((Mp, Np), x.dtype),
        compiler_params=CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="grouped_quant_matmul",
    )(tile_group, x_lo, x_hi, qweight, scales, zeros, mins)
    total = jnp.sum(group_sizes)
    return jnp.where((jnp.arange(M) < total)[:, None], out[dest, :N], 0).astype(x.dtype)


def _check_quant(x, qweight, scales, zeros, mins, group_sizes, bits, group_size):
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not one of {BITS}")
    if qweight.ndim != 3 or qweight.dtype != jnp.uint8:
        raise ValueError(f"qweight must be uint8 (E, Kp * bits / 8, N), got {qweight.dtype} {qweight.shape}")
    E, Kw, N = qweight.shape
    Kp = Kw * 8 // bits
    if group_size < 1 or Kp % group_size or (bits == 4 and group_size % 2):
        raise ValueError(f"group_size={group_size} must divide Kp={Kp}" + (" and be even" if bits == 4 else ""))
    if x.ndim != 2 or not Kp - group_size < x.shape[1] <= Kp:
        raise ValueError(f"x must be (M, K) with Kp - group_size < K <= Kp={Kp}, got {x.shape}")
    for name, a in (("scales", scales), ("zeros", zeros), ("mins", mins)):
        if a is not None and a.shape != (E, Kp // group_size, N):
            raise ValueError(f"{name} must have shape (E, Kp // group_size, N)={(E, Kp // group_size, N)}, "
                             f"got {a.shape}")
    if zeros is not None and zeros.dtype != jnp.uint8:
        raise ValueError(f"zeros must be uint8, got {zeros.dtype}")
    if group_sizes.shape != (E,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integer (E,)=({E},), got {group_sizes.dtype} {group_sizes.shape}")


def dequantize_experts(qweight, scales, zeros, mins, *, bits, group_size, dtype=jnp.float32) -> jax.Array:
    """(E, Kp, N) in stored row order, each value dequantised in float32 and rounded to dtype (the
    values the kernel multiplies by)."""
    rows_per_group = group_size * bits // 8
    scale = jnp.repeat(scales.astype(jnp.float32), rows_per_group, axis=1)  # (E, Kw, N)
    zero = (float(_implicit_zero(bits, mins is not None)) if zeros is None
            else jnp.repeat(zeros.astype(jnp.float32), rows_per_group, axis=1))
    offset = 0.0 if mins is None else jnp.repeat(mins.astype(jnp.float32), rows_per_group, axis=1)
    deq = lambda q: ((q.astype(jnp.float32) - zero) * scale + offset).astype(dtype)
    if bits == 8:
        return deq(qweight)
    E, Kw, N = qweight.shape
    lo = deq(qweight & 0xF).reshape(E, Kw // rows_per_group, 1, rows_per_group, N)  # first halves of the groups
    hi = deq(qweight >> 4).reshape(E, Kw // rows_per_group, 1, rows_per_group, N)
    return jnp.concatenate([lo, hi], axis=2).reshape(E, 2 * Kw, N)


def quant_reference(x, qweight, scales, zeros, mins, group_sizes, *, bits, group_size, block_sizes=None,
                    interpret=False):
    """grouped_quant_matmul in plain jnp: the experts dequantised (dequantize_experts, in x's dtype),
    then `reference`."""
    del block_sizes, interpret
    w = dequantize_experts(qweight, scales, zeros, mins, bits=bits, group_size=group_size, dtype=x.dtype)
    return reference(pad_axis(x, 1, w.shape[1]), w, group_sizes)
