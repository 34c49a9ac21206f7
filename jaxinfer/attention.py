"""The one place the model calls attention through.

`attend` takes queries and the keys/values they may see, with the absolute position of every
query and key, and applies causal and sliding-window masking by position. The XLA path below
is the reference every faster implementation is compared against.

Axes: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)

_MASKED = float(jnp.finfo(jnp.float32).min)


def attend(
    q: jax.Array,  # (B, T, N, H)
    k: jax.Array,  # (B, S, K, H)
    v: jax.Array,  # (B, S, K, H)
    q_pos: jax.Array,  # (B, T) int32
    k_pos: jax.Array,  # (B, S) int32; a negative position marks an empty slot
    window: jax.Array | int = 0,  # keys with q_pos - k_pos >= window are hidden; 0 = no window
    *,
    impl: str = "xla",
) -> jax.Array:  # (B, T, N, H)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl={impl!r} is not one of {IMPLEMENTATIONS}")
    return xla_attention(q, k, v, q_pos, k_pos, window)


def xla_attention(q, k, v, q_pos, k_pos, window=0):
    """Masked softmax attention with scores and softmax in float32 (HF's eager path does the same)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)  # (B, T, K, G, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (H**-0.5)
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)  # (B, T, S)
    distance = q_pos[:, :, None] - k_pos[:, None, :]
    visible &= (window <= 0) | (distance < window)
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(B, T, N, H)
