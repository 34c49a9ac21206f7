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
