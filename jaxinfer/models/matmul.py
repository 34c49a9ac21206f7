"""The one place the model multiplies activations by a weight.

A dense weight is `x @ w` (`dense`: on the CPU, half precision with a float32 accumulator). A
weight in a packed format (`jaxinfer.models.formats`) goes to the implementation registered for its
type and the chosen `impl`, falling back to the type's "xla" entry when it has no entry for `impl`:
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
A mixture of experts' per-expert weights go through `grouped` (jax.lax.ragged_dot, or the
pallas_kernels.grouped_matmul kernel; int8 / int4 experts its grouped_quant_matmul).
A new format adds entries with `register`, not branches here. `parallel` says how the weight is
split over a tensor-parallel mesh ("column": its output, "row": its input, None), which a kernel
run per shard under shard_map needs (jaxinfer.sharding); the XLA path is split by the partitioner.
W8A8 under a mesh takes its XLA numerics (no per-shard W8A8 kernel yet).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxinfer.models.act_formats import (
    SimWeight,
    W8A8Weight,
    product,
    quantize_activations,
    sim_reference,
    w8a8_reference,
)
from jaxinfer.models.formats import (
    MXFP4Weight,
    QuantizedWeight,
    dequantize,
    dequantize_mxfp4,
    prepare_input,
    reference_matmul,
)
from jaxinfer.sharding import P, per_shard, tp_mesh
from pallas_kernels.common import fp8_supported
from pallas_kernels.grouped_matmul import grouped_matmul, grouped_quant_matmul
from pallas_kernels.quant_matmul import quant_matmul
from pallas_kernels.w8a8_matmul import w8a8_matmul

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
    y = dense(x, w) if fn is None else fn(x, w, parallel)  # no entry: a dense array (or a tracer of one)
    return y if b is None else y + b


def grouped(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, impl: str = "xla",
            parallel: str | None = None) -> jax.Array:
    """x (M, K), its rows sorted by group, times w (E, K, N): group g's rows (group_sizes (E,)) by
    w[g], accumulated in float32, in x's dtype (a mixture of experts' projections). "xla":
    jax.lax.ragged_dot; "pallas": pallas_kernels.grouped_matmul (interpret mode on the CPU), per
    shard under a tensor-parallel mesh ("expert_column": each shard's columns; "expert_row": each
    shard's rows of K, the partial products summed). Packed experts: int8 / int4 (QuantizedWeight)
    under "pallas" go to pallas_kernels.grouped_quant_matmul, dequantised tile by tile in the kernel;
    otherwise (and MXFP4 always) they are dequantised inside this program, so the params stay packed."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"matmul impl={impl!r} is not one of {IMPLEMENTATIONS}")
    if isinstance(w, QuantizedWeight) and impl == "pallas" and w.perm is None:
        return _grouped_quantized(x, w, group_sizes, parallel)
    if isinstance(w, MXFP4Weight):  # packed experts (gpt-oss): dequantised here, in the program that multiplies
        w = dequantize_mxfp4(w, x.dtype)
    elif isinstance(w, QuantizedWeight):  # int8 / int4 experts (QuantScheme(experts=True)), the same way
        w = dequantize(w, x.dtype)
    if impl == "xla":
        return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)
    interpret = jax.default_backend() == "cpu"
    if parallel is None or tp_mesh() is None:
        return grouped_matmul(x, w, group_sizes, interpret=interpret)

    def kernel(xs, ws, sizes):
        y = grouped_matmul(xs, ws, sizes, interpret=interpret)
        return jax.lax.psum(y, "tp") if parallel == "expert_row" else y

    if parallel == "expert_column":
        in_specs, out_spec = (P(), P(None, None, "tp"), P()), P(None, "tp")
    else:
        in_specs, out_spec = (P(None, "tp"), P(None, "tp", None), P()), P()
    return per_shard(kernel, in_specs, out_spec)(x, w, group_sizes)


