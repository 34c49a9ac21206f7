"""The acceptance rule that makes speculative decoding lossless, and batch-independent.

A drafter proposed tokens d_1..d_k for a sequence; one target pass over [last, d_1, .., d_k] gives
the target's logits at each of the k + 1 positions. At every position j the target's own token
s_j is drawn exactly as plain decoding draws it (jaxinfer.sampling.sampler.draw: the processors,
with the drafts before j counted as generated tokens, temperature, the top-k / top-p / min-p cuts,
and the key of the token's index, step + j). Drafts are accepted while they equal those tokens:
d_j is kept if d_1..d_j all equal s_0..s_{j-1}, and the pass emits s_0..s_a, a = the drafts kept.

Every emitted token is then the very token plain decoding would have drawn at its index, so the
output is the target's, token for token at any temperature, whatever the drafter proposed and
whether a token came from a verify pass or a plain step: a request's tokens do not depend on its
batch. A drafter that draws its drafts with the same keys (sampler.draw with the target's seed
and index) proposes s_j whenever its distribution allows, by the Gumbel-max coupling: a draft
from q equals the target's token from p with probability at least (1 - TV) / (1 + TV), TV the
total variation distance of p and q (Daliri, Musco and Suresh 2024); a deterministic drafter's
draft d is accepted with probability p(d), as under the rejection rule (Leviathan et al. 2023).

Axes: R rows (sequences), k drafts per row, C = k + 1 positions, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.sampling.sampler import Sampled, SamplingBatch, draw, process, row_keys
from jaxinfer.speculative import tree as tree_lib

_UNIFORM = 1 << 20  # fold_in offset of the synthetic rule's draws (apart from the sampler's)


def target_tokens(logits: jax.Array, sp: SamplingBatch, steps: jax.Array, recent: jax.Array) -> Sampled:
    """logits (R, C, V), steps (R, C) each position's token index, recent (R, C, J) the tokens
    before each position that the host has not seen (-1: none) -> the target's draw at every
    position, Sampled with (R, C) tokens."""
    R, C, V = logits.shape
    out = draw(logits.reshape(R * C, V), sp.per_position(R, C), steps.reshape(-1), recent.reshape(R * C, -1))
    return out.reshape(R, C)


def accept(
    logits: jax.Array,  # (R, k + 1, V) float32: the target's logits after last, d_1, .., d_k
    drafts: jax.Array,  # (R, k) int32
    num_drafts: jax.Array,  # (R,) int32: a row's drafts past num_drafts are padding, never accepted
    sp: SamplingBatch,  # (R,) each row's sampling parameters, or (R * (k + 1),) each position's
    step: jax.Array,  # (R,) index of the first token this pass emits (the request's generated count)
) -> tuple[jax.Array, Sampled]:
    """-> (accepted (R,) int32, Sampled with tokens (R, k + 1)): tokens[r, :accepted[r]] are the
    accepted drafts and tokens[r, accepted[r]] the target's own token after them; later entries
    are the target's draws after rejected drafts (not emitted)."""
    R, C, _ = logits.shape
    k = C - 1
    before = jnp.arange(k)[None, :] < jnp.arange(C)[:, None]  # (C, k): draft i precedes position j
    recent = jnp.where(before[None], drafts[:, None, :], -1)  # (R, C, k)
    out = target_tokens(logits, sp, step[:, None] + jnp.arange(C)[None, :], recent)
    match = (drafts == out.tokens[:, :k]) & (jnp.arange(k)[None, :] < num_drafts[:, None])
    accepted = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1)  # (R,)
    return accepted.astype(jnp.int32), out


