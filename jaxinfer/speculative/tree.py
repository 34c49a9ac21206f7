"""Draft trees in the verify pass: layout, ancestry, and compaction of the accepted path.

A tree of k drafts is verified as one row of k + 1 tokens: index 0 is the root (the sequence's
last token), index i the i-th draft, every draft after its parent (parents[i - 1] < i). Token i
sits at position start + depth(i) for RoPE but writes its K/V to slot start + i, so the row's
slots stay consecutive; it attends to the committed prefix (positions < start) and to its
ancestors, itself included (an ancestor bitmask per token, pallas_kernels.common.pack_tree_mask).
Its K/V and hidden state are then exactly those it would have if its path were the sequence.
After acceptance the accepted path's K/V (and feature-cache rows) are copied from slots start +
path[m] to start + m, so the sequence reads as if the path had been decoded in order; the rest
is forgotten with the usual rollback (lengths reset, pages past the end freed).

Axes: R rows, k drafts, C = k + 1 tree tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def full_parents(parents: jax.Array) -> jax.Array:
    """parents (R, k) of drafts 1..k -> (R, C) for every tree token, the root its own parent."""
    return jnp.concatenate([jnp.zeros_like(parents[:, :1]), parents], axis=1)


def ancestry(parents: jax.Array, num_drafts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """parents (R, k), num_drafts (R,) -> (visible (R, C, C) bool: [r, i, j] token i sees tree token
    j, its ancestor or itself; depth (R, C) int32). Drafts past num_drafts see only themselves."""
    R, k = parents.shape
    C = k + 1
    up = full_parents(parents)
    node = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (R, C))
    eye = jnp.eye(C, dtype=jnp.bool_)
    visible, depth = jnp.broadcast_to(eye, (R, C, C)), jnp.zeros((R, C), jnp.int32)
    for _ in range(k):  # a tree of k drafts is at most k deep
        depth += node > 0
        node = jnp.take_along_axis(up, node, axis=1)
        visible |= jax.nn.one_hot(node, C, dtype=jnp.bool_)
    live = jnp.arange(C)[None, :] <= num_drafts[:, None]  # (R, C)
    visible = jnp.where(live[:, :, None], visible, eye)
    return visible, jnp.where(live, depth, 0)


def compaction(slots: jax.Array, path: jax.Array, accepted: jax.Array, dropped: int) -> tuple[jax.Array, jax.Array]:
    """slots (R, C) each tree token's KV slot, path (R, C) the accepted path's tree indices (path[:, 0]
    the root), accepted (R,) -> flat (src, dst) slot pairs that move the path into consecutive slots
    (pairs that need no move point at `dropped`, past the cache)."""
    R, C = slots.shape
    m = jnp.arange(C)[None, :]
    move = (m >= 1) & (m <= accepted[:, None]) & (path != m)
    src = jnp.where(move, jnp.take_along_axis(slots, path, axis=1), dropped)
    dst = jnp.where(move, slots, dropped)
    return src.reshape(-1), dst.reshape(-1)
