"""EAGLE drafting (chain): a one-layer network at the feature level (heads.py) drafts k tokens.

Its layer keeps a one-layer paged KV cache addressed through the target's block tables. The K/V
at position t come from the pair (f_t, x_{t+1}), so they can be written once the target has
computed position t and the token after it exists. Each proposal first runs, as one chunk, the
pairs the cache lacks with the target's true features (from the runner's feature cache) — after a
prompt, all of them; after a verify pass, the accepted ones — and the chunk's last output is the
first draft's feature; then k - 1 more steps feed the layer its own predicted feature and draft.
The K/V those steps write came from predicted features, so the cache stays valid only up to the
last true position (`Sequence.draft_computed`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import attention
from jaxinfer import model as model_lib
from jaxinfer import sharding
from jaxinfer.kv_cache import PagedKVCache, copy_pages
from jaxinfer.requests import next_power_of_2
from jaxinfer.speculative.config import Proposal
from jaxinfer.speculative.draft_model import (
    chunk_batch, decode_batch, draw, pages_bucket, row_keys, sampling_rows,
)
from jaxinfer.speculative.heads import eagle_features, eagle_inputs, eagle_layer_config, load_heads


def _layer(cfg1, heads, x, cache, batch, impl):
    """The EAGLE layer over a flat step: x (N, D) at batch.positions -> output (N, D), cache."""
    positions = batch.positions[None]
    cos, sin = model_lib.rope_tables(cfg1, positions, x.dtype)

    def attend(q, k, v):
        return attention.attend_cached(cache, 0, q, k, v, positions, cfg1.layer_windows[0], batch, impl=impl.attention)

    out, cache = model_lib.layer(cfg1, heads["layer"], x[None], cos, sin, attend, model_lib.dense_projection(impl))
    return out[0], cache


@functools.partial(jax.jit, static_argnames=("cfg", "cfg1", "impl", "k"), donate_argnames=("cache",))
def _propose(target_params, cfg, cfg1, heads, features, cache, next_tokens, start, lens, tables, valid, sp, steps,
             *, impl, k):
    """Pairs (f_t, x_{t+1}) for t in [start, start + lens) per row -> drafts (R, k), q (R, k, V), cache."""
    R, C = next_tokens.shape
    page, P = cache.page_size, cache.num_pages
    keys = row_keys(sp, steps)
    batch = chunk_batch(start, lens, tables, C, page, P)
    f = features[batch.slot_mapping].reshape(R, C, -1)  # the target's features (dropped slots: clamped junk)
    out, cache = _layer(cfg1, heads, eagle_inputs(target_params, heads, f, next_tokens).reshape(R * C, -1), cache,
                        batch, impl)
    feature = eagle_features(target_params, cfg, out[batch.logits_at])  # (R, D)
    first, q_first = draw(model_lib.lm_head(target_params, cfg, feature), sp, keys, 0)

    def one(carry, j):
        token, feature, cache = carry
        batch = decode_batch(start + lens - 1 + j, j < valid, tables, page, P)
        out, cache = _layer(cfg1, heads, eagle_inputs(target_params, heads, feature, token), cache, batch, impl)
        feature = eagle_features(target_params, cfg, out)
        d, q = draw(model_lib.lm_head(target_params, cfg, feature), sp, keys, j)
        return (d, feature, cache), (d, q)

    (_, _, cache), (rest, q_rest) = jax.lax.scan(one, (first, feature, cache), jnp.arange(1, k))
    drafts = jnp.concatenate([first[None], rest], axis=0).T
    probs = jnp.concatenate([q_first[None], q_rest], axis=0).transpose(1, 0, 2)
    return drafts, probs, cache


class EagleDrafter:
    features = True

    def __init__(self, target, path: str, num_pages: int, page_size: int, max_seq_len: int, impl):
        self.target, self.impl = target, impl
        self.page_size, self.max_seq_len = page_size, max_seq_len
        checkpoint = sharding.logical_config(target)  # the heads' shapes (a placed target may replicate KV heads)
        self.cfg1 = eagle_layer_config(checkpoint)
        self.heads, _ = load_heads(path, "eagle", checkpoint, target.dtype)
        self.cache = PagedKVCache.zeros(self.cfg1, num_pages, page_size, target.dtype)

    def propose(self, seqs, num_drafts, k, runner) -> Proposal:
        R = next_power_of_2(len(seqs))
        C = next_power_of_2(max(s.num_computed - s.draft_computed for s in seqs), 2)
        M = pages_bucket(seqs, self.page_size, self.max_seq_len)
        next_tokens, tables = np.zeros((R, C), np.int32), np.zeros((R, M), np.int32)
        start, lens, valid, steps = (np.zeros(R, np.int32) for _ in range(4))
        for i, (s, w) in enumerate(zip(seqs, num_drafts)):
            c = s.num_computed - s.draft_computed
            next_tokens[i, :c] = s.tokens[s.draft_computed + 1 : s.num_computed + 1]
            tables[i, : len(s.pages)] = s.pages
            start[i], lens[i], valid[i], steps[i] = s.draft_computed, c, w, len(s.generated)
        drafts, probs, self.cache = _propose(
            self.target.params, self.target.config, self.cfg1, self.heads, runner.features, self.cache, next_tokens,
            start, lens, tables, valid, sampling_rows(seqs, R), steps, impl=self.impl, k=k)
        for s in seqs:
            s.draft_computed = s.num_computed  # later positions were written from predicted features
        return Proposal(drafts, probs)

    def accepted(self, seqs) -> None:
        for s in seqs:
            s.draft_computed = min(s.draft_computed, s.num_computed)

    def copy_pages(self, copies) -> None:
        src, dst = (jnp.asarray(x, jnp.int32) for x in zip(*copies))
        self.cache = copy_pages(self.cache, src, dst)