def _grouped_quantized(x: jax.Array, w: QuantizedWeight, group_sizes: jax.Array, parallel: str | None) -> jax.Array:
    """int8 / int4 experts through pallas_kernels.grouped_quant_matmul: each tile's expert read packed
    and dequantised in the kernel; per shard under a tensor-parallel mesh as `grouped` splits dense
    experts (expert_row: whole groups of rows per shard, as the params are placed)."""
    interpret = jax.default_backend() == "cpu"
    xp = prepare_input(x, w)  # (M, Kp)
    fields = {k: v for k, v in (("zeros", w.zeros), ("mins", w.mins)) if v is not None}
    if parallel is None or tp_mesh() is None:
        return grouped_quant_matmul(xp, w.qweight, w.scales, w.zeros, w.mins, group_sizes, bits=w.bits,
                                    group_size=w.group_size, interpret=interpret)
    tp = tp_mesh().shape["tp"]
    if parallel == "expert_column":
        x_spec, w_spec, g_spec, out_spec = P(), P(None, None, "tp"), P(None, None, "tp"), P(None, "tp")
        group_size = w.group_size
    else:
        split = w.scales.shape[-2] % tp == 0  # else per-channel int8: its one scale row on every shard
        x_spec, w_spec, out_spec = P(None, "tp"), P(None, "tp", None), P()
        g_spec, group_size = (P(None, "tp", None), w.group_size) if split else (P(), w.padded_in_features // tp)

    def kernel(xs, qweight, scales, sizes, *extra):
        more = dict(zip(fields, extra))
        y = grouped_quant_matmul(xs, qweight, scales, more.get("zeros"), more.get("mins"), sizes, bits=w.bits,
                                 group_size=group_size, interpret=interpret)
        return jax.lax.psum(y, "tp") if parallel == "expert_row" else y

    in_specs = (x_spec, w_spec, g_spec, P(), *[g_spec] * len(fields))
    return per_shard(kernel, in_specs, out_spec)(xp, w.qweight, w.scales, group_sizes, *fields.values())


def dense(x: jax.Array, w: jax.Array, equation: str = "...K,KN->...N") -> jax.Array:
    """x @ w (or the einsum `equation` of x and w) in x's dtype. On the CPU, half-precision
    operands are multiplied with a float32 accumulator, one row taken as two: XLA's CPU backend
    multiplies bfloat16 natively only with float32 out and at least two rows, and otherwise
    converts the whole weight to float32 first, every call (benchmarks/results/cpu_dots.md).
    float32, and every dtype off the CPU, take the product as it was."""
    if x.dtype == jnp.float32 or jax.default_backend() != "cpu":
        return x @ w if equation == "...K,KN->...N" else jnp.einsum(equation, x, w)
    if equation == "...K,KN->...N":
        return _half_dense(x, w)
    return dense_f32(x, w, equation).astype(x.dtype)


@jax.custom_vjp
def _half_dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w in half precision on the CPU (`dense`), whose gradient's products take half-precision
    operands too: autodiff's own would multiply the float32 cotangent of the float32 accumulator in
    float32, at a third of bfloat16's speed on a CPU with AMX (training a drafter in bfloat16).
    XLA's CPU backend still converts the weight gradient's product (a contraction over the rows)."""
    return dense_f32(x, w).astype(x.dtype)


def _half_dense_fwd(x, w):
    return _half_dense(x, w), (x, w)


def _half_dense_bwd(residuals, g):
    return product_grads(*residuals, g)


def product_grads(x: jax.Array, w: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The gradients (dx, dw) of x @ w (x (..., K), w (K, N)) given the output's cotangent g
    (..., N), each product taken in x's dtype with float32 accumulation and cast to its operand's
    dtype (the backward of `dense`'s CPU half-precision path, and of any loss that multiplies a
    weight so)."""
    g = g.astype(x.dtype)
    dx = product("...N,KN->...K", g, w, jnp.float32).astype(x.dtype)
    dw = jnp.einsum("MK,MN->KN", x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), preferred_element_type=jnp.float32)
    return dx, dw.astype(w.dtype)


_half_dense.defvjp(_half_dense_fwd, _half_dense_bwd)


def dense_f32(x: jax.Array, w: jax.Array, equation: str = "...K,KN->...N") -> jax.Array:
    """The einsum of x (..., K) and w accumulated and returned in float32; on the CPU a single
    half-precision row is multiplied as two (`act_formats.product`)."""
    return product(equation, x, w, jnp.float32)


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


@register(W8A8Weight, "xla")
def _w8a8_xla(x: jax.Array, w: W8A8Weight, parallel: str | None) -> jax.Array:
    del parallel  # the partitioner splits the quantised einsum
    return w8a8_reference(x, w)


@register(SimWeight, "xla")
def _sim_xla(x: jax.Array, w: SimWeight, parallel: str | None) -> jax.Array:
    del parallel
    return sim_reference(x, w)


def fp8_gemm_path() -> str:
    """Which FP8 GEMM impl="pallas" runs here: the kernel on a card with FP8 tensor cores (sm_89,
    sm_90) or interpreted on the CPU; the XLA reference numerics on an older GPU."""
    if jax.default_backend() == "cpu":
        return "pallas (interpret mode)"
    return "pallas" if fp8_supported() else "xla reference (this GPU has no FP8 tensor cores)"


@register(W8A8Weight, "pallas")
def _w8a8_pallas(x: jax.Array, w: W8A8Weight, parallel: str | None) -> jax.Array:
    """The kernel on one device; under a tensor-parallel mesh the XLA numerics, which the
    partitioner splits (no per-shard W8A8 kernel yet)."""
    cpu = jax.default_backend() == "cpu"
    if (w.fmt == "fp8" and not cpu and not fp8_supported()) or (parallel is not None and tp_mesh() is not None):
        return w8a8_reference(x, w)
    xq, xs = quantize_activations(x, w)
    return w8a8_matmul(xq, xs, w.qweight, w.scales, out_dtype=x.dtype, interpret=cpu)
