"""The acceptance rule that makes speculative decoding lossless.

A drafter proposed tokens d_1..d_k for a sequence, drawing d_j from its distribution q_j; one
target pass over [last, d_1, .., d_k] gives the target's logits at each of the k + 1 positions,
turned into the distribution p_j the plain sampler would draw from (temperature, top-k, top-p,
min-p; one-hot on the argmax for a greedy row). Then, in order, d_j is accepted with probability
min(1, p_j(d_j) / q_j(d_j)); at the first rejection the token is drawn from norm(max(0, p_j - q_j))
instead, and if all k are accepted a bonus token is drawn from p_{k+1}. Every emitted token is
then distributed exactly as the target would have sampled it (Leviathan et al. 2023; Chen et al.
2023). A greedy row keeps the longest prefix equal to the target's argmax, plus the argmax after
it. A deterministic drafter (n-gram, a greedy draft) has q one-hot on its token.

Axes: R rows (sequences), k drafts per row, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.sampling.sampler import SamplingBatch, filtered_probs

# fold_in offsets that keep this rule's random draws apart from the drafters' and the sampler's.
_UNIFORM, _FINAL = 1 << 20, 1 << 21


def _row_keys(sp: SamplingBatch, step: jax.Array) -> jax.Array:
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(sp.seed, step)


def accept(
    logits: jax.Array,  # (R, k + 1, V) float32: the target's logits after last, d_1, .., d_k
    drafts: jax.Array,  # (R, k) int32
    draft_probs: jax.Array | None,  # (R, k, V) the q each draft was drawn from; None: one-hot on the draft
    num_drafts: jax.Array,  # (R,) int32: a row's drafts past num_drafts are padding, never accepted
    sp: SamplingBatch,  # (R,) each row's sampling parameters
    step: jax.Array,  # (R,) index of the first token this pass emits (the request's generated count)
) -> tuple[jax.Array, jax.Array]:
    """-> (accepted (R,) int32, tokens (R, k + 1) int32): tokens[r, :accepted[r]] are the accepted
    drafts and tokens[r, accepted[r]] the target's own token after them; later entries are 0."""
    R, K1, V = logits.shape
    k = K1 - 1
    per_position = SamplingBatch(*(jnp.repeat(jnp.asarray(a), K1, axis=0) for a in
                                   (sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.seed)))
    p = filtered_probs(logits.reshape(R * K1, V), per_position).reshape(R, K1, V)
    q = jax.nn.one_hot(drafts, V, dtype=p.dtype) if draft_probs is None else draft_probs.astype(p.dtype)
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # (R, k)
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]

    keys = _row_keys(sp, step)
    u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, _UNIFORM), (k,)))(keys)  # (R, k)
    ok = (u * q_d < p_d) & (jnp.arange(k)[None, :] < num_drafts[:, None])  # accept with prob min(1, p / q)
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # (R,)

    rows = jnp.arange(R)
    p_a = p[rows, accepted]  # (R, V)
    q_a = jnp.where((accepted < num_drafts)[:, None], q[rows, jnp.minimum(accepted, k - 1)], 0.0)
    residual = jnp.maximum(p_a - q_a, 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_a)
    final = jax.vmap(lambda key, r: jax.random.categorical(jax.random.fold_in(key, _FINAL), jnp.log(r)))(keys, residual)

    positions = jnp.arange(K1)[None, :]
    padded = jnp.concatenate([drafts, jnp.zeros((R, 1), drafts.dtype)], axis=1)
    tokens = jnp.where(positions < accepted[:, None], padded, 0)
    tokens = jnp.where(positions == accepted[:, None], final[:, None].astype(jnp.int32), tokens)
    return accepted.astype(jnp.int32), tokens.astype(jnp.int32)


def accept_synthetic(
    logits: jax.Array,  # (R, k + 1, V)
    num_drafts: jax.Array,  # (R,)
    sp: SamplingBatch,
    step: jax.Array,  # (R,)
    rate: float,
) -> tuple[jax.Array, jax.Array]:
    """A stand-in drafter for measuring the engine at a set acceptance rate where no trained
    drafter exists: each draft is accepted with probability `rate` (independently, in order), and
    the emitted tokens are the target's argmax at each position. NOT lossless: positions after the
    first were computed after the stand-in's tokens, not the emitted ones. Same outputs as `accept`."""
    R, K1, _ = logits.shape
    k = K1 - 1
    keys = _row_keys(sp, step)
    u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, _UNIFORM), (k,)))(keys)  # (R, k)
    ok = (u < rate) & (jnp.arange(k)[None, :] < num_drafts[:, None])
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    tokens = jnp.where(jnp.arange(K1)[None, :] <= accepted[:, None], jnp.argmax(logits, axis=-1), 0)
    return accepted.astype(jnp.int32), tokens.astype(jnp.int32)