def accept_synthetic(
    logits: jax.Array,  # (R, k + 1, V)
    num_drafts: jax.Array,  # (R,)
    sp: SamplingBatch,
    step: jax.Array,  # (R,)
    rate: float,
) -> tuple[jax.Array, Sampled]:
    """A stand-in drafter for measuring the engine at a set acceptance rate where no trained
    drafter exists: each draft is accepted with probability `rate` (independently, in order), and
    the emitted tokens are the target's argmax at each position (after the row's processors). NOT
    lossless: positions after the first were computed after the stand-in's tokens, not the emitted
    ones. Same outputs as `accept`."""
    R, K1, V = logits.shape
    k = K1 - 1
    keys = row_keys(sp.seed[:: sp.seed.shape[0] // R], step)  # a row's seed (sp may hold one per position)
    u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, _UNIFORM), (k,)))(keys)  # (R, k)
    ok = (u < rate) & (jnp.arange(k)[None, :] < num_drafts[:, None])
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    steps = (step[:, None] + jnp.arange(K1)[None, :]).reshape(-1)
    x = process(logits.reshape(R * K1, V), sp.per_position(R, K1), steps).reshape(R, K1, V)
    return accepted.astype(jnp.int32), Sampled(jnp.argmax(x, axis=-1).astype(jnp.int32))


def accept_tree(
    logits: jax.Array,  # (R, C, V) float32: the target's logits at every tree token (tree.py's layout)
    drafts: jax.Array,  # (R, k) int32: tree tokens 1..k
    parents: jax.Array,  # (R, k) int32: each draft's parent (0: the root)
    num_drafts: jax.Array,  # (R,) int32: drafts past num_drafts are not in the tree
    sp: SamplingBatch,
    step: jax.Array,  # (R,)
) -> tuple[jax.Array, Sampled, jax.Array]:
    """The same rule over a tree of candidates: at every tree token the target draws its own token
    (at the index of the token's depth, the token's ancestors counted as generated); from the
    root, the walk moves to the child whose token equals the current token's draw (children of one
    parent are distinct tokens: a repeat is never taken), and emits the draw where no child
    matches. A deterministic tree's child c is taken with the target's probability of c, as under
    SpecInfer's rule (Miao et al. 2024). -> accepted (R,), Sampled with tokens (R, C) (the
    emitted ones first, as `accept`), path (R, C): the accepted tokens' tree indices (path[:, 0] =
    0, the root; entries past accepted are 0)."""
    R, C, V = logits.shape
    k = C - 1
    visible, depth = tree_lib.ancestry(parents, num_drafts)  # (R, C, C), (R, C)
    tokens_all = jnp.concatenate([jnp.zeros((R, 1), drafts.dtype), drafts], axis=1)  # (R, C)
    ancestors = visible & ~jnp.eye(C, dtype=jnp.bool_)[None] & (jnp.arange(C) > 0)[None, None, :]
    recent = jnp.where(ancestors, tokens_all[:, None, :], -1)  # (R, C, C): a token's drafted ancestors
    out = target_tokens(logits, sp, step[:, None] + depth, recent)
    up = tree_lib.full_parents(parents)  # (R, C); the root is its own parent
    live = (jnp.arange(C)[None, :] >= 1) & (jnp.arange(C)[None, :] <= num_drafts[:, None])
    rows = jnp.arange(R)

    def level(i, carry):
        cur, done, accepted, path = carry
        want = out.tokens[rows, cur]  # (R,) the target's draw at the current token
        child = live & (up == cur[:, None]) & (tokens_all == want[:, None]) & ~done[:, None]  # (R, C)
        moved = jnp.any(child, axis=1)
        nxt = jnp.argmax(child, axis=1).astype(jnp.int32)  # the first matching child
        path = path.at[rows, accepted + 1].set(jnp.where(moved, nxt, path[rows, accepted + 1]), mode="drop")
        return jnp.where(moved, nxt, cur), done | ~moved, accepted + moved, path

    start = (jnp.zeros(R, jnp.int32), jnp.zeros(R, jnp.bool_), jnp.zeros(R, jnp.int32), jnp.zeros((R, C), jnp.int32))
    _, _, accepted, path = jax.lax.fori_loop(0, k, level, start)
    # The emitted tokens are the draws along the path: the draw at path[m] is the token of path[m + 1].
    emitted = jax.tree.map(lambda x: jnp.take_along_axis(x, path.reshape(R, C, *([1] * (x.ndim - 2))), axis=1), out)
    return accepted, emitted, path
