"""The one place the model calls attention through.

`attend` takes queries and the keys/values they may see, with the absolute position of every
query and key, and applies causal and sliding-window masking by position. The XLA path below
is the reference every faster implementation is compared against.

`attend_cached` writes a step's new K/V into a cache (contiguous or paged) and attends over it.

Implementations are registered by name (`register`; `IMPLEMENTATIONS` maps names to them): each
gives the three forms the model calls (dense, paged decode, paged prefill) with the reference's
signatures, so a new kernel is one registration and the model code does not change. "xla" is the
reference; "pallas" runs the kernels in pallas_kernels/ (in interpret mode on the CPU). They take the
sliding window as a static int, so the model passes one when all layers share a window; they
assume the keys of a call sit at positions 0..S-1 (true of every caller here: a full causal
pass, a contiguous cache, pages). Traced under a tensor-parallel mesh (jaxinfer.sharding), each
kernel runs per shard under shard_map on its own query and KV heads (the partitioner cannot
split a pallas_call); the XLA path is split by the partitioner itself.

Axes: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim,
L layers, P pages, M pages per sequence (block-table width).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxinfer.models.kv_cache import (
    BatchDescriptor,
    KVCache,
    PagedKVCache,
    as_floats,
    as_stored,
    quantize,
)
from jaxinfer.sharding import P, per_shard
from pallas_kernels.common import dequantize_pages, gather_pages, soft_cap, tree_visible
from pallas_kernels.flash_attention import flash_attention, paged_flash_attention
from pallas_kernels.paged_attention import paged_decode_attention

_MASKED = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
    """One attention implementation, in the three forms the model calls:
      dense(q, k, v, q_pos, k_pos, window, softcap, sinks=)      a full pass, or a contiguous cache
      paged_decode(q, k_pages, v_pages, k_scales, v_scales, block_tables, lens, window, softcap, sinks=)
      paged_prefill(q, k_pages, v_pages, k_scales, v_scales, block_tables, start, lens, window, tree_mask, softcap,
                    sinks=)
    with the shapes and meanings of the reference functions below (xla_attention, _xla_paged_decode,
    _xla_paged_prefill). softcap: None, or the scores' soft-cap (cap * tanh(scores / cap), after the
    head_dim ** -0.5 scale and before the mask; Gemma 2). sinks: None, or (N,) attention sinks, one
    logit per query head that joins each softmax with no value (gpt-oss): the layer's own array. static_window: the forms take the window
    as a Python int only (a kernel's compile-time constant); a layer whose window is chosen at run
    time (LayerWindow) then runs one branch per window."""

    name: str
    dense: Callable
    paged_decode: Callable
    paged_prefill: Callable
    static_window: bool = False


class LayerWindow(NamedTuple):
    """The sliding window of one layer of a scan over layers whose windows differ (Gemma 2/3's
    local and global layers): choices[index], index traced, the distinct windows static."""

    index: jax.Array
    choices: tuple[int, ...]


def window_value(window):
    """A layer's window as an int or a traced int32 (a LayerWindow's choice)."""
    if isinstance(window, LayerWindow):
        return jnp.asarray(window.choices, jnp.int32)[window.index]
    return window


def _per_window(impl: AttentionImpl, window, call: Callable):
    """call(window) with the layer's window: an int or traced window as it is; a LayerWindow as a
    traced value, or, for an implementation that needs a static window, lax.switch over its choices."""
    if not isinstance(window, LayerWindow):
        return call(window)
    if not impl.static_window:
        return call(window_value(window))
    return jax.lax.switch(window.index, [functools.partial(call, w) for w in window.choices])


IMPLEMENTATIONS: dict[str, AttentionImpl] = {}


def register(impl: AttentionImpl) -> AttentionImpl:
    """Make an implementation selectable by name (EngineConfig(attention=name), Impl(attention=name))."""
    IMPLEMENTATIONS[impl.name] = impl
    return impl


def get(name: str) -> AttentionImpl:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl={name!r} is not one of {tuple(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[name]


def _static_window(window, impl: str) -> int:
    if isinstance(window, int):
        return window
    raise ValueError(f"attention impl={impl!r} needs one sliding window shared by all layers")


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def attend(
    q: jax.Array,  # (B, T, N, H)
    k: jax.Array,  # (B, S, K, H)
    v: jax.Array,  # (B, S, K, H)
    q_pos: jax.Array,  # (B, T) int32
    k_pos: jax.Array,  # (B, S) int32; a negative position marks an empty slot
    window: jax.Array | int | LayerWindow = 0,  # keys with q_pos - k_pos >= window are hidden; 0 = no window
    *,
    impl: str = "xla",
    softcap: float | None = None,  # the scores soft-capped (AttentionImpl)
    sinks: jax.Array | None = None,  # (N,) attention sinks (AttentionImpl)
) -> jax.Array:  # (B, T, N, H)
    form = get(impl)
    return _per_window(form, window, lambda w: form.dense(q, k, v, q_pos, k_pos, w, softcap, sinks=sinks))


def _pallas_dense(q, k, v, q_pos, k_pos, window, softcap, sinks=None):
    kv_lens = jnp.max(k_pos, axis=1) + 1  # keys sit at positions 0..S-1
    kernel = functools.partial(flash_attention, window=_static_window(window, "pallas"), softcap=softcap,
                               interpret=_interpret())
    heads = P(None, None, "tp")
    args, specs = (q, k, v, q_pos[:, 0], kv_lens), (heads, heads, heads, P(), P())
    if sinks is None:
        return per_shard(kernel, specs, heads)(*args)
    return per_shard(lambda *a: kernel(*a[:-1], sinks=a[-1]), (*specs, P("tp")), heads)(*args, sinks)


def xla_attention(q, k, v, q_pos, k_pos, window=0, softcap=None, mask=None, sinks=None):
    """Masked softmax attention with scores and softmax in float32 (HF's eager path does the same).
    softcap: None, or the scores' soft-cap; mask: None, or (B, T, S) bool further hiding keys (a
    draft tree's non-ancestors); sinks: None, or (N,) logits that join each head's softmax as one
    more column, whose probability is then dropped (HF's gpt-oss eager attention)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)  # (B, T, K, G, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    probs = _softmax(scores, q_pos, k_pos, window, softcap, mask, sinks, H).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(B, T, N, v.shape[-1])  # (values as wide as the keys, or narrower)


def _softmax(scores, q_pos, k_pos, window, softcap, mask, sinks, H):
    """Raw scores (B, K, G, T, S) float32 -> xla_attention's probabilities: scaled, soft-capped,
    masked, softmax over S (with the sinks' column, then dropped)."""
    scores = scores * (H**-0.5)
    if softcap:
        scores = soft_cap(scores, softcap)
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)  # (B, T, S)
    distance = q_pos[:, :, None] - k_pos[:, None, :]
    visible &= (window <= 0) | (distance < window)
    if mask is not None:
        visible &= mask
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    if sinks is None:
        return jax.nn.softmax(scores, axis=-1)
    K, G = scores.shape[1:3]
    sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(K, G)[None, :, :, None, None], (*scores.shape[:-1], 1))
    return jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]


