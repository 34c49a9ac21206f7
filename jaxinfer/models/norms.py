"""Norms and gate activations, building blocks the model families name (jaxinfer.models.family
re-exports them: a Family's `norm` is a `Norm`, its `activation` a key of ACTIVATIONS)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

NORM_KINDS = ("rms", "rms_plus_1")
# HF's hidden_act / hidden_activation names -> the activation of the gate in act(x @ w_gate) * (x @ w_up).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


def _normalise(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32."""
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, cast back, then scaled (the order HF transformers uses for Llama)."""
    return weight * _normalise(x, eps).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Norm:
    """A family's norm: how its weight w scales the normalised input.
      "rms"         x / rms(x) * w         (Llama, Mistral, Qwen; HF casts x back before scaling)
      "rms_plus_1"  x / rms(x) * (1 + w)   (Gemma; scaled in float32, then cast)
    The scale a weight stands for is its gain (w, or 1 + w). A transform that folds a per-channel
    factor into a norm (AWQ, SmoothQuant) changes the gain and stores it back with `map_gain`."""

    kind: str = "rms"

    def __post_init__(self):
        if self.kind not in NORM_KINDS:
            raise ValueError(f"norm kind={self.kind!r} is not one of {NORM_KINDS}")

    def __call__(self, x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
        """x (..., C) normalised over C and scaled by the weight (C,), in x's dtype."""
        if self.kind == "rms":
            return rms_norm(x, weight, eps)
        return (_normalise(x, eps) * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)

    @property
    def identity(self) -> float:
        """The weight of a gain of 1 (a fresh norm's weight)."""
        return 1.0 if self.kind == "rms" else 0.0

    def map_gain(self, weight: jax.Array, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """The weight whose gain is fn(the gain of `weight`), in weight's dtype."""
        if self.kind == "rms":
            return fn(weight).astype(weight.dtype)
        return (fn(1.0 + weight.astype(jnp.float32)) - 1.0).astype(weight.dtype)

    def from_gain(self, gain):
        """The weight whose gain is `gain` (an array; GGUF files store every norm's gain, since
        llama.cpp's RMSNorm multiplies by the stored weight: its converter writes Gemma's w as 1 + w).
        For a float32 gain g >= 0.5, g - 1 and then 1 + (g - 1) are exact: the (1 + w) norm scales by g."""
        return gain if self.kind == "rms" else gain - 1.0
