"""Round-to-nearest (RTN) quantisation of a weight matrix: the baseline every smarter scheme
(AWQ, GPTQ) is compared against, and the rounding step they both end with.

Symmetric: scale = max|w| / (2**(bits-1) - 1) per group, zero = 2**(bits-1) (implicit).
Asymmetric: the group's range [min(w, 0), max(w, 0)] is spread over 0..2**bits - 1 and the zero
point is the integer that 0.0 maps to (so zero stays exactly representable, as GPTQ does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.models.formats import QuantizedWeight, check_scheme, pack


def group_params(w: jax.Array, bits: int, symmetric: bool, scale_dtype) -> tuple[jax.Array, jax.Array]:
    """Scales and zero points (float32, integer-valued zeros) of groups w: (..., g, N) -> (..., N).

    Scales are rounded to `scale_dtype` first, so the integers are chosen against the scale the
    kernel will actually use."""
    w = w.astype(jnp.float32)
    qmax = 2**bits - 1
    if symmetric:
        amax = jnp.max(jnp.abs(w), axis=-2)
        scale = amax / (2 ** (bits - 1) - 1)
        zero = jnp.full_like(scale, 2 ** (bits - 1))
    else:
        lo = jnp.minimum(jnp.min(w, axis=-2), 0.0)
        hi = jnp.maximum(jnp.max(w, axis=-2), 0.0)
        scale = (hi - lo) / qmax
    scale = jnp.where(scale > 0, scale, 1.0).astype(scale_dtype).astype(jnp.float32)
    if not symmetric:
        zero = jnp.clip(jnp.round(-lo / scale), 0, qmax)
    return scale, zero


def quantize_values(w: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
    """Integers q = clip(round(w / scale) + zero, 0, 2**bits - 1) as float32 (broadcasting)."""
    return jnp.clip(jnp.round(w.astype(jnp.float32) / scale) + zero, 0, 2**bits - 1)


def pad_rows(w: jax.Array, group_size: int) -> jax.Array:
    """Zero-pad the input rows of (..., K, N) up to a multiple of group_size."""
    K = w.shape[-2]
    extra = -K % group_size
    if not extra:
        return w
    return jnp.pad(w, [(0, 0)] * (w.ndim - 2) + [(0, extra), (0, 0)])


def from_integers(q, scale, zero, *, bits, group_size, in_features, symmetric, scale_dtype, perm=None):
    """Assemble a QuantizedWeight from float integer values q (..., Kp, N) and per-group
    scale/zero (..., Kp // g, N)."""
    return QuantizedWeight(
        qweight=pack(q.astype(jnp.uint8), bits, group_size),
        scales=scale.astype(scale_dtype),
        zeros=None if symmetric else zero.astype(jnp.uint8),
        perm=perm,
        bits=bits,
        group_size=group_size,
        in_features=in_features,
    )


def quantize_weight(
    w: jax.Array,  # (..., K, N)
    bits: int,
    group_size: int | None = None,  # None: one scale per output channel
    *,
    symmetric: bool = True,
    pad: bool = False,
    scale_dtype=None,  # default: w.dtype
    name: str = "weight",
) -> QuantizedWeight:
    """RTN-quantise a dense weight (or a stack of them) to a QuantizedWeight."""
    K = w.shape[-2]
    scale_dtype = scale_dtype or w.dtype
    g = group_size or K
    if pad and group_size:
        w = pad_rows(w, g)
    check_scheme(bits, g, w.shape[-2], name)
    *lead, Kp, N = w.shape
    groups = w.reshape(*lead, Kp // g, g, N)
    scale, zero = group_params(groups, bits, symmetric, scale_dtype)  # (..., G, N)
    q = quantize_values(groups, scale[..., None, :], zero[..., None, :], bits).reshape(*lead, Kp, N)
    return from_integers(q, scale, zero, bits=bits, group_size=g, in_features=K, symmetric=symmetric,
                         scale_dtype=scale_dtype)
