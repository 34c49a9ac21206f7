"""The one place the model multiplies activations by a weight.

A dense weight is `x @ w`. A weight in a packed format (`jaxinfer.formats`) goes to the
implementation registered for its type and the chosen `impl`, falling back to the type's "xla"
entry when it has no entry for `impl`:
  QuantizedWeight  "xla"     dequantise in float32, cast to x.dtype, one einsum accumulated in
                             float32 (the reference)
                   "pallas"  pallas_kernels.quant_matmul: packed weights read and dequantised in
                             registers (interpret mode on the CPU)
  W8A8Weight       "xla"     x quantised per token (or by its static scale), an int32 (int8) or float32
                             (fp8, values cast to float32) einsum, rescaled (act_formats.w8a8_reference)
                   "pallas"  the same quantisation, then pallas_kernels.w8a8_matmul with the rescale in
                             its epilogue (interpret mode on the CPU). fp8 on a GPU without FP8 tensor
                             cores (before sm_89: Ampere) runs the "xla" numerics instead
                             (`fp8_gemm_path` says which)
  SimWeight        "xla"     x rounded to the simulated activation format, times the rounded weight
                             (accuracy studies only; no kernel)
A new format adds entries with `register`, not branches here.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxinfer.act_formats import SimWeight, W8A8Weight, quantize_activations, sim_reference, w8a8_reference
from jaxinfer.formats import QuantizedWeight, reference_matmul
from pallas_kernels.common import fp8_supported
from pallas_kernels.quant_matmul import quant_matmul
from pallas_kernels.w8a8_matmul import w8a8_matmul

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


register(W8A8Weight, "xla")(w8a8_reference)
register(SimWeight, "xla")(sim_reference)


def fp8_gemm_path() -> str:
    """Which FP8 GEMM impl="pallas" runs here: the kernel on a card with FP8 tensor cores (sm_89,
    sm_90) or interpreted on the CPU; the XLA reference numerics on an older GPU."""
    if jax.default_backend() == "cpu":
        return "pallas (interpret mode)"
    return "pallas" if fp8_supported() else "xla reference (this GPU has no FP8 tensor cores)"


@register(W8A8Weight, "pallas")
def _w8a8_pallas(x: jax.Array, w: W8A8Weight) -> jax.Array:
    cpu = jax.default_backend() == "cpu"
    if w.fmt == "fp8" and not cpu and not fp8_supported():
        return w8a8_reference(x, w)
    xq, xs = quantize_activations(x, w)
    return w8a8_matmul(xq, xs, w.qweight, w.scales, out_dtype=x.dtype, interpret=cpu)
