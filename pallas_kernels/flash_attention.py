"""Causal flash attention for prefill (FlashAttention-2 forward), dense or reading paged KV.

One program computes one block of `block_q` queries of one query head against all the keys it
may see, streaming key blocks through an online softmax, so the (T, S) score matrix never exists.
Masking is by absolute position: query i of sequence b sits at position q_offsets[b] + i, key j
at position j, and key j is visible iff

    j <= position,  j < kv_lens[b],  and  (window == 0 or position - j < window).

Key blocks that no query of the block can see (above the causal diagonal, past kv_lens, or
below the sliding window) are never loaded; blocks every query sees fully skip the mask.
GQA: query head n reads kv head n // (N // K). A query that sees no key outputs zeros.

Tree attention (speculative decoding's draft trees): with `tree_mask` (B, T, W) int32 the T
queries of a sequence are the nodes of a tree whose K/V sit at positions q_offsets[b] + [0, T),
and query i sees such a key j only where bit j % 32 of word j // 32 of its mask is set (its
ancestors and itself); keys before q_offsets[b] (the committed prefix) stay visible as above.
`pallas_kernels.common.pack_tree_mask` builds the mask from a (B, T, T) boolean matrix.

`paged_flash_attention` reads keys and values through a block table instead (chunked prefill,
prefix-cache hits): a key block is `pages_per_block` whole pages gathered by physical index.

Axes: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim,
P physical pages, page_size tokens per page.
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
    dequantize_pages, gather_pages, pad_axis, round_up, sink_softmax, soft_cap, tile_bytes, tree_visible, tuned,
)

@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters (powers of two).

    block_q: queries per program. block_k: keys per inner step; for paged KV it is rounded to
    whole pages (at least one page). Both shrink to fit short inputs (never below 16).
    """

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    @classmethod
    def default(cls, head_dim: int, dtype=jnp.bfloat16, capability: tuple[int, int] | None | str = "current",
                ) -> "BlockSizes":
        """The tuned entry (tuned.json) for the card (default: the current device's; None:
        interpret mode), by head dim class, or the float32 entry: tiles that fit the card's
        shared memory."""
        entry = tuned("flash_attention", capability)
        return cls(**entry[cls.shape_class(head_dim, dtype)])

    @staticmethod
    def shape_class(head_dim: int, dtype) -> str:
        """The tuned.json key: "h64" | "h128" | "h256" by head dim, "float32" | "float32_h256" for float32."""
        if jnp.dtype(dtype) == jnp.float32:
            return "float32" if head_dim <= 128 else "float32_h256"
        return "h64" if head_dim <= 64 else "h128" if head_dim <= 128 else "h256"

    def shared_memory_bytes(self, head_dim: int, dtype, kv_dtype=None, page_size: int = 16, paged: bool = True) -> int:
        """Shared memory of the tiles: the query block once, and num_stages copies of each key
        block's K and V tiles (and their scales when the pages are quantised): what Triton's
        pipeliner keeps in flight. Paged, a key block is whole pages (at least one)."""
        Hp = max(MIN_DOT, 1 << (head_dim - 1).bit_length())
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        block_k = max(self.block_k // page_size, 1) * page_size if paged else self.block_k
        scales = 2 * tile_bytes(block_k, jnp.float32) if jnp.dtype(kv_dtype).itemsize == 1 else 0
        kv = 2 * tile_bytes(block_k, Hp, kv_dtype) + scales
        return tile_bytes(self.block_q, Hp, dtype) + self.num_stages * kv


def _flash_kernel(
    q_offsets_ref,  # (1,) int32: position of query 0 of this sequence
    kv_lens_ref,  # (1,) int32: keys of this sequence
    block_table_ref,  # paged: (max_pages,) int32 logical page -> physical page; dense: None
    q_ref,  # (block_q, Hp)
    k_ref,  # dense: (S, Hp); paged: (P, page_size, Hp)
    v_ref,  # dense: (S, Hp); paged: (P, page_size, Hp)
    k_scales_ref,  # paged int8 / fp8: (P, page_size) per-token scales; else None
    v_scales_ref,  # paged int8 / fp8: (P, page_size); else None
    tree_mask_ref,  # tree attention: (block_q, Wp) int32 ancestor bitmask words; else None
    sinks_ref,  # attention sinks: (1,) float32 this head's sink logit; else None
    o_ref,  # (block_q, Hp)
    *,
    sm_scale: float,
    softcap: float | None,
    window: int,
    block_k: int,
    pages_per_block: int,
    num_q_blocks: int,
):
    block_q, head_dim = q_ref.shape
    # Heavy (late) query blocks are launched first, so the causal tail does not run alone.
    q_block = num_q_blocks - 1 - pl.program_id(0)
    first_pos = q_offsets_ref[0] + q_block * block_q
    last_pos = first_pos + block_q - 1
    kv_len = kv_lens_ref[0]
    q_pos = first_pos + jnp.arange(block_q, dtype=jnp.int32)[:, None]  # (block_q, 1)
    q = q_ref[...]  # (block_q, Hp)
    # Scores live in the log2 domain: exp(x) = exp2(x * log2 e). A soft-cap is applied before.
    scale = sm_scale if softcap else sm_scale * LOG2_E

    def load_kv(kb):
        """Key block kb: k, v (block_k, Hp) in q's dtype, and their per-token scales or None."""
        if block_table_ref is None:
            rows = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
            return k_ref[rows, :], v_ref[rows, :], None, None
        pages = block_table_ref[pl.ds(pl.multiple_of(kb * pages_per_block, pages_per_block), pages_per_block)]
        k = k_ref[pages].reshape(block_k, head_dim).astype(q.dtype)  # (pages_per_block, page_size, Hp) -> (block_k, Hp)
        v = v_ref[pages].reshape(block_k, head_dim).astype(q.dtype)
        if k_scales_ref is None:
            return k, v, None, None
        return (k, v, k_scales_ref[pages].reshape(block_k).astype(jnp.float32),
                v_scales_ref[pages].reshape(block_k).astype(jnp.float32))

    def step(kb, carry, *, masked: bool):
        acc, m, l = carry  # (block_q, Hp), (block_q,), (block_q,) float32
        k, v, k_scales, v_scales = load_kv(kb)
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST,
        )  # (block_q, block_k)
        s = s * scale if k_scales is None else s * (k_scales * scale)[None, :]
        if softcap:
            s = soft_cap(s, softcap) * LOG2_E
        if masked:
            k_pos = kb * block_k + jnp.arange(block_k, dtype=jnp.int32)[None, :]  # (1, block_k)
            visible = (k_pos <= q_pos) & (k_pos < kv_len)
            if window:
                visible &= q_pos - k_pos < window
            if tree_mask_ref is not None:
                rel = k_pos - q_offsets_ref[0]  # (1, block_k): the key's index in the tree
                in_tree = jnp.zeros((block_q, block_k), jnp.bool_)
                for w in range(tree_mask_ref.shape[1]):
                    word = tree_mask_ref[:, w][:, None]  # (block_q, 1)
                    bit = lax.shift_right_logical(word, jnp.clip(rel - 32 * w, 0, 31)) & 1
                    in_tree |= (bit == 1) & (rel >= 32 * w) & (rel < 32 * (w + 1))
                visible &= (rel < 0) | in_tree
            s = jnp.where(visible, s, MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])  # (block_q, block_k)
        l = alpha * l + jnp.sum(p, axis=1)
        if v_scales is not None:
            p = p * v_scales[None, :]  # a value's scale weights the probability of its token
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST,
        )  # (block_q, Hp)
        return alpha[:, None] * acc + pv, m_new, l

    # Key blocks [lo, hi) hold a key some query of this block sees; [mid_lo, mid_hi) are seen
    # in full by every query (below the diagonal, inside kv_len and the window): no mask there.
    hi = jnp.minimum(lax.div(kv_len + block_k - 1, block_k), lax.div(last_pos + block_k, block_k))
    mid_hi = jnp.minimum(lax.div(first_pos + 1, block_k), lax.div(kv_len, block_k))
    if tree_mask_ref is not None:  # keys from the tree's first position on are masked by ancestry
        mid_hi = jnp.minimum(mid_hi, lax.div(q_offsets_ref[0], block_k))
    if window:
        lo = lax.div(jnp.maximum(first_pos - window + 1, 0), block_k)
        mid_lo = lax.div(jnp.maximum(last_pos - window + block_k, 0), block_k)
    else:
        lo = jnp.int32(0)
        mid_lo = lo
    hi = jnp.maximum(hi, lo)
    mid_lo = jnp.minimum(jnp.maximum(mid_lo, lo), hi)
    mid_hi = jnp.minimum(jnp.maximum(mid_hi, mid_lo), hi)

    # A sink is one more score with a zero value: it starts the running max and sum.
    acc0 = jnp.zeros((block_q, head_dim), jnp.float32)
    if sinks_ref is None:
        m0, l0 = jnp.full((block_q,), MASKED, jnp.float32), jnp.zeros((block_q,), jnp.float32)
    else:
        m0, l0 = jnp.full((block_q,), sinks_ref[0] * LOG2_E, jnp.float32), jnp.ones((block_q,), jnp.float32)
    carry = (acc0, m0, l0)
    carry = lax.fori_loop(lo, mid_lo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(mid_lo, mid_hi, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(mid_hi, hi, functools.partial(step, masked=True), carry)
    # A query that saw no key keeps m == MASKED: its output is zero, not an average of hidden keys
    # (with a sink, acc stays zero and l is the sink's share).
    seen = m > MASKED
    out = acc / jnp.where(seen, l, 1.0)[:, None]
    o_ref[...] = jnp.where(seen[:, None], out, 0.0).astype(o_ref.dtype)


def _check_common(q, K, H_k, q_offsets, kv_lens, window, tree_mask=None, sinks=None):
    if q.ndim != 4:
        raise ValueError(f"q must be (B, T, N, H), got shape {q.shape}")
    B, T, N, H = q.shape
    check_sinks(sinks, N)
    if tree_mask is not None and (tree_mask.ndim != 3 or tree_mask.shape[:2] != (B, T)
                                  or 32 * tree_mask.shape[2] < T or tree_mask.dtype != jnp.int32):
        raise ValueError(f"tree_mask must be int32 (B, T, W)=({B}, {T}, >={-(-T // 32)}), got {tree_mask.dtype} "
                         f"{tree_mask.shape}")
    if H_k != H:
        raise ValueError(f"k/v head dim {H_k} must equal q head dim {H}")
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}")
    for name, x in (("q_offsets", q_offsets), ("kv_lens", kv_lens)):
        if x.shape != (B,):
            raise ValueError(f"{name} must have shape (B,)=({B},), got {x.shape}")
    if window < 0:
        raise ValueError(f"window must be >= 0 (0 = no window), got {window}")


def _flash(q, k, v, q_offsets, kv_lens, block_tables, k_scales, v_scales, tree_mask, sinks, *, window, sm_scale,
           softcap, block_sizes, interpret):
    """Pads to powers of two and block multiples, builds the BlockSpecs and calls the kernel."""
    B, T, N, H = q.shape
    paged = block_tables is not None
    K = k.shape[0] if paged else k.shape[2]
    G = N // K
    bs = block_sizes or BlockSizes.default(H, q.dtype)
    if any(x < 1 or x & (x - 1) for x in (bs.block_q, bs.block_k)):
        raise ValueError(f"{bs}: block_q and block_k must be powers of two (Triton block shapes)")
    sm_scale = H**-0.5 if sm_scale is None else sm_scale

    Hp = max(MIN_DOT, pl.next_power_of_2(H))  # Triton tensors have power-of-two sizes
    block_q = min(bs.block_q, max(MIN_DOT, pl.next_power_of_2(T)))
    T_pad = round_up(T, block_q)
    num_q_blocks = T_pad // block_q
    q = pad_axis(pad_axis(q, 3, Hp), 1, T_pad)
    k, v = pad_axis(k, 3, Hp), pad_axis(v, 3, Hp)
    q_offsets = q_offsets.astype(jnp.int32)
    tree_spec = None
    if tree_mask is not None:
        Wp = pl.next_power_of_2(tree_mask.shape[2])
        tree_mask = pad_axis(pad_axis(tree_mask, 2, Wp), 1, T_pad)
        tree_spec = pl.BlockSpec((None, block_q, Wp), lambda i, b, n: (b, num_q_blocks - 1 - i, 0))

    def q_map(i, b, n):
        return b, num_q_blocks - 1 - i, n, 0

    if paged:
        _, P, page_size, _ = k.shape
        max_pages = block_tables.shape[1]
        pages_per_block = max(bs.block_k // page_size, 1)
        pages_per_block = min(pages_per_block, pl.next_power_of_2(max_pages))
        pages_per_block = max(pages_per_block, -(-MIN_DOT // page_size))
        block_k = pages_per_block * page_size
        block_tables = pad_axis(block_tables.astype(jnp.int32), 1, round_up(max_pages, pages_per_block))
        kv_lens = jnp.minimum(kv_lens.astype(jnp.int32), max_pages * page_size)
        table_spec = pl.BlockSpec((None, block_tables.shape[1]), lambda i, b, n: (b, 0))
        kv_spec = pl.BlockSpec((None, P, page_size, Hp), lambda i, b, n: (lax.div(n, G), 0, 0, 0))
        scale_spec = pl.BlockSpec((None, P, page_size), lambda i, b, n: (lax.div(n, G), 0, 0))
    else:
        S = k.shape[1]
        pages_per_block = 0
        block_k = min(bs.block_k, max(MIN_DOT, pl.next_power_of_2(S)))
        S_pad = round_up(S, block_k)
        k, v = pad_axis(k, 1, S_pad), pad_axis(v, 1, S_pad)
        kv_lens = jnp.minimum(kv_lens.astype(jnp.int32), S)
        table_spec = scale_spec = None
        kv_spec = pl.BlockSpec((None, S_pad, None, Hp), lambda i, b, n: (b, 0, lax.div(n, G), 0))

    kernel = functools.partial(
        _flash_kernel, sm_scale=float(sm_scale), softcap=check_softcap(softcap), window=int(window), block_k=block_k,
        pages_per_block=pages_per_block, num_q_blocks=num_q_blocks,
    )
    scalar_spec = pl.BlockSpec((1,), lambda i, b, n: (b,))
    out = pl.pallas_call(
        kernel,
        grid=(num_q_blocks, B, N),
        in_specs=[
            scalar_spec,  # q_offsets
            scalar_spec,  # kv_lens
            table_spec,  # block_tables
            pl.BlockSpec((None, block_q, None, Hp), q_map),  # q
            kv_spec,  # k
            kv_spec,  # v
            None if k_scales is None else scale_spec,
            None if v_scales is None else scale_spec,
            tree_spec,  # tree_mask
            None if sinks is None else pl.BlockSpec((1,), lambda i, b, n: (n,)),  # sinks
        ],
        out_specs=pl.BlockSpec((None, block_q, None, Hp), q_map),
        out_shape=jax.ShapeDtypeStruct((B, T_pad, N, Hp), q.dtype),
        compiler_params=CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="paged_flash_attention" if paged else "flash_attention",
    )(q_offsets, kv_lens, block_tables, q, k, v, k_scales, v_scales, tree_mask,
      None if sinks is None else sinks.astype(jnp.float32))
    return out[:, :T, :, :H]


@functools.partial(jax.jit, static_argnames=("window", "sm_scale", "softcap", "block_sizes", "interpret"))
def flash_attention(
    q: jax.Array,  # (B, T, N, H)
    k: jax.Array,  # (B, S, K, H)
    v: jax.Array,  # (B, S, K, H)
    q_offsets: jax.Array,  # (B,) int32: position of query 0
    kv_lens: jax.Array,  # (B,) int32: valid keys
    *,
    tree_mask: jax.Array | None = None,  # (B, T, W) int32: the queries are a tree's tokens (module docstring)
    window: int = 0,
    sm_scale: float | None = None,
    softcap: float | None = None,  # scores soft-capped, cap * tanh(scores / cap), after sm_scale (Gemma 2)
    sinks: jax.Array | None = None,  # (N,) attention sinks: a logit per head beside the scores, no value (gpt-oss)
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:  # (B, T, N, H), q.dtype
    """Causal (optionally sliding-window) attention of q over dense k/v, masked by position."""
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0]:
        raise ValueError(f"k and v must both be (B, S, K, H) with B={q.shape[0]}, got {k.shape} and {v.shape}")
    _check_common(q, k.shape[2], k.shape[3], q_offsets, kv_lens, window, tree_mask, sinks)
    return _flash(q, k, v, q_offsets, kv_lens, None, None, None, tree_mask, sinks, window=window, sm_scale=sm_scale,
                  softcap=softcap, block_sizes=block_sizes, interpret=interpret)


def _check_pages(q, k_pages, v_pages, block_tables):
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k_pages and v_pages must both be (K, P, page_size, H), got {k_pages.shape} and {v_pages.shape}"
        )
    page_size = k_pages.shape[2]
    if page_size & (page_size - 1):
        raise ValueError(f"page_size={page_size} must be a power of two (Triton block shapes)")
    if block_tables.ndim != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"block_tables must be (B, max_pages) with B={q.shape[0]}, got {block_tables.shape}")


@functools.partial(jax.jit, static_argnames=("window", "sm_scale", "softcap", "block_sizes", "interpret"))
def paged_flash_attention(
    q: jax.Array,  # (B, T, N, H)
    k_pages: jax.Array,  # (K, P, page_size, H)
    v_pages: jax.Array,  # (K, P, page_size, H)
    block_tables: jax.Array,  # (B, max_pages) int32
    q_offsets: jax.Array,  # (B,) int32: position of query 0
    kv_lens: jax.Array,  # (B,) int32: tokens of each sequence in the pages (new ones included)
    *,
    k_scales: jax.Array | None = None,  # (K, P, page_size) float32, for int8 / fp8 pages
    v_scales: jax.Array | None = None,  # (K, P, page_size) float32
    tree_mask: jax.Array | None = None,  # (B, T, W) int32: the queries are a tree's tokens (module docstring)
    window: int = 0,
    sm_scale: float | None = None,
    softcap: float | None = None,
    sinks: jax.Array | None = None,  # (N,) attention sinks (flash_attention)
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:  # (B, T, N, H), q.dtype
    """Causal attention of q over keys and values read from pages through block_tables; int8 /
    fp8 pages are dequantised in the kernel (a key's scale multiplies its scores, a value's scale
    the probability that weights it)."""
    _check_pages(q, k_pages, v_pages, block_tables)
    _check_common(q, k_pages.shape[0], k_pages.shape[3], q_offsets, kv_lens, window, tree_mask, sinks)
    check_page_scales(k_pages, v_pages, k_scales, v_scales)
    check_fp8_supported(k_pages.dtype, interpret)
    return _flash(q, k_pages, v_pages, q_offsets, kv_lens, block_tables, k_scales, v_scales, tree_mask, sinks,
                  window=window, sm_scale=sm_scale, softcap=softcap, block_sizes=block_sizes, interpret=interpret)


def reference(q, k, v, q_offsets, kv_lens, *, tree_mask=None, window=0, sm_scale=None, softcap=None, sinks=None,
              block_sizes=None, interpret=False):
    """flash_attention in plain jnp: the whole (T, S) score matrix, scores and softmax in float32."""
    del block_sizes, interpret
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    sm_scale = H**-0.5 if sm_scale is None else sm_scale
    qg = q.astype(jnp.float32).reshape(B, T, K, N // K, H)  # (B, T, K, G, H)
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32), precision="highest") * sm_scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    q_pos = q_offsets[:, None, None] + jnp.arange(T)[None, :, None]  # (B, T, 1)
    k_pos = jnp.arange(S)[None, None, :]  # (1, 1, S)
    visible = (k_pos <= q_pos) & (k_pos < kv_lens[:, None, None])  # (B, T, S)
    if window:
        visible &= q_pos - k_pos < window
    if tree_mask is not None:
        rel = jnp.broadcast_to(jnp.arange(S)[None, :] - q_offsets[:, None], (B, S))  # (B, S)
        visible &= (rel < 0)[:, None, :] | tree_visible(tree_mask, rel)
    visible = visible[:, None, None]  # (B, 1, 1, T, S)
    s = jnp.where(visible, s, -jnp.inf)
    p = sink_softmax(s, visible, None if sinks is None else sinks.reshape(K, N // K)[None, :, :, None, None])
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p, v.astype(jnp.float32), precision="highest")
    return out.reshape(B, T, N, H).astype(q.dtype)


def paged_reference(
    q, k_pages, v_pages, block_tables, q_offsets, kv_lens, *, k_scales=None, v_scales=None, tree_mask=None, window=0,
    sm_scale=None, softcap=None, sinks=None, block_sizes=None, interpret=False,
):
    """paged_flash_attention in plain jnp: dequantise and gather the pages into dense k/v, then
    `reference`."""
    k = gather_pages(dequantize_pages(k_pages, k_scales), block_tables)
    v = gather_pages(dequantize_pages(v_pages, v_scales), block_tables)
    return reference(q, k, v, q_offsets, kv_lens, tree_mask=tree_mask, window=window, sm_scale=sm_scale,
                     softcap=softcap, sinks=sinks, block_sizes=block_sizes, interpret=interpret)
