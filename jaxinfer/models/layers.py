"""Rotary position embeddings, a building block of layer functions (the norms and activations a
family names are in jaxinfer.models.family)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.models.config import ModelConfig, RopeConfig


def rope_tables(cfg: ModelConfig, positions: jax.Array, dtype, rope: RopeConfig | None = None,
                ) -> tuple[jax.Array, jax.Array]:
    """cos, sin: (B, T, H) for the given positions (half-split layout, as HF's rotate_half), of
    cfg.rope or of `rope`, scaled by its cos_sin_scale (YaRN); H is cfg.rotary_dim."""
    rope = rope or cfg.rope
    inv_freq = jnp.asarray(rope.inv_freq(cfg.rotary_dim))  # (H/2,)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # (B, T, H)
    if rope.cos_sin_scale != 1.0:  # YaRN's attention factor, on the tables in float32 as HF applies it
        return (jnp.cos(emb) * rope.cos_sin_scale).astype(dtype), (jnp.sin(emb) * rope.cos_sin_scale).astype(dtype)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, T, heads, H); cos, sin: (B, T, H)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
