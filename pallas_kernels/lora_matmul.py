"""Gathered LoRA matmul for a batch that mixes many adapters (Punica's BGMV and SGMV).

  out[g] = y[g] + scale[i] * (x[g] @ a[i]) @ b[i]     with i = indices[g]; i = -1: out[g] = y[g]

x holds G segments of T tokens, every token of a segment using the segment's adapter slot of the
stacked a (S, D, R) and b (S, R, O). Each of the two stages is one Pallas kernel:
  shrink  v = x @ a[i]                                (G, T, R) float32
  expand  out = y + scale[i] * v.astype(x.dtype) @ b[i]   accumulated in float32, written in y.dtype
and each takes one of two paths:
  BGMV  T = 1 (decode: one adapter per token): one program per token (and output tile), a GEMV by
        multiply-and-reduce in float32 (one row is too small for a tensor-core dot);
  SGMV  T > 1 (prefill: a segment of T tokens per adapter): tiles of block_m rows, each adapter
        tile read once per row tile, tensor-core dots accumulated in float32.
A segment whose index is -1, or whose slot has scale 0, loads no adapter weight: shrink runs zero
steps and expand copies y.

Shapes: D a multiple of 16 (the shrink steps over D in power-of-two blocks that divide it); O >= 16
(the last output tile is shifted left to end at column O, recomputing columns of its neighbour
with the same values, as in quant_matmul); R is zero-padded to a power of two >= 16 by the
wrapper (a copy of a and b every call: jaxinfer.lora's slots are allocated so already); T is
zero-padded to a multiple of block_m (x and y, the activations).

Axes: G segments, T tokens per segment, D input features, R rank (padded), O output features,
S adapter slots.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import MIN_DOT, CompilerParams, pad_axis, round_up, tile_bytes, tuned

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles (powers of two, at least 16) and Triton launch parameters.

    block_m: segment rows per SGMV program (lowered to fit short segments). block_k: input
    features per shrink step (lowered to divide D). block_n: output features per expand program.
    """

    block_m: int = 32
    block_k: int = 128
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def default(cls, tokens_per_segment: int, capability: tuple[int, int] | None | str = "current") -> "BlockSizes":
        """From tuned.json: the "bgmv" entry for T = 1, else "sgmv" (untuned guesses so far)."""
        t = tuned("lora_matmul", capability)
        return cls(**t["bgmv" if tokens_per_segment == 1 else "sgmv"])

    def shared_memory_bytes(self, tokens_per_segment: int, rank: int, dtype) -> int:
        """Shared memory of the larger of the two programs: shrink keeps num_stages copies of a
        K step's x tile and A tile (block_k, R); expand of the B tile (R, block_n) and the
        y tile. BGMV (T = 1) works on one row; R is padded to a power of two >= 16."""
        Rp = max(MIN_DOT, 1 << (rank - 1).bit_length())
        rows = 1 if tokens_per_segment == 1 else self.block_m
        shrink = tile_bytes(rows, self.block_k, dtype) + tile_bytes(self.block_k, Rp, dtype)
        expand = tile_bytes(Rp, self.block_n, dtype) + tile_bytes(rows, self.block_n, dtype)
        return self.num_stages * max(shrink, expand) + tile_bytes(rows, Rp, jnp.float32)


def _out_cols(num_cols: int, block_n: int, axis: int):
    """The output columns of this program (program axis `axis` walks the column tiles); when
    block_n does not divide num_cols the last tile ends at column num_cols, overlapping its
    neighbour."""
    j = pl.program_id(axis)
    if num_cols % block_n == 0:
        return pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
    return pl.ds(jnp.minimum(j * block_n, num_cols - block_n), block_n)


def _dot(a, b):  # (m, k) @ (k, n) -> (m, n) float32
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=lax.Precision.HIGHEST)


