"""The quantised-weight pytree shared by every weight-only scheme (RTN, AWQ, GPTQ, loaded
AWQ/GPTQ checkpoints) and every matmul implementation (XLA reference, Pallas kernel).

A projection `y = x @ W` with W: (K, N) (in, out), quantised to `bits` in groups of
`group_size` consecutive input rows, is stored as:

  qweight  uint8 (Kp, N) for 8 bits; uint8 (Kp // 2, N) for 4 bits (two values a byte)
  scales   (Kp // g, N) float (float32, float16 or bfloat16)
  zeros    uint8 (Kp // g, N) integer zero points, or None: the implicit zero (below)
  perm     int32 (K,) or None: stored row i holds input row perm[i] (GPTQ act-order)
  mins     (Kp // g, N) float per-group offsets, or None (llama.cpp's Q4_1: w = d * q + m)

and dequantises as  W_stored[i, n] = (q[i, n] - zero[i // g, n]) * scale[i // g, n] (+ min[i // g, n]).
Without `zeros` the zero is implicit: 2**(bits-1) (symmetric) when there are no mins, 0 when
there are (unsigned q with an offset, as Q4_1 stores it), so Q4_1 dequantises as q * d + m, the
same float32 operations as llama.cpp's own dequantiser.
Kp is K rounded up to a multiple of g when the weight was quantised with `pad=True` (the
extra rows are zero and meet zero activations); otherwise Kp = K. Per-channel scales are the
case g = Kp (one group). Layers stacked for `lax.scan` carry a leading L axis on every array.

4-bit packing (chosen so a kernel needs no interleave): within each group of g rows, row r of
the group's first half sits in the low nibble and row r of its second half in the high nibble of
packed row (group * g/2 + r). So the low nibbles of all packed rows are the first halves of all
groups in order, and a matmul is `x_lo @ W_lo + x_hi @ W_hi` with `split_halves(x)`.

`x @ W = x[..., perm] (zero-padded to Kp) @ W_stored`, which is what `matmul` computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxinfer.models.act_formats import SimWeight, W8A8Weight, dequantize_w8a8

BITS = (4, 8)


@struct.dataclass
class QuantizedWeight:
    """A weight-only quantised (K, N) matrix (or a stack (L, K, N)); see the module docstring."""

    qweight: jax.Array  # uint8 (..., Kp * bits // 8, N)
    scales: jax.Array  # (..., Kp // group_size, N)
    zeros: jax.Array | None  # uint8 (..., Kp // group_size, N) or None (symmetric)
    perm: jax.Array | None  # int32 (..., K) or None
    bits: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)  # rows per scale; = Kp for per-channel
    in_features: int = struct.field(pytree_node=False)  # K, before padding
    mins: jax.Array | None = None  # (..., Kp // group_size, N) float, or None

    @property
    def padded_in_features(self) -> int:  # Kp
        return self.qweight.shape[-2] * 8 // self.bits

    @property
    def out_features(self) -> int:  # N
        return self.qweight.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense weight's shape, (..., K, N)."""
        return (*self.qweight.shape[:-2], self.in_features, self.out_features)

    @property
    def nbytes(self) -> int:
        arrays = (self.qweight, self.scales, self.zeros, self.perm, self.mins)
        return sum(a.size * a.dtype.itemsize for a in arrays if a is not None)


def check_scheme(bits: int, group_size: int, in_features: int, name: str = "weight") -> None:
    """Raise ValueError naming the layer when bits or group_size cannot describe this weight."""
    if bits not in BITS:
        raise ValueError(f"{name}: bits={bits} is not one of {BITS}")
    if group_size < 1 or in_features % group_size:
        raise ValueError(f"{name}: group_size={group_size} does not divide in_features={in_features}")
    if bits == 4 and group_size % 2:
        raise ValueError(f"{name}: 4-bit packing needs an even group_size, got {group_size}")


# --- packing -----------------------------------------------------------------------------------


