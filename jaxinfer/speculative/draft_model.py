"""A smaller model with the target's vocabulary drafts tokens autoregressively.

It keeps its own paged KV cache, laid out like the target's and addressed through the same
block tables (the target's pages hold both models' K/V for the same positions), so the scheduler's
page reservations, prefix sharing, copy-on-write and frees cover it. It catches up lazily: each
proposal first runs the tokens since its cache was last valid (`Sequence.draft_computed`; after a
prompt, the whole prompt) as one chunk, then drafts k tokens, each drawn from the draft's filtered
distribution q (the target's sampling parameters applied to the draft's logits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import buckets
from jaxinfer.buckets import next_power_of_2
from jaxinfer.checkpoints.weights import load_model
from jaxinfer.models import decoder as model_lib
from jaxinfer.models.kv_cache import BatchDescriptor, PagedKVCache, copy_pages
from jaxinfer.sampling.sampler import SamplingBatch, SamplingParams, filtered_probs
from jaxinfer.speculative.config import DraftContext, Proposal, register_drafter

DRAFT_KEYS = 1 << 22  # fold_in offset of the drafters' random draws (apart from the acceptance rule's)


def draw(logits: jax.Array, sp: SamplingBatch, keys: jax.Array, j) -> tuple[jax.Array, jax.Array]:
    """Each row's j-th draft and the distribution it was drawn from: (R,) int32, (R, V)."""
    q = filtered_probs(logits, sp)
    d = jax.vmap(lambda key, p: jax.random.categorical(jax.random.fold_in(key, DRAFT_KEYS + j), jnp.log(p)))(keys, q)
    return d.astype(jnp.int32), q


def row_keys(sp: SamplingBatch, steps: jax.Array) -> jax.Array:
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(sp.seed, steps)


def chunk_batch(start, lens, tables, C: int, page_size: int, num_pages: int) -> BatchDescriptor:
    """R prefill rows of C tokens from start (lens valid), logits at each row's last valid token."""
    return BatchDescriptor.chunk_rows(start, lens, tables, C, page_size, num_pages * page_size)


def decode_batch(pos, live, tables, page_size: int, num_pages: int) -> BatchDescriptor:
    """One token per row at pos (R,), written where live."""
    return BatchDescriptor.decode_rows(pos, live, tables, page_size, num_pages * page_size)


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "k"), donate_argnames=("cache",))
def _propose(params, cfg, chunk, start, lens, tables, valid, cache, sp, steps, *, impl, k):
    """chunk (R, C) tokens from start (lens valid) -> drafts (R, k), their q (R, k, V), the cache.
    A row writes K/V for its chunk and for its first valid[r] - 1 drafts (the inputs of the rest)."""
    R, C = chunk.shape
    page, P = cache.page_size, cache.num_pages
    keys = row_keys(sp, steps)
    out = model_lib.forward_paged(params, cfg, chunk.reshape(-1), cache,
                                  chunk_batch(start, lens, tables, C, page, P), impl=impl)
    first, q_first = draw(out.logits, sp, keys, 0)

    def one(carry, j):
        token, cache = carry
        pos = start + lens - 1 + j  # position of draft j (j = 1 .. k - 1)
        batch = decode_batch(pos, j < valid, tables, page, P)
        out = model_lib.forward_paged(params, cfg, token, cache, batch, impl=impl)
        d, q = draw(out.logits, sp, keys, j)
        return (d, out.cache), (d, q)

    (_, cache), (rest, q_rest) = jax.lax.scan(one, (first, out.cache), jnp.arange(1, k))
    drafts = jnp.concatenate([first[None], rest], axis=0).T  # (R, k)
    probs = jnp.concatenate([q_first[None], q_rest], axis=0).transpose(1, 0, 2)  # (R, k, V)
    return drafts, probs, cache


def pages_bucket(seqs, page_size: int, max_seq_len: int) -> int:
    return buckets.pages_bucket(max(len(s.pages) for s in seqs), page_size, max_seq_len)


def sampling_rows(seqs, R: int) -> SamplingBatch:
    pad = [SamplingParams(temperature=0.0)] * (R - len(seqs))
    return SamplingBatch.from_params([s.sampling for s in seqs] + pad, [s.seed for s in seqs] + [0] * len(pad))


class DraftModelDrafter:
    def __init__(self, draft, num_pages: int, page_size: int, max_seq_len: int, impl):
        self.model, self.impl = draft, impl
        self.page_size, self.max_seq_len = page_size, max_seq_len
        self.cache = PagedKVCache.zeros(draft.config, num_pages, page_size, draft.dtype)

    def propose(self, seqs, num_drafts, k, features) -> Proposal:
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
        drafts, probs, self.cache = _propose(
            self.model.params, self.model.config, chunk, start, lens, tables, valid, self.cache,
            sampling_rows(seqs, R), steps, impl=self.impl, k=k)
        for s, w in zip(seqs, num_drafts):
            s.draft_computed = len(s.tokens) + max(w - 1, 0)  # valid if the target accepts its drafts
        return Proposal(drafts, probs)

    def accepted(self, seqs) -> None:
        for s in seqs:
            s.draft_computed = min(s.draft_computed, s.num_computed)

    def copy_pages(self, copies) -> None:
        src, dst = (jnp.asarray(x, jnp.int32) for x in zip(*copies))
        self.cache = copy_pages(self.cache, src, dst)


@register_drafter("draft", checkpoint=True, features=False, distributions=True)
def build(ctx: DraftContext) -> DraftModelDrafter:
    target = ctx.target
    draft = load_model(ctx.path, dtype=target.dtype)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft={ctx.config.draft!r} has a vocabulary of {draft.config.vocab_size} tokens, the target "
                         f"{target.config.vocab_size}: a draft model must share the target's vocabulary")
    return DraftModelDrafter(draft, ctx.num_pages, ctx.page_size, ctx.max_seq_len, ctx.impl)
