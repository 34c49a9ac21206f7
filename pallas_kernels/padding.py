"""Shape padding shared by the kernel wrappers (Triton blocks want power-of-two extents)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """x zero-padded at the end of `axis` to `size`."""
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)
