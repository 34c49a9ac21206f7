"""KV caches on the device: the contiguous baseline and the paged cache (PagedAttention). The
host side that hands out their pages is jaxinfer/engine/kv_manager.py.

Device side (pytrees, passed into and returned from jitted steps):
  KVCache       k, v: (L, B, S, K, H); sequence b's token at position p lives in slot p.
  PagedKVCache  k, v: (L, K, P, page_size, H); a sequence's token at position p lives in page
                block_table[p // page_size] at offset p % page_size. Optionally int8 / fp8 with
                per-token, per-head scales (quantised on write, dequantised where read).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class KVCache:
    """Contiguous KV cache. k, v: (L, B, S, K, H) in the model dtype.

    Slots past a sequence's current position hold stale data and are hidden by the causal mask.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


# Quantised KV-cache dtypes, with the largest magnitude each stores.
KV_DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
_QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}

# XLA's CPU backend writes into a bfloat16 or float8 array by converting all of it to float32 and
# back (a pass over the whole cache for each token written; benchmarks/results/bf16_cpu_scatter.md).
# On the CPU such pages are held as their bit pattern, an integer array it updates in place, and
# read as floats after each gather (`as_floats`). The store's dtype says which: uint16 pages hold
# bfloat16, uint8 pages float8_e4m3fn (a cache never holds those integers as such).
_BITS = {jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16), jnp.dtype(jnp.float8_e4m3fn): jnp.dtype(jnp.uint8)}
_FLOATS = {bits: dtype for dtype, bits in _BITS.items()}


def store_dtype(dtype) -> jnp.dtype:
    """The dtype pages of `dtype` are stored in here: their bits on the CPU for bf16 and fp8."""
    dtype = jnp.dtype(dtype)
    return _BITS[dtype] if dtype in _BITS and jax.default_backend() == "cpu" else dtype


def as_floats(pages: jax.Array) -> jax.Array:
    """Pages (or gathered pages) as the dtype they hold. Call it after a gather, on the pages read:
    on the whole store it is a copy."""
    dtype = _FLOATS.get(jnp.dtype(pages.dtype))
    return pages if dtype is None else jax.lax.bitcast_convert_type(pages, dtype)


def as_stored(values: jax.Array, store: jax.Array) -> jax.Array:
    """Values in the dtype a store holds, as the store keeps them."""
    return values if values.dtype == store.dtype else jax.lax.bitcast_convert_type(values, store.dtype)


class Latent(NamedTuple):
    """What a multi-head latent attention layer (jaxinfer.models.deepseek) gives a latent cache, beside
    its expanded queries, keys and values:
      rows  (B, T, C + R)  each new token's normed latent and rotated shared key: its cache row
      w_uk  (C, N, Hk)     the keys' up-projection per head (their part without RoPE: Hk = head_dim - R)
      w_uv  (C, N, Hv)     the values' up-projection per head
    Over a latent cache the layer's queries (B, T, N, head_dim) are [no-RoPE part, rotated part]."""

    rows: jax.Array
    w_uk: jax.Array
    w_uv: jax.Array


def page_layout(cfg) -> tuple[int, int, int]:
    """(heads, key width, value width) of a paged cache's rows for a config: K kv heads of head_dim
    keys and values, or for multi-head latent attention one row of kv_lora_rank + qk_rope_head_dim
    and no values (PagedKVCache)."""
    if cfg.kv_lora_rank:
        return 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, 0
    return cfg.num_kv_heads, cfg.head_dim, cfg.head_dim