def attend_cached(cache, layer, q, k, v, positions, window, batch: BatchDescriptor | None, *, impl="xla",
                  softcap: float | None = None, sinks: jax.Array | None = None):
    """Write k, v (B, T, K, H) into layer `layer` of the cache, then attend. Returns (out, cache).
    (A latent cache, multi-head latent attention's, is jaxinfer.models.latent_attention's.)"""
    if isinstance(cache, KVCache):
        return _contiguous(cache, layer, q, k, v, positions, window, impl, softcap, sinks)
    if isinstance(cache, PagedKVCache):
        if batch is None:
            raise ValueError("a PagedKVCache needs a BatchDescriptor")
        if cache.latent:
            raise ValueError("a latent PagedKVCache is attended through latent_attention.attend_latent (a multi-head "
                             "latent attention model's layer passes its Latent)")
        return _paged(cache, layer, q, k, v, window, batch, impl, softcap, sinks)
    raise TypeError(f"unknown cache type {type(cache).__name__}")


def _contiguous(cache: KVCache, layer, q, k, v, positions, window, impl, softcap, sinks):
    B = q.shape[0]
    rows = jnp.arange(B)[:, None]  # (B, 1)
    k_all = cache.k.at[layer, rows, positions].set(k.astype(cache.k.dtype), mode="drop")
    v_all = cache.v.at[layer, rows, positions].set(v.astype(cache.v.dtype), mode="drop")
    keys, values = k_all[layer], v_all[layer]  # (B, S, K, H)
    S = keys.shape[1]
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    out = attend(q, keys, values, positions, k_pos, window, impl=impl, softcap=softcap, sinks=sinks)
    return out, KVCache(k=k_all, v=v_all)


