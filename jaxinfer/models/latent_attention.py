"""Multi-head latent attention (DeepSeek-V2 / V3) over a latent paged cache: each token's row of
kv_lora_rank + qk_rope_head_dim values (kv_cache.Latent, PagedKVCache.latent) stands for the keys
and values of every head. A step's queries attend over it in one of two forms, per phase:

  absorbed  the query taken into latent space (q_nope @ w_uk^T, per head), attention over the rows
            as one KV head every head shares (the values: each row's latent, the paged decode
            kernel's `values=C`), the output up-projected by w_uv: the cache read as it is, C + R
            values per token
  expanded  every context row up-projected to per-head keys and values, then per-head attention
            (the form the model is written in): N x (head_dim + Hv) values per token

Both are exact (benchmarks/results/mla.md). The paged machinery (writing a step's rows, gathering a
row's context, the decode / prefill forms of each implementation) is jaxinfer.models.attention's.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxinfer.models.attention import (
    gather_context,
    paged_decode,
    paged_prefill,
    prefill_over,
    write_pages,
)
from jaxinfer.models.kv_cache import BatchDescriptor, Latent, PagedKVCache

MLA_FORMS = ("absorbed", "expanded")


def attend_latent(cache: PagedKVCache, layer, q, latent: Latent, window, batch: BatchDescriptor, *, impl="xla",
                  softcap=None, sinks=None, mla: tuple[str, str] = ("absorbed", "expanded")):
    """latent.rows written at the step's slots of layer `layer`, then the decode rows attend in form
    mla[0] and the prefill rows in form mla[1]. q (1, N, heads, H) -> ((1, N, heads, H): the values'
    Hv columns first and zeros after, the expanded layer's shape; the cache)."""
    for form in mla:
        if form not in MLA_FORMS:
            raise ValueError(f"multi-head latent attention form {form!r} is not one of {MLA_FORMS}")
    _, N, NH, H = q.shape
    k_all, k_scale = write_pages(cache, cache.k, cache.k_scale, layer, batch.slot_mapping, latent.rows[0][:, None])
    pages, scales = k_all[layer], None if k_scale is None else k_scale[layer]  # (1, P, page, C + R), (1, P, page)
    Rd, Rp = batch.num_decode, batch.num_prefill
    outs = []
    if Rd:  # one query per row, at position lens - 1
        tables, lens = batch.decode_block_tables, batch.decode_lens
        if mla[0] == "absorbed":
            o = paged_decode(_absorb(q[0, :Rd], latent), pages, None, scales, None, tables, lens, window, impl,
                             softcap, sinks, values=latent.w_uv.shape[0])
        else:
            keys, values = _expand(gather_context(pages, scales, tables, q.dtype), latent, H)  # (Rd, S, NH, H)
            o = prefill_over(q[0, :Rd, None], keys, values, lens - 1, jnp.minimum(lens, 1), window, None, softcap,
                             sinks, impl)[:, 0]
        outs.append(_up(o, latent, H, mla[0]))
    if Rp:
        C = (N - Rd) // Rp
        qp = q[0, Rd:].reshape(Rp, C, NH, H)
        tables, start, lens, tree = (batch.prefill_block_tables, batch.prefill_start, batch.prefill_lens,
                                     batch.prefill_tree_mask)
        if mla[1] == "absorbed":
            o = paged_prefill(_absorb(qp, latent), pages, pages, scales, scales, tables, start, lens, window, impl,
                              tree, softcap, sinks)
        else:
            keys, values = _expand(gather_context(pages, scales, tables, q.dtype), latent, H)  # (Rp, S, NH, H)
            o = prefill_over(qp, keys, values, start, lens, window, tree, softcap, sinks, impl)
        outs.append(_up(o, latent, H, mla[1]).reshape(Rp * C, NH, H))
    out = jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
    return out[None], PagedKVCache(k=k_all, v=cache.v, k_scale=k_scale, v_scale=cache.v_scale)


def _absorb(q, latent: Latent):
    """Queries (..., N, H) -> (..., N, C + R) in latent space: [q_nope @ w_uk^T per head, q_rope],
    scaled so that attention's (C + R) ** -0.5 makes H ** -0.5."""
    C, _, Hk = latent.w_uk.shape
    R = q.shape[-1] - Hk
    q_lat = jnp.einsum("...nk,cnk->...nc", q[..., :Hk], latent.w_uk.astype(q.dtype),
                       preferred_element_type=jnp.float32).astype(q.dtype)
    return jnp.concatenate([q_lat, q[..., Hk:]], axis=-1) * jnp.asarray(((C + R) / q.shape[-1]) ** 0.5, q.dtype)


def _up(o, latent: Latent, H: int, form: str):
    """Attention's output (..., N, H') -> (..., N, H): the absorbed form's latent output (its first C
    columns) up-projected by w_uv; both forms' Hv value columns padded with zeros to H."""
    Hv = latent.w_uv.shape[-1]
    if form == "absorbed":
        C = latent.w_uv.shape[0]
        o = jnp.einsum("...nc,cnv->...nv", o[..., :C], latent.w_uv.astype(o.dtype),
                       preferred_element_type=jnp.float32).astype(o.dtype)
    else:
        o = o[..., :Hv]
    return jnp.pad(o, [(0, 0)] * (o.ndim - 1) + [(0, H - Hv)])


def _expand(rows, latent: Latent, H: int):
    """Context rows (R, S, 1, C + R) -> per-head keys (R, S, N, H) and values (R, S, N, H), the values'
    Hv columns padded with zeros."""
    C, N, Hk = latent.w_uk.shape
    c, k_pe = rows[:, :, 0, :C], rows[:, :, 0, C:]
    k_nope = jnp.einsum("rsc,cnk->rsnk", c, latent.w_uk.astype(c.dtype),
                        preferred_element_type=jnp.float32).astype(c.dtype)
    keys = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None], (*k_pe.shape[:2], N, k_pe.shape[-1]))], -1)
    values = jnp.einsum("rsc,cnv->rsnv", c, latent.w_uv.astype(c.dtype),
                        preferred_element_type=jnp.float32).astype(c.dtype)
    return keys, jnp.pad(values, [(0, 0)] * 3 + [(0, H - values.shape[-1])])
