"""A smaller model with the target's vocabulary drafts tokens autoregressively.

It keeps its own paged KV cache, laid out like the target's and addressed through the same
block tables (the target's pages hold both models' K/V for the same positions), so the scheduler's
page reservations, prefix sharing, copy-on-write and frees cover it. It catches up lazily: each
proposal first runs the tokens since its cache was last valid (`Sequence.draft_computed`; after a
prompt, the whole prompt) as one chunk, then drafts k tokens, each drawn as the target will draw
the token of that index (`draft_token`: the target's sampling parameters, processors and key
applied to the draft's logits), which is what makes a draft likely to be accepted (accept.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.buckets import next_power_of_2
from jaxinfer.models import decoder as model_lib
from jaxinfer.models.kv_cache import BatchDescriptor, PagedKVCache, copy_pages
from jaxinfer.sampling.sampler import SamplingBatch, sample
from jaxinfer.speculative.config import Proposal

MIN_PAGES = 4


def draft_token(logits: jax.Array, sp: SamplingBatch, steps: jax.Array, j, drafted: jax.Array):
    """Each row's draft j from the drafter's logits (R, V), drawn with the target's key for token
    steps + j; drafted (R, k) the row's drafts so far (-1 after). -> (R,) int32, drafted with it."""
    d = sample(logits, sp, steps + j, drafted)
    return d, drafted.at[:, j].set(d)


def slots_of(tables: jax.Array, positions: jax.Array, live: jax.Array, page_size: int, num_pages: int) -> jax.Array:
    """Flat KV slots of positions (R, ...) through each row's block table; dropped where not live."""
    index = jnp.minimum(positions // page_size, tables.shape[1] - 1).reshape(tables.shape[0], -1)
    pages = jnp.take_along_axis(tables, index, axis=1)
    slots = pages.reshape(positions.shape) * page_size + positions % page_size
    return jnp.where(live, slots, num_pages * page_size)


def chunk_batch(start, lens, tables, C: int, page_size: int, num_pages: int) -> BatchDescriptor:
    """R prefill rows of C tokens from start (lens valid), logits at each row's last valid token."""
    R = start.shape[0]
    pos = start[:, None] + jnp.arange(C)[None, :]  # (R, C)
    live = jnp.arange(C)[None, :] < lens[:, None]
    return BatchDescriptor(
        positions=pos.reshape(-1), logits_at=jnp.arange(R) * C + jnp.maximum(lens - 1, 0),
        slot_mapping=slots_of(tables, pos, live, page_size, num_pages).reshape(-1),
        decode_block_tables=jnp.zeros((0, tables.shape[1]), jnp.int32), decode_lens=jnp.zeros((0,), jnp.int32),
        prefill_block_tables=tables, prefill_start=start, prefill_lens=lens)


def decode_batch(pos, live, tables, page_size: int, num_pages: int) -> BatchDescriptor:
    """One token per row at pos (R,), written where live."""
    R = pos.shape[0]
    return BatchDescriptor(
        positions=pos, logits_at=jnp.arange(R), slot_mapping=slots_of(tables, pos, live, page_size, num_pages),
        decode_block_tables=tables, decode_lens=jnp.where(live, pos + 1, 0),
        prefill_block_tables=jnp.zeros((0, tables.shape[1]), jnp.int32), prefill_start=jnp.zeros((0,), jnp.int32),
        prefill_lens=jnp.zeros((0,), jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "k"), donate_argnames=("cache",))
def _propose(params, cfg, chunk, start, lens, tables, valid, cache, sp, steps, *, impl, k):
    """chunk (R, C) tokens from start (lens valid) -> drafts (R, k), the cache. A row writes K/V
    for its chunk and for its first valid[r] - 1 drafts (the inputs of the rest)."""
    R, C = chunk.shape
    page, P = cache.page_size, cache.num_pages
    out = model_lib.forward_paged(params, cfg, chunk.reshape(-1), cache,
                                  chunk_batch(start, lens, tables, C, page, P), impl=impl)
    first, drafted = draft_token(out.logits, sp, steps, 0, jnp.full((R, k), -1, jnp.int32))

    def one(carry, j):
        token, drafted, cache = carry
        pos = start + lens - 1 + j  # position of draft j (j = 1 .. k - 1)
        batch = decode_batch(pos, j < valid, tables, page, P)
        out = model_lib.forward_paged(params, cfg, token, cache, batch, impl=impl)
        d, drafted = draft_token(out.logits, sp, steps, j, drafted)
        return (d, drafted, out.cache), None

    (_, drafted, cache), _ = jax.lax.scan(one, (first, drafted, out.cache), jnp.arange(1, k))
    return drafted, cache


def pages_bucket(seqs, page_size: int, max_seq_len: int) -> int:
    return next_power_of_2(max(len(s.pages) for s in seqs), min(MIN_PAGES, math.ceil(max_seq_len / page_size)))


class DraftModelDrafter:
    features = False

    def __init__(self, draft, num_pages: int, page_size: int, max_seq_len: int, impl):
        self.model, self.impl = draft, impl
        self.page_size, self.max_seq_len = page_size, max_seq_len
        self.cache = PagedKVCache.zeros(draft.config, num_pages, page_size, draft.dtype)

    def propose(self, seqs, num_drafts, k, runner) -> Proposal:
        R = next_power_of_2(len(seqs))
        C = next_power_of_2(max(len(s.tokens) - s.draft_computed for s in seqs), 2)
        M = pages_bucket(seqs, self.page_size, self.max_seq_len)
        chunk, tables = np.zeros((R, C), np.int32), np.zeros((R, M), np.int32)
        start, lens, valid, steps = (np.zeros(R, np.int32) for _ in range(4))
        for i, (s, w) in enumerate(zip(seqs, num_drafts)):
            c = len(s.tokens) - s.draft_computed
            chunk[i, :c] = s.tokens[s.draft_computed :]
            tables[i, : len(s.pages)] = s.pages
            start[i], lens[i], valid[i], steps[i] = s.draft_computed, c, w, len(s.generated)
        drafts, self.cache = _propose(
            self.model.params, self.model.config, chunk, start, lens, tables, valid, self.cache,
            runner.sampling_batch(seqs, R), steps, impl=self.impl, k=k)
        for s, w in zip(seqs, num_drafts):
            s.draft_computed = len(s.tokens) + max(w - 1, 0)  # valid if the target accepts its drafts
        return Proposal(drafts)

    def accepted(self, seqs) -> None:
        for s in seqs:
            s.draft_computed = min(s.draft_computed, s.num_computed)

    def copy_pages(self, copies) -> None:
        src, dst = (jnp.asarray(x, jnp.int32) for x in zip(*copies))
        self.cache = copy_pages(self.cache, src, dst)
