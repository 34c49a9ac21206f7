"""Decode attention over paged KV: one new query token per sequence, split-K (flash-decoding).

Each program takes one sequence b, one kv head and one split of that sequence's key blocks, and
processes all G = N // K query heads of the kv group together (GQA packing: a (G, H) query tile,
padded to 16 rows for the tensor-core dot), so every K/V page is read from memory once per group.
It writes an unnormalised partial output with its running max and sum; a small jnp step merges
the splits with a log-sum-exp combine. The splits divide each sequence's own length, so short
and long sequences in one batch both keep every split busy.

The query of sequence b sits at position lengths[b] - 1 and is already written into the pages;
key j is visible iff j < lengths[b] and (window == 0 or lengths[b] - 1 - j < window).
Pages may be bfloat16, float16 or float32, or int8 / float8_e4m3fn with per-token scales
(K, P, page_size) that the kernel applies in float32 (x.astype(f32) * scale): the key scale
multiplies the scores of its token, the value scale the probability that weights its token.

Latent pages (multi-head latent attention, DeepSeek): with v_pages None and `values` = C, each
key row is [latent (C), rotated key (R)] and its values are its first C columns: the kernel reads
each page once, for the scores and for the weighted sum (one kv head shared by all N query heads,
queries already taken into latent space), and returns (B, N, C).

Axes: B batch, N query heads, K kv heads, G = N // K, H head dim, P physical pages,
page_size tokens per page.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (
    LOG2_E, MASKED, MIN_DOT, CompilerParams, check_fp8_supported, check_page_scales, check_sinks, check_softcap,
    dequantize_pages, pad_axis, round_up, sink_softmax, soft_cap, tile_bytes, tuned,
)



@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """pages_per_block: pages per inner step (a key block; a power of two, raised to reach
    16 tokens). num_splits: programs sharing one sequence's keys (split-K)."""

    pages_per_block: int = 4
    num_splits: int = 8
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def default(cls, batch: int, num_kv_heads: int, max_pages: int, page_size: int, head_dim: int = 128,
                dtype=jnp.bfloat16, capability: tuple[int, int] | None | str = "current") -> "BlockSizes":
        """Key blocks of about `tokens_per_block` tokens; enough splits that the grid reaches
        about `target_programs` programs to keep a GPU's memory system busy, capped at `max_splits`
        so the float32 partials stay small next to the pages (tuned.json, by the card and the
        pages' head dim / dtype class as flash attention's; H100, B=32 K=8 L=4096: 8 splits of
        4-page blocks read 2.2 TB/s, 2 splits of 8-page blocks 1.7 TB/s; B=1 L=32768: 32 splits of
        8-page blocks 1.63 TB/s in two runs, 64 splits of 4-page blocks 1.69 and 1.29)."""
        t = tuned("paged_attention", capability)
        t = t[cls.shape_class(head_dim, dtype)]
        pages_per_block = min(max(t["tokens_per_block"] // page_size, 1), pl.next_power_of_2(max_pages))
        blocks = -(-max_pages // pages_per_block)
        want = -(-t["target_programs"] // (batch * num_kv_heads))
        num_splits = min(pl.next_power_of_2(want), pl.next_power_of_2(blocks), t["max_splits"])
        return cls(pages_per_block=pages_per_block, num_splits=num_splits, num_warps=t["num_warps"],
                   num_stages=t["num_stages"])

    @staticmethod
    def shape_class(head_dim: int, dtype) -> str:
        """The tuned.json key of the pages: "h128" | "h256" by head dim (2-byte or quantised
        pages), "float32" | "float32_h256" for float32 pages."""
        if jnp.dtype(dtype) == jnp.float32:
            return "float32" if head_dim <= 128 else "float32_h256"
        return "h128" if head_dim <= 128 else "h256"

    def shared_memory_bytes(self, group: int, head_dim: int, page_size: int, dtype, kv_dtype=None) -> int:
        """Shared memory of the tiles: the (Gp, Hp) query tile once, and num_stages copies of a
        key block's K and V pages (and their scales when quantised)."""
        Gp = max(MIN_DOT, 1 << (group - 1).bit_length())
        Hp = max(MIN_DOT, 1 << (head_dim - 1).bit_length())
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        tokens = max(self.pages_per_block, -(-MIN_DOT // page_size)) * page_size
        scales = 2 * tile_bytes(tokens, jnp.float32) if jnp.dtype(kv_dtype).itemsize == 1 else 0
        return tile_bytes(Gp, Hp, dtype) + self.num_stages * (2 * tile_bytes(tokens, Hp, kv_dtype) + scales)


def _decode_kernel(
    lengths_ref,  # (1,) int32: tokens of this sequence, the new one included
    block_table_ref,  # (max_pages,) int32: logical page -> physical page
    q_ref,  # (Gp, Hp): the query heads of one kv group
    k_ref,  # (P, page_size, Hp)
    v_ref,  # (P, page_size, Hp)
    k_scales_ref,  # (P, page_size) or None
    v_scales_ref,  # (P, page_size) or None
    o_ref,  # (Gp, Hp) float32: unnormalised partial output of this split
    m_ref,  # (Gp,) float32: running max (log2 domain)
    l_ref,  # (Gp,) float32: running sum
    *,
    sm_scale: float,
    softcap: float | None,
    window: int,
    pages_per_block: int,
    num_splits: int,
):
    num_rows, head_dim = q_ref.shape
    page_size = k_ref.shape[1]
    block_k = pages_per_block * page_size
    length = lengths_ref[0]
    n_blocks = lax.div(length + block_k - 1, block_k)
    lo = lax.div(jnp.maximum(length - window, 0), block_k) if window else jnp.int32(0)
    per_split = lax.div(jnp.maximum(n_blocks - lo, 0) + num_splits - 1, num_splits)
    start = lo + pl.program_id(2) * per_split
    end = jnp.minimum(start + per_split, n_blocks)
    q = q_ref[...]  # (Gp, Hp)
    scale = sm_scale if softcap else sm_scale * LOG2_E  # scores live in the log2 domain (after a soft-cap)

    def step(kb, carry):
        acc, m, l = carry  # (Gp, Hp), (Gp,), (Gp,) float32
        pages = block_table_ref[pl.ds(pl.multiple_of(kb * pages_per_block, pages_per_block), pages_per_block)]
        k = k_ref[pages].reshape(block_k, head_dim)  # (block_k, Hp)
        s = lax.dot_general(
            q, k.astype(q.dtype), (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST,
        )  # (Gp, block_k)
        if k_scales_ref is None:
            s = s * scale
        else:
            s = s * (k_scales_ref[pages].reshape(block_k).astype(jnp.float32) * scale)[None, :]
        if softcap:
            s = soft_cap(s, softcap) * LOG2_E
        k_pos = kb * block_k + jnp.arange(block_k, dtype=jnp.int32)  # (block_k,)
        visible = k_pos < length
        if window:
            visible &= length - 1 - k_pos < window
        s = jnp.where(visible[None, :], s, MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])  # (Gp, block_k)
        l = alpha * l + jnp.sum(p, axis=1)
        if v_ref is None:  # latent pages: the values are the key rows themselves (their first columns)
            if k_scales_ref is not None:
                p = p * k_scales_ref[pages].reshape(block_k).astype(jnp.float32)[None, :]
            v = k.astype(q.dtype)
        else:
            if v_scales_ref is not None:
                p = p * v_scales_ref[pages].reshape(block_k).astype(jnp.float32)[None, :]
            v = v_ref[pages].reshape(block_k, head_dim).astype(q.dtype)  # (block_k, Hp)
        pv = lax.dot_general(
            p.astype(q.dtype), v, (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST,
        )  # (Gp, Hp)
        return alpha[:, None] * acc + pv, m_new, l

    carry = (
        jnp.zeros((num_rows, head_dim), jnp.float32),
        jnp.full((num_rows,), MASKED, jnp.float32),
        jnp.zeros((num_rows,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(start, end, step, carry)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _decode(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, sinks, *, window, sm_scale, softcap,
            block_sizes, interpret, values=None):
    """Pads to powers of two, builds the BlockSpecs, runs the split kernel, merges the splits."""
    B, N, H = q.shape
    K, P, page_size, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    G = N // K
    bs = block_sizes or BlockSizes.default(B, K, max_pages, page_size, H, k_pages.dtype)
    sm_scale = H**-0.5 if sm_scale is None else sm_scale

    Gp = max(MIN_DOT, pl.next_power_of_2(G))
    Hp = max(MIN_DOT, pl.next_power_of_2(H))
    pages_per_block = max(bs.pages_per_block, -(-MIN_DOT // page_size))
    num_splits = bs.num_splits
    if pages_per_block & (pages_per_block - 1) or num_splits < 1:
        raise ValueError(f"{bs}: pages_per_block must be a power of two and num_splits >= 1")
    qg = pad_axis(pad_axis(q.reshape(B, K, G, H), 2, Gp), 3, Hp)  # (B, K, Gp, Hp)
    k_pages = pad_axis(k_pages, 3, Hp)
    v_pages = None if v_pages is None else pad_axis(v_pages, 3, Hp)
    v_scales = None if v_pages is None else v_scales
    block_tables = pad_axis(block_tables.astype(jnp.int32), 1, round_up(max_pages, pages_per_block))
    lengths = jnp.minimum(lengths.astype(jnp.int32), max_pages * page_size)

    scalar_spec = pl.BlockSpec((1,), lambda b, h, s: (b,))
    page_spec = pl.BlockSpec((None, P, page_size, Hp), lambda b, h, s: (h, 0, 0, 0))
    scale_spec = pl.BlockSpec((None, P, page_size), lambda b, h, s: (h, 0, 0))
    row_spec = pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (s, b, h, 0))
    kernel = functools.partial(
        _decode_kernel, sm_scale=float(sm_scale), softcap=check_softcap(softcap), window=int(window),
        pages_per_block=pages_per_block, num_splits=num_splits,
    )
    o, m, l = pl.pallas_call(
        kernel,
        grid=(B, K, num_splits),
        in_specs=[
            scalar_spec,  # lengths
            pl.BlockSpec((None, block_tables.shape[1]), lambda b, h, s: (b, 0)),  # block_tables
            pl.BlockSpec((None, None, Gp, Hp), lambda b, h, s: (b, h, 0, 0)),  # q
            page_spec,  # k_pages
            None if v_pages is None else page_spec,  # v_pages (None: latent pages)
            None if k_scales is None else scale_spec,
            None if v_scales is None else scale_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, Gp, Hp), lambda b, h, s: (s, b, h, 0, 0)),  # o
            row_spec,  # m
            row_spec,  # l
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, B, K, Gp, Hp), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, B, K, Gp), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, B, K, Gp), jnp.float32),
        ],
        compiler_params=CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(lengths, block_tables, qg, k_pages, v_pages, k_scales, v_scales)
    if sinks is not None:  # one more split: the sink's logit (log2 domain), sum 1, no value
        m_sink = pad_axis(sinks.astype(jnp.float32).reshape(K, G) * LOG2_E, 1, Gp)  # padded rows: 0, harmless
        m = jnp.concatenate([m, jnp.broadcast_to(m_sink, (1, B, K, Gp))])
        l = jnp.concatenate([l, jnp.ones((1, B, K, Gp), jnp.float32)])
        o = jnp.concatenate([o, jnp.zeros((1, *o.shape[1:]), o.dtype)])
    width = H if values is None else values
    return _combine(o, m, l)[:, :, :G, :width].reshape(B, N, width).astype(q.dtype)


def _combine(o, m, l):
    """Merges split partials (S, B, K, Gp, Hp), (S, B, K, Gp) x2 -> (B, K, Gp, Hp) float32."""
    m_all = jnp.max(m, axis=0)  # (B, K, Gp)
    w = jnp.exp2(m - m_all)  # (S, B, K, Gp); an empty split has l = 0 and o = 0
    l_all = jnp.sum(w * l, axis=0)
    o_all = jnp.sum(w[..., None] * o, axis=0)
    return o_all / jnp.where(l_all > 0, l_all, 1.0)[..., None]  # no visible key: zeros


def _check(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, window, sinks=None, values=None):
    if q.ndim != 3:
        raise ValueError(f"q must be (B, N, H), got shape {q.shape}")
    B, N, H = q.shape
    check_sinks(sinks, N)
    if v_pages is None:  # latent pages: the values are each key row's first `values` columns
        if values is None or not 0 < values <= H:
            raise ValueError(f"latent pages (v_pages None) need values in (0, H={H}], got {values}")
        if v_scales is not None:
            raise ValueError("latent pages take their values' scales from k_scales: v_scales must be None")
        v_pages, v_scales = k_pages, k_scales
    elif values is not None:
        raise ValueError("values is for latent pages (v_pages None)")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k_pages and v_pages must both be (K, P, page_size, H), got {k_pages.shape} and {v_pages.shape}"
        )
    K, P, page_size, H_k = k_pages.shape
    if H_k != H:
        raise ValueError(f"k/v head dim {H_k} must equal q head dim {H}")
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}")
    if page_size & (page_size - 1):
        raise ValueError(f"page_size={page_size} must be a power of two (Triton block shapes)")
    if block_tables.ndim != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be (B, max_pages) with B={B}, got {block_tables.shape}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape (B,)=({B},), got {lengths.shape}")
    if window < 0:
        raise ValueError(f"window must be >= 0 (0 = no window), got {window}")
    check_page_scales(k_pages, v_pages, k_scales, v_scales)


@functools.partial(jax.jit, static_argnames=("window", "sm_scale", "softcap", "block_sizes", "interpret", "values"))
def paged_decode_attention(
    q: jax.Array,  # (B, N, H)
    k_pages: jax.Array,  # (K, P, page_size, H)
    v_pages: jax.Array | None,  # (K, P, page_size, H); None: latent pages (the module docstring)
    block_tables: jax.Array,  # (B, max_pages) int32
    lengths: jax.Array,  # (B,) int32: tokens per sequence, the new one included
    *,
    k_scales: jax.Array | None = None,  # (K, P, page_size) float32, for int8 / fp8 pages
    v_scales: jax.Array | None = None,  # (K, P, page_size) float32
    window: int = 0,
    sm_scale: float | None = None,
    softcap: float | None = None,  # scores soft-capped, cap * tanh(scores / cap), after sm_scale (Gemma 2)
    sinks: jax.Array | None = None,  # (N,) attention sinks: a logit per head beside the scores, no value (gpt-oss)
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    values: int | None = None,  # latent pages: the values are each key row's first `values` columns
) -> jax.Array:  # (B, N, H), or (B, N, values) over latent pages; q.dtype
    """Attention of each sequence's newest token over its pages (split-K, GQA packed)."""
    _check(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, window, sinks, values)
    check_fp8_supported(k_pages.dtype, interpret)
    return _decode(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, sinks, window=window,
                   sm_scale=sm_scale, softcap=softcap, block_sizes=block_sizes, interpret=interpret, values=values)


def reference(
    q, k_pages, v_pages, block_tables, lengths, *, k_scales=None, v_scales=None, window=0,
    sm_scale=None, softcap=None, sinks=None, block_sizes=None, interpret=False, values=None,
):
    """paged_decode_attention in plain jnp: dequantise, gather the pages, dense masked softmax (latent
    pages: the values are the dequantised key rows' first `values` columns)."""
    del block_sizes, interpret
    if v_pages is None:
        v_pages, v_scales = k_pages, k_scales
    B, N, H = q.shape
    K, _, page_size, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    sm_scale = H**-0.5 if sm_scale is None else sm_scale
    k, v = dequantize_pages(k_pages, k_scales), dequantize_pages(v_pages, v_scales)
    k = k[:, block_tables].reshape(K, B, max_pages * page_size, H)  # (K, B, S, H)
    v = v[:, block_tables].reshape(K, B, max_pages * page_size, H)
    qg = q.astype(jnp.float32).reshape(B, K, N // K, H)  # (B, K, G, H)
    s = jnp.einsum("BKGH,KBSH->BKGS", qg, k, precision="highest") * sm_scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    k_pos = jnp.arange(max_pages * page_size)[None, :]  # (1, S)
    visible = k_pos < lengths[:, None]  # (B, S)
    if window:
        visible &= lengths[:, None] - 1 - k_pos < window
    visible = visible[:, None, None, :]  # (B, 1, 1, S)
    s = jnp.where(visible, s, -jnp.inf)
    p = sink_softmax(s, visible, None if sinks is None else sinks.reshape(K, N // K)[None, :, :, None])
    out = jnp.einsum("BKGS,KBSH->BKGH", p, v, precision="highest")
    width = H if values is None else values
    return out[..., :width].reshape(B, N, width).astype(q.dtype)
