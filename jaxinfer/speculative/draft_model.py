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

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import buckets
from jaxinfer.buckets import next_power_of_2
from jaxinfer.checkpoints.weights import load_model
from jaxinfer.models import decoder as model_lib
from jaxinfer.models.kv_cache import BatchDescriptor, PagedKVCache, copy_pages
from jaxinfer.sampling.processors import Vocab
from jaxinfer.sampling.sampler import SamplingBatch, sample
from jaxinfer.speculative.config import DraftContext, Proposal, register_drafter


def draft_token(logits: jax.Array, sp: SamplingBatch, steps: jax.Array, j, drafted: jax.Array):
    """Each row's draft j from the drafter's logits (R, V), drawn with the target's key for token
    steps + j; drafted (R, k) the row's drafts so far (-1 after). -> (R,) int32, drafted with it."""
    d = sample(logits, sp, steps + j, drafted)
    return d, drafted.at[:, j].set(d)


def chunk_batch(start, lens, tables, C: int, page_size: int, num_pages: int) -> BatchDescriptor:
    """R prefill rows of C tokens from start (lens valid), logits at each row's last valid token."""
    return BatchDescriptor.chunk_rows(start, lens, tables, C, page_size, num_pages * page_size)


def decode_batch(pos, live, tables, page_size: int, num_pages: int) -> BatchDescriptor:
    """One token per row at pos (R,), written where live."""
    return BatchDescriptor.decode_rows(pos, live, tables, page_size, num_pages * page_size)


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
    return buckets.pages_bucket(max(len(s.pages) for s in seqs), page_size, max_seq_len)


class DraftModelDrafter:
    def __init__(self, draft, num_pages: int, page_size: int, max_seq_len: int, impl, vocab: Vocab):
        """vocab: the target's (its processors' arrays are filled for it)."""
        self.model, self.impl, self.vocab = draft, impl, vocab
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
        drafts, self.cache = _propose(
            self.model.params, self.model.config, chunk, start, lens, tables, valid, self.cache,
            SamplingBatch.from_rows(seqs, R, self.vocab, drafting=True), steps, impl=self.impl, k=k)
        for s, w in zip(seqs, num_drafts):
            s.draft_computed = len(s.tokens) + max(w - 1, 0)  # valid if the target accepts its drafts
        return Proposal(drafts)

    def accepted(self, seqs) -> None:
        for s in seqs:
            s.draft_computed = min(s.draft_computed, s.num_computed)

    def copy_pages(self, copies) -> None:
        src, dst = (jnp.asarray(x, jnp.int32) for x in zip(*copies))
        self.cache = copy_pages(self.cache, src, dst)


@register_drafter("draft", checkpoint=True, features=False, markers=("config.json",))
def build(ctx: DraftContext) -> DraftModelDrafter:
    target = ctx.target
    draft = load_model(ctx.path, dtype=target.dtype)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft={ctx.config.draft!r} has a vocabulary of {draft.config.vocab_size} tokens, the target "
                         f"{target.config.vocab_size}: a draft model must share the target's vocabulary")
    return DraftModelDrafter(draft, ctx.num_pages, ctx.page_size, ctx.max_seq_len, ctx.impl, Vocab.of(target))