def _paged(cache: PagedKVCache, layer, q, k, v, window, batch: BatchDescriptor, impl, softcap, sinks):
    """q, k, v: (1, N, heads, H) flat tokens: Rd decode tokens, then Rp rows of C prefill tokens.
    A quantised cache stores the new K/V quantised per token and head, with their scales."""
    _, N, NH, H = q.shape
    slots = batch.slot_mapping  # (N,)
    k_all, k_scale = write_pages(cache, cache.k, cache.k_scale, layer, slots, k[0])
    v_all, v_scale = write_pages(cache, cache.v, cache.v_scale, layer, slots, v[0])
    pages = (k_all[layer], v_all[layer], None if k_scale is None else k_scale[layer],
             None if v_scale is None else v_scale[layer])  # (K, P, page, H) x2, (K, P, page) x2

    Rd, Rp = batch.num_decode, batch.num_prefill
    outs = []
    if Rd:
        outs.append(paged_decode(q[0, :Rd], *pages, batch.decode_block_tables, batch.decode_lens, window, impl,
                                 softcap, sinks))
    if Rp:
        C = (N - Rd) // Rp
        qp = q[0, Rd:].reshape(Rp, C, NH, H)
        o = paged_prefill(qp, *pages, batch.prefill_block_tables, batch.prefill_start, batch.prefill_lens, window, impl,
                          batch.prefill_tree_mask, softcap, sinks)
        outs.append(o.reshape(Rp * C, NH, H))
    out = jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
    return out[None], PagedKVCache(k=k_all, v=v_all, k_scale=k_scale, v_scale=v_scale)


def write_pages(cache: PagedKVCache, store, scales, layer, slots, new):
    """store (L, K, P, page, H) with new (N, K, H) written at the flat slots (N,) of layer `layer`
    (quantised per token and head, with its scales, when the cache is); slots past the cache: dropped."""
    page_idx, offset = slots // cache.page_size, slots % cache.page_size
    if scales is None:
        values = as_stored(new.astype(cache.dtype), store)
        return store.at[layer, :, page_idx, offset].set(values, mode="drop"), None
    values, new_scales = quantize(new, cache.dtype)  # (N, K, H), (N, K)
    return (store.at[layer, :, page_idx, offset].set(as_stored(values, store), mode="drop"),
            scales.at[layer, :, page_idx, offset].set(new_scales, mode="drop"))


def _per_shard_pages(kernel, heads, q, k_pages, v_pages, k_scales, v_scales, *rest, sinks=None):
    """kernel(q, k_pages, v_pages, *rest, k_scales=, v_scales= [, sinks=]) on each shard's query heads
    (q and sinks split on `heads`) and KV heads (pages and scales split on axis 0); block tables
    and lengths whole."""
    scales = () if k_scales is None else (k_scales, v_scales)
    sink = () if sinks is None else (sinks,)

    def run(q, k_pages, v_pages, *args):
        args, tail = args[: len(rest)], args[len(rest):]
        ks, vs = tail[:2] if scales else (None, None)
        return kernel(q, k_pages, v_pages, *args, k_scales=ks, v_scales=vs, **({"sinks": tail[-1]} if sink else {}))

    # Pages with one head under a mesh are a latent cache's, every shard's whole (a model with one KV
    # head stores it tp times: K = tp).
    kv = P() if k_pages.shape[0] == 1 else P("tp")
    in_specs = (heads, kv, kv, *[P()] * len(rest), *[kv] * len(scales), *[P("tp")] * len(sink))
    return per_shard(run, in_specs, heads)(q, k_pages, v_pages, *rest, *scales, *sink)


