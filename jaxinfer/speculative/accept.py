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

from jaxinfer.sampling import SamplingBatch, filtered_probs

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