@struct.dataclass
class PagedKVCache:
    """Paged KV cache; P physical pages.
      k, v              (L, K, P, page_size, H)  the model dtype, or int8 / float8_e4m3fn; on the
                        CPU bf16 and fp8 pages as their bits (uint16 / uint8: `store_dtype`)
      k_scale, v_scale  (L, K, P, page_size) float32: a quantised token's scale per head (max |x| of
                        its head vector over the dtype's largest value); None for a float cache.
    A latent cache (multi-head latent attention, ModelConfig.kv_lora_rank > 0) holds one row per
    token in k, K = 1 and H = kv_lora_rank + qk_rope_head_dim (the normed latent, then the rotated
    key every head shares), and v is empty (H = 0): the values are the latent itself. Every page
    operation (allocation, prefix sharing, copy-on-write, preemption) is the same."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @classmethod
    def zeros(cls, cfg, num_pages: int, page_size: int, dtype=jnp.float32, kv_dtype: str | None = None) -> PagedKVCache:
        if kv_dtype is not None and kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype={kv_dtype!r} is not one of None, {', '.join(map(repr, KV_DTYPES))}")
        heads, k_dim, v_dim = page_layout(cfg)
        shape = (cfg.num_layers, heads, num_pages, page_size)
        store = store_dtype(dtype if kv_dtype is None else KV_DTYPES[kv_dtype])  # zeros' bits are the float's zeros
        scales = {} if kv_dtype is None else {"k_scale": jnp.ones(shape, jnp.float32),
                                              "v_scale": jnp.ones(shape, jnp.float32)}
        return cls(k=jnp.zeros((*shape, k_dim), store), v=jnp.zeros((*shape, v_dim), store), **scales)

    @property
    def latent(self) -> bool:
        """A multi-head latent attention cache: the values are the keys' latent (v is empty)."""
        return self.v.shape[-1] == 0

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype the pages hold (whatever they are stored as)."""
        return _FLOATS.get(jnp.dtype(self.k.dtype), jnp.dtype(self.k.dtype))

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]


@struct.dataclass
class BatchDescriptor:
    """Where a mixed step's tokens go and what they attend to.

    The step's N tokens are laid out flat: first Rd decode tokens (one per sequence), then Rp
    prefill rows of C tokens each (a chunk of one sequence's prompt, right-padded).
      positions              (N,) int32  position of each token in its sequence
      logits_at              (R,) int32  the tokens whose logits the step returns, R = Rd + Rp
      slot_mapping           (N,) int32  flat cache slot (page * page_size + offset) for each
                                         token's K/V; P * page_size for padding (not written)
      decode_block_tables    (Rd, M) int32  pages of each decode sequence (M pages max)
      decode_lens            (Rd,) int32 context length including this step's token; 0 = padding row
      prefill_block_tables   (Rp, M) int32
      prefill_start          (Rp,) int32 position of the row's first token
      prefill_lens           (Rp,) int32 valid tokens in the row (0 = padding row)
      adapter_ids            (N,) int32  each token's LoRA adapter slot, -1 = the base model (None: all -1)
                                         (a prefill row's tokens share one; see jaxinfer.lora.LoraBatch)
      prefill_tree_mask      (Rp, C, W) int32  None, or each prefill row is a speculative draft tree:
                                         ancestor bitmasks (jaxinfer.speculative.tree)
    """

    positions: jax.Array
    logits_at: jax.Array
    slot_mapping: jax.Array
    decode_block_tables: jax.Array
    decode_lens: jax.Array
    prefill_block_tables: jax.Array
    prefill_start: jax.Array
    prefill_lens: jax.Array
    adapter_ids: jax.Array | None = None  # None: every token on the base model
    prefill_tree_mask: jax.Array | None = None  # None: rows are causal chunks

    # The builders below are the one place a descriptor is laid out. They take numpy (the runner
    # packs a step on the host, xp=np) or jax arrays (inside a jitted program, xp=jnp) alike.

    @classmethod
    def decode_rows(cls, positions, live, tables, page_size: int, dropped: int, adapter_ids=None,
                    xp=jnp) -> BatchDescriptor:
        """One token per row at positions (R,) through block tables (R, M); a row that is not live
        writes no K/V (its slot is `dropped`, past the cache) and attends to nothing."""
        R, M = tables.shape
        return cls(positions=positions, logits_at=xp.arange(R, dtype=np.int32),
                   slot_mapping=slots_of(tables, positions, live, page_size, dropped, xp),
                   decode_block_tables=tables, decode_lens=xp.where(live, positions + 1, 0).astype(np.int32),
                   prefill_block_tables=xp.zeros((0, M), np.int32), prefill_start=xp.zeros((0,), np.int32),
                   prefill_lens=xp.zeros((0,), np.int32), adapter_ids=adapter_ids)

    @classmethod
    def chunk_rows(cls, start, lens, tables, chunk: int, page_size: int, dropped: int, *, all_logits: bool = False,
                   adapter_ids=None, xp=jnp) -> BatchDescriptor:
        """R rows of `chunk` tokens each, row r from position start[r] with lens[r] valid (the rest
        pad: no K/V written); logits at each row's last valid token, or with all_logits at every token."""
        R, M = tables.shape
        offsets = xp.arange(chunk, dtype=np.int32)[None, :]
        positions = start[:, None] + offsets  # (R, C)
        live = offsets < lens[:, None]
        logits_at = (xp.arange(R * chunk, dtype=np.int32) if all_logits
                     else xp.arange(R, dtype=np.int32) * chunk + xp.maximum(lens - 1, 0))
        return cls(positions=positions.reshape(-1), logits_at=logits_at,
                   slot_mapping=slots_of(tables, positions, live, page_size, dropped, xp).reshape(-1),
                   decode_block_tables=xp.zeros((0, M), np.int32), decode_lens=xp.zeros((0,), np.int32),
                   prefill_block_tables=tables, prefill_start=start, prefill_lens=lens, adapter_ids=adapter_ids)

    @classmethod
    def mixed(cls, decode: BatchDescriptor, chunks: BatchDescriptor, xp=jnp) -> BatchDescriptor:
        """A mixed step: decode's rows first, then chunks' rows, in one flat token layout."""
        def cat(a, b):
            return None if a is None and b is None else xp.concatenate([a, b])

        return cls(positions=cat(decode.positions, chunks.positions),
                   logits_at=cat(decode.logits_at, chunks.logits_at + decode.positions.shape[0]),
                   slot_mapping=cat(decode.slot_mapping, chunks.slot_mapping),
                   decode_block_tables=decode.decode_block_tables, decode_lens=decode.decode_lens,
                   prefill_block_tables=chunks.prefill_block_tables, prefill_start=chunks.prefill_start,
                   prefill_lens=chunks.prefill_lens, adapter_ids=cat(decode.adapter_ids, chunks.adapter_ids))

    @property
    def num_decode(self) -> int:
        return self.decode_lens.shape[0]

    @property
    def num_prefill(self) -> int:
        return self.prefill_lens.shape[0]


def slots_of(tables, positions, live, page_size: int, dropped: int, xp=jnp):
    """Flat KV slots of positions (R, ...) through each row's block table (R, M); `dropped` where
    not live (a position past the table, on a row that is not live, is never looked up)."""
    by_row = positions if positions.ndim == 2 else positions[:, None]  # (R, T)
    index = xp.minimum(by_row // page_size, tables.shape[1] - 1)
    pages = xp.take_along_axis(tables, index, axis=1).reshape(positions.shape)
    return xp.where(live, pages * page_size + positions % page_size, dropped).astype(np.int32)


def quantize(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """x (..., H) -> (values (..., H) in dtype, scales (...) float32): one scale per head vector,
    max |x| / the dtype's largest value (int8: rounded to nearest, fp8: cast)."""
    xf = x.astype(jnp.float32)
    qmax = _QMAX[jnp.dtype(dtype)]
    scale = jnp.max(jnp.abs(xf), axis=-1) / qmax
    scale = jnp.where(scale > 0, scale, 1.0)
    y = xf / scale[..., None]
    if jnp.dtype(dtype) == jnp.dtype(jnp.int8):
        y = jnp.clip(jnp.round(y), -qmax, qmax)
    return y.astype(dtype), scale


def dequantize(values: jax.Array, scales: jax.Array, dtype) -> jax.Array:
    """The inverse of `quantize`: (..., H) values times their (...) scales, in dtype."""
    return (values.astype(jnp.float32) * scales[..., None]).astype(dtype)


def fake_quantize(x: jax.Array, dtype) -> jax.Array:
    """x (..., H) as a quantised cache returns it: quantised per head vector, dequantised to x.dtype."""
    return dequantize(*quantize(x, dtype), x.dtype)


@jax.jit
def copy_pages(cache: PagedKVCache, src: jax.Array, dst: jax.Array) -> PagedKVCache:
    """Copy whole pages src[i] -> dst[i] in every layer (copy-on-write of shared pages), scales too."""
    return jax.tree.map(lambda x: x.at[:, :, dst].set(x[:, :, src]), cache)


def copy_slots(cache: PagedKVCache, src: jax.Array, dst: jax.Array) -> PagedKVCache:
    """Copy token slots (page * page_size + offset) src[i] -> dst[i] in every layer, scales too
    (an accepted draft-tree path compacted into place); dst past the cache: nothing copied."""
    def move(x):  # (L, K, P, page, ...)
        flat = x.reshape(*x.shape[:2], -1, *x.shape[4:])  # (L, K, P * page, ...)
        return flat.at[:, :, dst].set(flat.at[:, :, src].get(mode="clip"), mode="drop").reshape(x.shape)

    return jax.tree.map(move, cache)