def pack(q: jax.Array, bits: int, group_size: int) -> jax.Array:
    """uint8 values (..., Kp, N) in [0, 2**bits) -> stored qweight (see the module docstring)."""
    q = q.astype(jnp.uint8)
    if bits == 8:
        return q
    *lead, Kp, N = q.shape
    g = group_size
    q = q.reshape(*lead, Kp // g, 2, g // 2, N)  # (..., groups, half, r, N)
    packed = q[..., 0, :, :] | (q[..., 1, :, :] << 4)
    return packed.reshape(*lead, Kp // 2, N)


def unpack(qweight: jax.Array, bits: int, group_size: int) -> jax.Array:
    """Stored qweight -> uint8 values (..., Kp, N); the inverse of `pack`."""
    if bits == 8:
        return qweight
    *lead, Kp2, N = qweight.shape
    g = group_size
    p = qweight.reshape(*lead, Kp2 * 2 // g, g // 2, N)
    q = jnp.stack([p & 0xF, p >> 4], axis=-3)  # (..., groups, half, r, N)
    return q.reshape(*lead, Kp2 * 2, N)


def split_halves(x: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    """(..., Kp) activations -> the (..., Kp // 2) halves that meet a 4-bit weight's low and high
    nibbles: x_lo holds the first half of every group, x_hi the second."""
    *lead, Kp = x.shape
    g = group_size
    x = x.reshape(*lead, Kp // g, 2, g // 2)
    return x[..., 0, :].reshape(*lead, Kp // 2), x[..., 1, :].reshape(*lead, Kp // 2)


def implicit_zero(bits: int, has_mins: bool) -> int:
    """The zero point of a weight stored without `zeros`: 0 with mins, else 2**(bits-1)."""
    return 0 if has_mins else 2 ** (bits - 1)


def zero_points(w: QuantizedWeight) -> jax.Array:
    """The zero points (..., Kp // g, N) as float32 (the implicit zero when `zeros` is None)."""
    if w.zeros is None:
        return jnp.full(w.scales.shape, implicit_zero(w.bits, w.mins is not None), jnp.float32)
    return w.zeros.astype(jnp.float32)


# --- dequantisation and the matmul reference ---------------------------------------------------


def dequantize_stored(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """(..., Kp, N) in stored row order (perm applied, padding kept), computed in float32."""
    q = unpack(w.qweight, w.bits, w.group_size).astype(jnp.float32)  # (..., Kp, N)
    g = w.group_size
    scales = jnp.repeat(w.scales.astype(jnp.float32), g, axis=-2)  # (..., Kp, N)
    zeros = jnp.repeat(zero_points(w), g, axis=-2)
    w_f32 = (q - zeros) * scales
    if w.mins is not None:
        w_f32 = w_f32 + jnp.repeat(w.mins.astype(jnp.float32), g, axis=-2)
    return w_f32.astype(dtype)


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The dense (..., K, N) weight in the original input-row order."""
    stored = dequantize_stored(w, dtype)[..., : w.in_features, :]
    if w.perm is None:
        return stored
    inverse = jnp.argsort(w.perm, axis=-1)  # original row j sits at stored row inverse[j]
    return jnp.take_along_axis(stored, inverse[..., :, None], axis=-2)


def prepare_input(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x (..., K) -> (..., Kp): columns in stored row order, zero-padded."""
    if w.perm is not None:
        x = jnp.take(x, w.perm, axis=-1)
    pad = w.padded_in_features - w.in_features
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x


def reference_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x (..., K) @ dequant(w) -> (..., N) in x.dtype, accumulated in float32: the XLA path."""
    xp = prepare_input(x, w)
    wd = dequantize_stored(w, x.dtype)
    return jnp.einsum("...k,kn->...n", xp, wd, preferred_element_type=jnp.float32).astype(x.dtype)


# --- MXFP4 (OCP microscaling FP4), as gpt-oss publishes its experts ------------------------------

# The 16 values of an e2m1 (FP4) code: sign bit 3, then the magnitude of codes 0..7.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MX_BLOCK = 32  # values per shared scale


@struct.dataclass
class MXFP4Weight:
    """A (..., K, N) matrix in MXFP4, stored by output column as the published checkpoints store it
    (gpt-oss's `*_blocks` / `*_scales`): each column's K values in blocks of 32 along K, each block
    16 bytes of FP4 codes (value 2j in byte j's low nibble, 2j + 1 in its high nibble) and one
    scale byte s (e8m0: the block is multiplied by 2 ** (s - 127)). Every value is exact in
    bfloat16 and float32; the matmuls dequantise it in the program that multiplies by it.

      blocks  uint8 (..., N, K // 32, 16)
      scales  uint8 (..., N, K // 32)
    """

    blocks: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense weight's shape, (..., K, N)."""
        *lead, N, G, _ = self.blocks.shape
        return (*lead, G * MX_BLOCK, N)

    @property
    def nbytes(self) -> int:
        return self.blocks.size + self.scales.size


def dequantize_mxfp4(w: MXFP4Weight, dtype=jnp.float32) -> jax.Array:
    """The dense (..., K, N) weight: each code's FP4 value times its block's power of two."""
    lut = jnp.asarray(FP4_VALUES, jnp.float32)
    codes = jnp.stack([w.blocks & 0xF, w.blocks >> 4], axis=-1)  # (..., N, G, 16, 2): values 2j, 2j + 1
    values = lut[codes.astype(jnp.int32)].reshape(*w.blocks.shape[:-1], MX_BLOCK)  # (..., N, G, 32)
    scaled = values * jnp.exp2(w.scales.astype(jnp.float32) - 127.0)[..., None]
    return jnp.swapaxes(scaled.reshape(*scaled.shape[:-2], -1), -1, -2).astype(dtype)


def dense_weight(w, dtype) -> jax.Array:
    """The dense weight a projection's weight stands for, in dtype: a packed format dequantised (W8A8
    and simulated formats without their activation rounding), a dense array as it is."""
    if isinstance(w, QuantizedWeight):
        return dequantize(w, dtype)
    if isinstance(w, MXFP4Weight):
        return dequantize_mxfp4(w, dtype)
    if isinstance(w, W8A8Weight):
        return dequantize_w8a8(w, dtype)
    if isinstance(w, SimWeight):
        return w.weight.astype(dtype)
    return w
