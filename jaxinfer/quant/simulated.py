"""Simulated low-bit formats for accuracy studies (fake-quant): every projection's weight is rounded
to the format and kept dequantised (`act_formats.SimWeight`), and its matmul rounds the activations
first. What this measures is the format's effect on quality; nothing here saves memory or time,
and the bytes reported are what the format would store.

  nvfp4          e2m1 values in blocks of 16 input rows, an e4m3 scale per block, a float32 scale
                 per matrix: 4.5 bits a weight
  mxfp4          e2m1 values in blocks of 32 input rows, an e8m0 (power-of-two) scale per block:
                 4.25 bits a weight
  int4           int4 RTN (symmetric, groups of group_size rows, the model's scale dtype): the
                 same weight `int4-rtn-g<N>` serves packed, so its bytes are that format's
  int4-fp8scale  int4 in groups of group_size with the group scales (max |w| / 7) stored as e4m3
                 relative to a float32 scale per output channel (the largest group scale / 448)

Blocks and groups run along the input rows (the reduction axis), zero-padded at the end.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxinfer.models.act_formats import BLOCKS, QMAX, SimWeight, fake_mxfp4, fake_nvfp4
from jaxinfer.models.formats import dequantize
from jaxinfer.quant import rtn
from jaxinfer.quant.spec import SimScheme, projections


def fake_int4_fp8scale(w: jax.Array, group_size: int) -> jax.Array:
    """w (..., K, N) rounded to int4 with e4m3 group scales under a float32 scale per column, as float32."""
    K, N = w.shape[-2:]
    wp = rtn.pad_rows(w.astype(jnp.float32), group_size)
    groups = wp.reshape(*wp.shape[:-2], -1, group_size, N)  # (..., G, g, N)
    scale = jnp.max(jnp.abs(groups), axis=-2) / 7.0  # (..., G, N)
    column = jnp.max(scale, axis=-2, keepdims=True) / QMAX["fp8"]  # (..., 1, N)
    column = jnp.where(column > 0, column, 1.0)
    scale = (scale / column).astype(jnp.float8_e4m3fn).astype(jnp.float32) * column
    safe = jnp.where(scale > 0, scale, 1.0)[..., None, :]
    q = jnp.clip(jnp.round(groups / safe), -8, 7)
    return (q * scale[..., None, :]).reshape(wp.shape)[..., :K, :]


@functools.partial(jax.jit, static_argnames="scheme")
def _rounded(w: jax.Array, scheme: SimScheme) -> jax.Array:
    if scheme.weights == "nvfp4":
        return fake_nvfp4(w, -2, (-2, -1))
    if scheme.weights == "mxfp4":
        return fake_mxfp4(w, -2)
    return fake_int4_fp8scale(w, scheme.group_size)


def fake_weight(w: jax.Array, scheme: SimScheme) -> tuple[jax.Array, int]:
    """w (..., K, N) rounded to the scheme's weight format (float32), and the bytes that format stores."""
    *lead, K, N = w.shape
    mats = math.prod(lead)
    if scheme.weights == "int4":
        qw = rtn.quantize_weight(w, 4, scheme.group_size, pad=True)
        return dequantize(qw), qw.nbytes
    block = BLOCKS.get(scheme.weights, scheme.group_size)
    Kp = -(-K // block) * block
    scales = {"nvfp4": Kp // block * N + 4, "mxfp4": Kp // block * N, "int4-fp8scale": Kp // block * N + 4 * N}
    return _rounded(w, scheme), mats * (Kp * N // 2 + scales[scheme.weights])


def quantize_params(params: dict, scheme: SimScheme) -> dict:
    """Every projection (stacked over layers) as a SimWeight of the scheme."""
    layers = dict(params["layers"])
    for name in projections(layers):
        w = layers[name]
        weight, stored = fake_weight(w, scheme)
        layers[name] = SimWeight(weight=weight.astype(w.dtype), act=scheme.act, stored=stored)
    return {**params, "layers": layers}