def accept_tree(
    logits: jax.Array,  # (R, C, V) float32: the target's logits at every tree token (tree.py's layout)
    drafts: jax.Array,  # (R, k) int32: tree tokens 1..k
    parents: jax.Array,  # (R, k) int32: each draft's parent (0: the root)
    num_drafts: jax.Array,  # (R,) int32: drafts past num_drafts are not in the tree
    sp: SamplingBatch,
    step: jax.Array,  # (R,)
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The lossless rule over a tree of deterministic candidates (SpecInfer; EAGLE-2's
    evaluate_posterior): from the root, with r the target's distribution p at the current token,
    its children c_1, c_2, .. (in index order) are tried in turn: c_i is accepted with probability
    r(c_i) / sum(r), else r(c_i) is zeroed. Accepting moves to c_i with r = p there; when no child
    is accepted (or there is none), the token is drawn from r. Each emitted token is distributed as
    the target samples it, whatever the tree. Greedy rows (p one-hot) follow the child equal to the
    target's argmax. Children of one parent are distinct tokens (a repeat is never accepted).
    -> accepted (R,), tokens (R, C) (as `accept`), path (R, C): the accepted tokens' tree indices
    (path[:, 0] = 0, the root; entries past accepted are 0)."""
    R, C, V = logits.shape
    k = C - 1
    per_position = SamplingBatch(*(jnp.repeat(jnp.asarray(a), C, axis=0) for a in
                                   (sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.seed)))
    p = filtered_probs(logits.reshape(R * C, V), per_position).reshape(R, C, V)
    up = jnp.concatenate([jnp.full((R, 1), -1, parents.dtype), parents], axis=1)  # (R, C); the root has none
    tokens_all = jnp.concatenate([jnp.zeros((R, 1), drafts.dtype), drafts], axis=1)  # (R, C)
    live = (jnp.arange(C)[None, :] >= 1) & (jnp.arange(C)[None, :] <= num_drafts[:, None])
    earlier = jnp.tril(jnp.ones((C, C), jnp.bool_), -1)  # [j, i]: i < j
    keys = _row_keys(sp, step)
    u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, _UNIFORM), (C,)))(keys)  # (R, C)
    rows = jnp.arange(R)

    def level(i, carry):
        cur, r, done, accepted, path = carry
        child = live & (up == cur[:, None]) & ~done[:, None]  # (R, C): the current token's children
        same = (tokens_all[:, :, None] == tokens_all[:, None, :]) & child[:, None, :] & earlier[None]
        fresh = child & ~jnp.any(same, axis=2)  # a sibling's repeat has r = 0 there
        r_tok = jnp.where(fresh, jnp.take_along_axis(r, tokens_all, axis=1), 0.0)  # (R, C)
        before = jnp.cumsum(r_tok, axis=1) - r_tok  # mass of the earlier (rejected) siblings
        total = jnp.sum(r, axis=1, keepdims=True)
        ok = child & (u * (total - before) < r_tok)
        moved = jnp.any(ok, axis=1)
        nxt = jnp.argmax(ok, axis=1).astype(jnp.int32)  # the first accepted child
        rejected = jnp.zeros((R, V), jnp.bool_).at[rows[:, None], jnp.where(child, tokens_all, V)].set(True, mode="drop")
        r = jnp.where(moved[:, None], p[rows, nxt], jnp.where(rejected, 0.0, r))
        path = path.at[rows, accepted + 1].set(jnp.where(moved, nxt, path[rows, accepted + 1]), mode="drop")
        return (jnp.where(moved, nxt, cur), r, done | ~moved, accepted + moved, path)

    start = (jnp.zeros(R, jnp.int32), p[:, 0], jnp.zeros(R, jnp.bool_), jnp.zeros(R, jnp.int32),
             jnp.zeros((R, C), jnp.int32))
    cur, r, _, accepted, path = jax.lax.fori_loop(0, k, level, start)
    r = jnp.where(jnp.sum(r, axis=-1, keepdims=True) > 0, r, p[rows, cur])
    final = jax.vmap(lambda key, x: jax.random.categorical(jax.random.fold_in(key, _FINAL), jnp.log(x)))(keys, r)
    positions = jnp.arange(C)[None, :]
    emitted = jnp.take_along_axis(tokens_all, jnp.concatenate([path[:, 1:], jnp.zeros((R, 1), path.dtype)], 1), 1)
    emitted = jnp.where(positions < accepted[:, None], emitted, 0)
    emitted = jnp.where(positions == accepted[:, None], final[:, None].astype(jnp.int32), emitted)
    return accepted, emitted.astype(jnp.int32), path