def gather_context(pages, scales, block_tables, dtype):
    """pages (K, P, page, H) [+ scales (K, P, page)] -> each row's context (R, M * page, K, H) in dtype.
    Only the rows' pages are read: gathered first, then viewed (as_floats) and dequantised."""
    context = as_floats(gather_pages(pages, block_tables))
    if scales is None:
        return context
    return dequantize_pages(context, gather_pages(scales[..., None], block_tables)[..., 0]).astype(dtype)


def gather_heads(pages, scales, block_tables, dtype):
    """gather_context head-major: (K, R, M * page, H), as the pages lie (the gather's transpose and
    this one cancel in XLA: no copy)."""
    return gather_context(pages, scales, block_tables, dtype).transpose(2, 0, 1, 3)


def paged_decode(q, k_pages, v_pages, k_scales, v_scales, block_tables, lens, window=0, impl="xla", softcap=None,
                 sinks=None, values=None):
    """One query per row at position lens - 1. q (R, N, H) -> (R, N, H). Scales: None, or the
    per-token scales (K, P, page) of int8 / fp8 pages. Latent pages (v_pages and v_scales None,
    `values` = C): the values are each key row's first C columns, the output (R, N, C)."""
    form = get(impl)
    extra = {} if values is None else {"values": values}
    return _per_window(form, window, lambda w: form.paged_decode(q, k_pages, v_pages, k_scales, v_scales,
                                                                 block_tables, lens, w, softcap, sinks=sinks, **extra))


def _pallas_paged_decode(q, k_pages, v_pages, k_scales, v_scales, block_tables, lens, window, softcap, sinks=None,
                         values=None):
    kernel = functools.partial(paged_decode_attention, window=_static_window(window, "pallas"), softcap=softcap,
                               interpret=_interpret())
    k_pages = as_floats(k_pages)  # bits only on the CPU (interpret mode)
    if v_pages is None:  # latent pages: passed twice to the per-shard call, read once by the kernel
        def latent(q, k_pages, _, *rest, k_scales, v_scales, **kw):
            del v_scales
            return kernel(q, k_pages, None, *rest, k_scales=k_scales, values=values, **kw)

        return _per_shard_pages(latent, P(None, "tp"), q, k_pages, k_pages, k_scales, k_scales, block_tables, lens,
                                sinks=sinks)
    return _per_shard_pages(kernel, P(None, "tp"), q, k_pages, as_floats(v_pages), k_scales, v_scales, block_tables,
                            lens, sinks=sinks)


