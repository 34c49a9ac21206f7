"""The one place the model multiplies activations by a weight.

A dense weight is `x @ w`. A QuantizedWeight goes to the chosen implementation:
  "xla"     dequantise in float32, cast to x.dtype, one einsum accumulated in float32 (reference)
  "pallas"  pallas_kernels.quant_matmul: packed weights read and dequantised in registers
            (interpret mode on the CPU)
"""

from __future__ import annotations

import jax

from jaxinfer.quant.format import QuantizedWeight, reference_matmul

IMPLEMENTATIONS = ("xla", "pallas")


def linear(x: jax.Array, w, b: jax.Array | None = None, *, impl: str = "xla") -> jax.Array:
    """x (..., K) @ w (K, N) [+ b] -> (..., N)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"matmul impl={impl!r} is not one of {IMPLEMENTATIONS}")
    if not isinstance(w, QuantizedWeight):
        y = x @ w
    elif impl == "pallas":
        from pallas_kernels.quant_matmul import quant_matmul

        y = quant_matmul(x, w.qweight, w.scales, w.zeros, w.perm, bits=w.bits, group_size=w.group_size,
                         interpret=jax.default_backend() == "cpu")
    else:
        y = reference_matmul(x, w)
    return y if b is None else y + b
