"""The one place the model multiplies activations by a weight.

A dense weight is `x @ w`. A weight in a packed format (`jaxinfer.formats`) goes to the
implementation registered for its type and the chosen `impl`, falling back to the type's "xla"
entry when it has no entry for `impl`:
  QuantizedWeight  "xla"     dequantise in float32, cast to x.dtype, one einsum accumulated in
                             float32 (the reference)
                   "pallas"  pallas_kernels.quant_matmul: packed weights read and dequantised in
                             registers (interpret mode on the CPU)
A new format adds entries with `register`, not branches here.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxinfer.formats import QuantizedWeight, reference_matmul
from pallas_kernels.quant_matmul import quant_matmul

IMPLEMENTATIONS = ("xla", "pallas")

# (weight type, impl) -> fn(x, w) -> y without the bias.
_REGISTRY: dict[tuple[type, str], Callable[[jax.Array, object], jax.Array]] = {}


def register(weight_type: type, impl: str):
    """Decorator: `fn(x, w)` multiplies x by a `weight_type` weight under `impl`."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"matmul impl={impl!r} is not one of {IMPLEMENTATIONS}")

    def decorate(fn):
        _REGISTRY[(weight_type, impl)] = fn
        return fn

    return decorate


def linear(x: jax.Array, w, b: jax.Array | None = None, *, impl: str = "xla") -> jax.Array:
    """x (..., K) @ w (K, N) [+ b] -> (..., N)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"matmul impl={impl!r} is not one of {IMPLEMENTATIONS}")
    fn = _REGISTRY.get((type(w), impl)) or _REGISTRY.get((type(w), "xla"))
    y = x @ w if fn is None else fn(x, w)  # no entry: a dense array (or a tracer of one)
    return y if b is None else y + b


register(QuantizedWeight, "xla")(reference_matmul)


@register(QuantizedWeight, "pallas")
def _quantized_pallas(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    return quant_matmul(x, w.qweight, w.scales, w.zeros, w.perm, w.mins, bits=w.bits, group_size=w.group_size,
                        interpret=jax.default_backend() == "cpu")