def _xla_paged_decode(q, k_pages, v_pages, k_scales, v_scales, block_tables, lens, window, softcap, sinks=None,
                      values=None):
    R, N, H = q.shape
    K = k_pages.shape[0]
    # The context head-major (K, R, S, H), as the pages lie: no transposed copy of it on either side
    # of the two products (5% of SmolLM2's batch-1 step on the CPU, cpu_int8.md).
    keys = gather_heads(k_pages, k_scales, block_tables, q.dtype)
    # latent pages (v_pages None): each key row's first `values` columns are its values
    vals = keys[..., :values] if v_pages is None else gather_heads(v_pages, v_scales, block_tables, q.dtype)
    k_pos = jnp.arange(keys.shape[2], dtype=jnp.int32)[None, :]
    k_pos = jnp.where(k_pos < lens[:, None], k_pos, -1)  # (R, S); slots past the context are empty
    q_pos = (lens - 1)[:, None]  # (R, 1)
    scores = jnp.einsum("RKGH,KRSH->RKGS", q.reshape(R, K, N // K, H), keys, preferred_element_type=jnp.float32)
    probs = _softmax(scores[:, :, :, None], q_pos, k_pos, window, softcap, None, sinks, H)[:, :, :, 0]
    out = jnp.einsum("RKGS,KRSH->RKGH", probs.astype(vals.dtype), vals, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(R, N, vals.shape[-1])


def paged_prefill(q, k_pages, v_pages, k_scales, v_scales, block_tables, start, lens, window=0, impl="xla",
                  tree_mask=None, softcap=None, sinks=None):
    """Row r's queries are at positions start[r] + [0, C); it sees its pages up to its own position.
    q (R, C, N, H) -> (R, C, N, H); rows' padding queries (index >= lens[r]) produce junk.
    tree_mask (R, C, W) int32: the row is a draft tree, its queries see the keys before start[r]
    and, from start[r] on, only their ancestors (pallas_kernels.flash_attention's docstring)."""
    form = get(impl)
    return _per_window(form, window, lambda w: form.paged_prefill(q, k_pages, v_pages, k_scales, v_scales,
                                                                  block_tables, start, lens, w, tree_mask, softcap,
                                                                  sinks=sinks))


def _pallas_paged_prefill(q, k_pages, v_pages, k_scales, v_scales, block_tables, start, lens, window, tree_mask,
                          softcap, sinks=None):
    window = _static_window(window, "pallas")
    k_pages, v_pages = as_floats(k_pages), as_floats(v_pages)  # bits only on the CPU (interpret mode)

    def kernel(q, k_pages, v_pages, tables, begin, end, *mask, k_scales, v_scales, sinks=None):
        return paged_flash_attention(q, k_pages, v_pages, tables, begin, end, k_scales=k_scales, v_scales=v_scales,
                                     tree_mask=mask[0] if mask else None, window=window, softcap=softcap,
                                     sinks=sinks, interpret=_interpret())

    mask = () if tree_mask is None else (tree_mask,)
    return _per_shard_pages(kernel, P(None, None, "tp"), q, k_pages, v_pages, k_scales, v_scales, block_tables,
                            start, start + lens, *mask, sinks=sinks)


def _xla_paged_prefill(q, k_pages, v_pages, k_scales, v_scales, block_tables, start, lens, window, tree_mask,
                       softcap, sinks=None):
    keys = gather_context(k_pages, k_scales, block_tables, q.dtype)  # (R, S, K, H)
    values = gather_context(v_pages, v_scales, block_tables, q.dtype)
    return prefill_over(q, keys, values, start, lens, window, tree_mask, softcap, sinks)


def prefill_over(q, keys, values, start, lens, window, tree_mask, softcap, sinks=None, impl=None):
    """Rows of queries q (R, C, N, H) at positions start[r] + [0, C) over their gathered context
    keys / values (R, S, K, H), the first start[r] + lens[r] of which are live; a draft tree's mask
    (paged_prefill). XLA's masked attention, or with `impl` and no tree that implementation's dense form."""
    R, C = q.shape[:2]
    S = keys.shape[1]
    q_pos = start[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]  # (R, C)
    k_pos = jnp.arange(S, dtype=jnp.int32)[None, :]
    k_pos = jnp.where(k_pos < (start + lens)[:, None], k_pos, -1)  # (R, S)
    if tree_mask is None:
        if impl is not None:
            return attend(q, keys, values, q_pos, k_pos, window, impl=impl, softcap=softcap, sinks=sinks)
        return xla_attention(q, keys, values, q_pos, k_pos, window, softcap, sinks=sinks)
    rel = jnp.arange(S, dtype=jnp.int32)[None, :] - start[:, None]  # (R, S): each key's index in the tree
    mask = (rel < 0)[:, None, :] | tree_visible(tree_mask, rel)  # (R, C, S)
    return xla_attention(q, keys, values, q_pos, k_pos, window, softcap, mask, sinks=sinks)


register(AttentionImpl("xla", xla_attention, _xla_paged_decode, _xla_paged_prefill))
register(AttentionImpl("pallas", _pallas_dense, _pallas_paged_decode, _pallas_paged_prefill, static_window=True))