def _bgmv_shrink_kernel(
    slot_ref,  # (1,) int32: the token's adapter slot (clamped to >= 0)
    scale_ref,  # (1,) float32: its scale; 0 = no adapter
    x_ref,  # (D,)
    a_ref,  # (S, D, R)
    v_ref,  # (R,) float32
    *,
    block_k: int,
):
    slot = slot_ref[0]
    steps = jnp.where(scale_ref[0] != 0, x_ref.shape[0] // block_k, 0)

    def step(kb, acc):  # acc (R,) float32
        rows = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
        xk = x_ref[rows].astype(jnp.float32)  # (block_k,)
        ak = a_ref[slot, rows, :].astype(jnp.float32)  # (block_k, R)
        return acc + jnp.sum(xk[:, None] * ak, axis=0)

    v_ref[...] = lax.fori_loop(0, steps, step, jnp.zeros(v_ref.shape, jnp.float32))


def _bgmv_expand_kernel(
    slot_ref,  # (1,) int32
    scale_ref,  # (1,) float32
    v_ref,  # (R,) float32
    b_ref,  # (S, R, O)
    y_ref,  # (O,)
    o_ref,  # (O,)
    *,
    block_n: int,
):
    slot, scale = slot_ref[0], scale_ref[0]
    cols = _out_cols(y_ref.shape[0], block_n, axis=1)

    def add(_, acc):  # acc (block_n,) float32
        v = v_ref[...].astype(b_ref.dtype).astype(jnp.float32)  # (R,) rounded as the SGMV dot sees it
        bk = b_ref[slot, :, cols].astype(jnp.float32)  # (R, block_n)
        return acc + scale * jnp.sum(v[:, None] * bk, axis=0)

    out = lax.fori_loop(0, (scale != 0).astype(jnp.int32), add, y_ref[cols].astype(jnp.float32))
    o_ref[cols] = out.astype(o_ref.dtype)


def _sgmv_shrink_kernel(
    slot_ref,  # (1,) int32: the segment's adapter slot (clamped to >= 0)
    scale_ref,  # (1,) float32: its scale; 0 = no adapter
    x_ref,  # (block_m, D): rows of one segment
    a_ref,  # (S, D, R)
    v_ref,  # (block_m, R) float32
    *,
    block_k: int,
):
    slot = slot_ref[0]
    steps = jnp.where(scale_ref[0] != 0, x_ref.shape[1] // block_k, 0)

    def step(kb, acc):  # acc (block_m, R) float32
        rows = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
        return acc + _dot(x_ref[:, rows], a_ref[slot, rows, :].astype(x_ref.dtype))

    v_ref[...] = lax.fori_loop(0, steps, step, jnp.zeros(v_ref.shape, jnp.float32))


def _sgmv_expand_kernel(
    slot_ref,  # (1,) int32
    scale_ref,  # (1,) float32
    v_ref,  # (block_m, R) float32
    b_ref,  # (S, R, O)
    y_ref,  # (block_m, O)
    o_ref,  # (block_m, O)
    *,
    block_n: int,
):
    slot, scale = slot_ref[0], scale_ref[0]
    cols = _out_cols(y_ref.shape[1], block_n, axis=2)

    def add(_, acc):  # acc (block_m, block_n) float32
        return acc + scale * _dot(v_ref[...].astype(b_ref.dtype), b_ref[slot, :, cols])

    out = lax.fori_loop(0, (scale != 0).astype(jnp.int32), add, y_ref[:, cols].astype(jnp.float32))
    o_ref[:, cols] = out.astype(o_ref.dtype)


def _fit(size: int, limit: int) -> int:
    """The largest power of two <= limit that divides size."""
    block = 1
    while block * 2 <= limit and size % (block * 2) == 0:
        block *= 2
    return block


def _segments(scale, indices):
    """Per segment: the slot to read (clamped to >= 0) and its scale (0 for index -1), as (G,)."""
    slots = jnp.maximum(indices.astype(jnp.int32), 0)
    return slots, jnp.where(indices >= 0, scale.astype(jnp.float32)[slots], 0.0)


def _lora_matmul(y, x, a, b, scale, indices, *, block_sizes, interpret):
    """Pads R (and T), picks tiles, builds the BlockSpecs, runs shrink then expand."""
    G, T, D = x.shape
    S, _, R = a.shape
    O = b.shape[2]
    if G == 0 or T == 0:
        return y
    bs = block_sizes or BlockSizes.default(T)
    for field in ("block_m", "block_k", "block_n"):
        value = getattr(bs, field)
        if value < MIN_DOT or value & (value - 1):
            raise ValueError(f"block_sizes.{field}={value} must be a power of two >= {MIN_DOT}")
    Rp = max(MIN_DOT, pl.next_power_of_2(R))
    a, b = pad_axis(a, 2, Rp), pad_axis(b, 1, Rp)  # a no-op for slots allocated at Rp
    slots, seg_scale = _segments(scale, indices)
    block_k = _fit(D, bs.block_k)
    block_n = min(bs.block_n, 1 << (O.bit_length() - 1))  # <= O: the last tile fits
    params = CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)
    full = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))  # noqa: E731

    if T == 1:  # BGMV
        seg = pl.BlockSpec((1,), lambda g, *_: (g,))
        row = lambda n: pl.BlockSpec((None, n), lambda g, *_: (g, 0))  # noqa: E731
        v = pl.pallas_call(
            functools.partial(_bgmv_shrink_kernel, block_k=block_k),
            grid=(G,),
            in_specs=[seg, seg, row(D), full(a.shape)],
            out_specs=row(Rp),
            out_shape=jax.ShapeDtypeStruct((G, Rp), jnp.float32),
            compiler_params=params, interpret=interpret, name="lora_bgmv_shrink",
        )(slots, seg_scale, x.reshape(G, D), a)
        out = pl.pallas_call(
            functools.partial(_bgmv_expand_kernel, block_n=block_n),
            grid=(G, -(-O // block_n)),
            in_specs=[seg, seg, row(Rp), full(b.shape), row(O)],
            out_specs=row(O),
            out_shape=jax.ShapeDtypeStruct((G, O), y.dtype),
            compiler_params=params, interpret=interpret, name="lora_bgmv_expand",
        )(slots, seg_scale, v, b, y.reshape(G, O))
        return out.reshape(G, 1, O)

    block_m = min(bs.block_m, max(MIN_DOT, pl.next_power_of_2(T)))
    Tp = round_up(T, block_m)
    xp, yp = pad_axis(x, 1, Tp), pad_axis(y, 1, Tp)
    seg = pl.BlockSpec((1,), lambda g, *_: (g,))
    tile = lambda n: pl.BlockSpec((None, block_m, n), lambda g, t, *_: (g, t, 0))  # noqa: E731
    v = pl.pallas_call(
        functools.partial(_sgmv_shrink_kernel, block_k=block_k),
        grid=(G, Tp // block_m),
        in_specs=[seg, seg, tile(D), full(a.shape)],
        out_specs=tile(Rp),
        out_shape=jax.ShapeDtypeStruct((G, Tp, Rp), jnp.float32),
        compiler_params=params, interpret=interpret, name="lora_sgmv_shrink",
    )(slots, seg_scale, xp, a)
    out = pl.pallas_call(
        functools.partial(_sgmv_expand_kernel, block_n=block_n),
        grid=(G, Tp // block_m, -(-O // block_n)),
        in_specs=[seg, seg, tile(Rp), full(b.shape), tile(O)],
        out_specs=tile(O),
        out_shape=jax.ShapeDtypeStruct((G, Tp, O), y.dtype),
        compiler_params=params, interpret=interpret, name="lora_sgmv_expand",
    )(slots, seg_scale, v, b, yp)
    return out[:, :T]


def _check(y, x, a, b, scale, indices):
    if x.ndim != 3:
        raise ValueError(f"x must be (G, T, D), got shape {x.shape}")
    G, T, D = x.shape
    if a.ndim != 3 or a.shape[1] != D:
        raise ValueError(f"a must be (S, D, R) with D={D}, got shape {a.shape}")
    S, _, R = a.shape
    if b.ndim != 3 or b.shape[:2] != (S, R):
        raise ValueError(f"b must be (S, R, O) with S={S}, R={R}, got shape {b.shape}")
    O = b.shape[2]
    if y.shape != (G, T, O):
        raise ValueError(f"y must be (G, T, O)={(G, T, O)}, got shape {y.shape}")
    if scale.shape != (S,):
        raise ValueError(f"scale must be (S,)=({S},), got shape {scale.shape}")
    if indices.shape != (G,) or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be an integer (G,)=({G},) array, got {indices.dtype} {indices.shape}")
    dtypes = {jnp.dtype(t.dtype) for t in (y, x, a, b)}
    if len(dtypes) != 1 or not dtypes <= set(_DTYPES):
        raise ValueError(f"y, x, a, b must share one dtype of float32, bfloat16, float16; got "
                         f"{y.dtype}, {x.dtype}, {a.dtype}, {b.dtype}")
    if D % MIN_DOT:
        raise ValueError(f"x.shape[-1]=D={D} must be a multiple of {MIN_DOT}")
    if O < MIN_DOT:
        raise ValueError(f"b.shape[-1]=O={O} must be >= {MIN_DOT}")


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def lora_matmul(
    y: jax.Array,  # (G, T, O): the base projection's output
    x: jax.Array,  # (G, T, D): its input
    a: jax.Array,  # (S, D, R): LoRA A of every slot
    b: jax.Array,  # (S, R, O): LoRA B of every slot
    scale: jax.Array,  # (S,) float32: each slot's alpha / r (or alpha / sqrt(r))
    indices: jax.Array,  # (G,) int32: each segment's slot in [0, S), or -1 for none
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:  # (G, T, O), y.dtype
    """y + scale[i] * (x @ a[i]) @ b[i] per segment, i = indices[segment]; BGMV when T = 1, else SGMV."""
    _check(y, x, a, b, scale, indices)
    return _lora_matmul(y, x, a, b, scale, indices, block_sizes=block_sizes, interpret=interpret)


def reference(y, x, a, b, scale, indices, *, block_sizes=None, interpret=False):
    """lora_matmul in plain jnp (gather + einsum): the XLA path. Each segment's A and B are
    gathered; the products run in float32 at HIGHEST precision (exact for bfloat16 inputs; a CPU
    backend has no bfloat16 x bfloat16 -> float32 dot), the rank-R intermediate is rounded to
    x.dtype as the kernel's expand dot sees it, and y is added in float32."""
    del block_sizes, interpret
    slots, seg_scale = _segments(scale, indices)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    v = jnp.einsum("gtd,gdr->gtr", f32(x), f32(a[slots]), precision=lax.Precision.HIGHEST)  # (G, T, R)
    v = v.astype(x.dtype).astype(jnp.float32)
    delta = jnp.einsum("gtr,gro->gto", v, f32(b[slots]), precision=lax.Precision.HIGHEST)  # (G, T, O)
    return (f32(y) + seg_scale[:, None, None] * delta).astype(y.dtype)
