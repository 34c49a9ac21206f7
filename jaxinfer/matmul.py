"""The one place the model multiplies activations by a weight.

A dense weight is `x @ w`. A weight in a packed format (`jaxinfer.formats`) goes to the
implementation registered for its type and the chosen `impl`, falling back to the type's "xla"
entry when it has no entry for `impl`:
  QuantizedWeight  "xla"     dequantise in float32, cast to x.dtype, one einsum accumulated in
                             float32 (the reference)
                   "pallas"  pallas_kernels.quant_matmul: packed weights read and dequantised in
                             registers (interpret mode on the CPU)
A new format adds entries with `register`, not branches here. `parallel` says how the weight is
split over a tensor-parallel mesh ("column": its output, "row": its input, None), which a kernel
run per shard under shard_map needs (jaxinfer.sharding); the XLA path is split by the partitioner.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxinfer.formats import QuantizedWeight, prepare_input, reference_matmul
from jaxinfer.sharding import P, per_shard, tp_mesh
from pallas_kernels.quant_matmul import quant_matmul

IMPLEMENTATIONS = ("xla", "pallas")

# (weight type, impl) -> fn(x, w, parallel) -> y without the bias.
_REGISTRY: dict[tuple[type, str], Callable[[jax.Array, object, str | None], jax.Array]] = {}


def register(weight_type: type, impl: str):
    """Decorator: `fn(x, w, parallel)` multiplies x by a `weight_type` weight under `impl`."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"matmul impl={impl!r} is not one of {IMPLEMENTATIONS}")

    def decorate(fn):
        _REGISTRY[(weight_type, impl)] = fn
        return fn

    return decorate


def linear(x: jax.Array, w, b: jax.Array | None = None, *, impl: str = "xla", parallel: str | None = None) -> jax.Array:
    """x (..., K) @ w (K, N) [+ b] -> (..., N)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"matmul impl={impl!r} is not one of {IMPLEMENTATIONS}")
    fn = _REGISTRY.get((type(w), impl)) or _REGISTRY.get((type(w), "xla"))
    y = x @ w if fn is None else fn(x, w, parallel)  # no entry: a dense array (or a tracer of one)
    return y if b is None else y + b


@register(QuantizedWeight, "xla")
def _quantized_xla(x: jax.Array, w: QuantizedWeight, parallel: str | None) -> jax.Array:
    del parallel  # the partitioner splits the dequantisation and the einsum
    return reference_matmul(x, w)


@register(QuantizedWeight, "pallas")
def _quantized_pallas(x: jax.Array, w: QuantizedWeight, parallel: str | None) -> jax.Array:
    interpret = jax.default_backend() == "cpu"
    if parallel is None or tp_mesh() is None:
        return quant_matmul(x, w.qweight, w.scales, w.zeros, w.perm, w.mins, bits=w.bits, group_size=w.group_size,
                            interpret=interpret)
    # Per shard: the input permuted (act order) and padded whole, then each shard's columns
    # (column-parallel) or whole groups of rows, whose partial products are summed (row-parallel).
    xp = prepare_input(x, w)  # (..., Kp)
    tp = tp_mesh().shape["tp"]
    groups = w.scales.shape[-2]
    if parallel == "column":
        x_spec, w_spec, g_spec, group_size = P(), P(None, "tp"), P(None, "tp"), w.group_size
    else:
        x_spec, w_spec = P(*[None] * (x.ndim - 1), "tp"), P("tp", None)
        split = groups % tp == 0  # else per-channel int8: its one scale row on every shard
        g_spec, group_size = (P("tp", None), w.group_size) if split else (P(), w.padded_in_features // tp)
    fields = {k: v for k, v in (("zeros", w.zeros), ("mins", w.mins)) if v is not None}

    def kernel(xs, qweight, scales, *extra):
        more = dict(zip(fields, extra))
        y = quant_matmul(xs, qweight, scales, more.get("zeros"), None, more.get("mins"), bits=w.bits,
                         group_size=group_size, interpret=interpret)
        return jax.lax.psum(y, "tp") if parallel == "row" else y

    out_spec = P(*[None] * (x.ndim - 1), "tp") if parallel == "column" else P()
    in_specs = (x_spec, w_spec, g_spec, *[g_spec] * len(fields))
    return per_shard(kernel, in_specs, out_spec)(xp, w.qweight, w.scales, *fields.values())
