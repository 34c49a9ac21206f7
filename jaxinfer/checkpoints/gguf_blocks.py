"""GGUF tensors' blocks -> the arrays jaxinfer keeps (jaxinfer.checkpoints.gguf reads the file).

Blocks of 32 that map exactly onto `formats.QuantizedWeight` (Q8_0, Q4_0, Q4_1: see gguf.py's
docstring) stay packed (`packed_blocks`, `stack_packed`); ggml's MXFP4 blocks become
`formats.MXFP4Weight` with their nibbles reordered (`mxfp4_blocks`); every other supported type is
dequantised by gguf's own dequantiser (`dequantize_tensor`, `dense_param`).
"""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np

from jaxinfer.checkpoints.hf_layout import CheckpointError
from jaxinfer.models import family as family_lib
from jaxinfer.models.formats import MX_BLOCK, QuantizedWeight

Q = gguf.GGMLQuantizationType
BLOCK = 32  # values per block of Q8_0, Q4_0, Q4_1
PACKED = (Q.Q8_0, Q.Q4_0, Q.Q4_1)
MXFP4 = getattr(Q, "MXFP4", None)  # gguf >= 0.19; an older gguf (a machine without pip) reads the rest
DEQUANTISED = (Q.F32, Q.F16, Q.BF16, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K) + (
    () if MXFP4 is None else (MXFP4,))


def dequantize_tensor(t) -> np.ndarray:
    """A tensor as float32 in HF's axis order (ne reversed), by gguf's own dequantiser."""
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type not in DEQUANTISED + PACKED:
        supported = ", ".join(q.name for q in PACKED + DEQUANTISED)
        raise CheckpointError(f"tensor {t.name!r} has block type {t.tensor_type.name}, which this loader does not "
                              f"read (supported: {supported})")
    return np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), np.float32).reshape(shape)


def packed_blocks(t, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A Q8_0 / Q4_0 / Q4_1 tensor of (..., N, K) values (rows: those of its N rows, in that order)
    as QuantizedWeight arrays for W = its transpose: qweight uint8 (..., K * bits / 8, N), scales
    float16 (..., K / 32, N), mins float16 (..., K / 32, N) or None. Leading axes: stacked experts."""
    K, N, *rest = (int(d) for d in t.shape)
    blocks = np.asarray(t.data).reshape(*reversed(rest), N, K // BLOCK, -1)  # (..., N, G, bytes per block)
    if rows is not None:
        blocks = blocks[..., rows, :, :]
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].swapaxes(-1, -2)  # (..., G, N)
    mins = None
    if t.tensor_type == Q.Q8_0:
        q = blocks[..., 2:] ^ np.uint8(0x80)  # int8 v as uint8 v + 128: (..., N, G, 32)
    elif t.tensor_type == Q.Q4_0:
        q = blocks[..., 2:]  # (..., N, G, 16): byte r holds rows r and r + 16 of the block
    else:
        mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].swapaxes(-1, -2)  # (..., G, N)
        q = blocks[..., 4:]
    lead, n = q.shape[:-3], q.shape[-3]
    qweight = np.ascontiguousarray(np.moveaxis(q, -3, -1)).reshape(*lead, -1, n)  # (..., G * bytes, N) = (..., Kw, N)
    return qweight, np.ascontiguousarray(scales), None if mins is None else np.ascontiguousarray(mins)


def mxfp4_blocks(t) -> tuple[np.ndarray, np.ndarray]:
    """An MXFP4 tensor of (..., N, K) values as formats.MXFP4Weight's arrays for W = its transpose,
    without dequantising: blocks uint8 (..., N, K / 32, 16), scales uint8 (..., N, K / 32). ggml's
    block (block_mxfp4) is one e8m0 scale byte, then 16 bytes whose byte j holds value j in its low
    nibble and value j + 16 in its high one; MXFP4Weight's byte j holds values 2j and 2j + 1. The
    codes are the same e2m1 codes (ggml's kvalues are formats.FP4_VALUES doubled, and its scale
    2 ** (s - 127) halved: e8m0_to_fp32_half), so only the nibbles move."""
    K, N, *rest = (int(d) for d in t.shape)
    blocks = np.asarray(t.data).reshape(*reversed(rest), N, K // MX_BLOCK, 1 + MX_BLOCK // 2)  # (..., N, G, 17)
    q = blocks[..., 1:]
    codes = np.concatenate([q & 0xF, q >> 4], axis=-1)  # (..., N, G, 32): the block's values in order
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4)), np.ascontiguousarray(blocks[..., 0])


def block_bits(qtype) -> int:
    return 8 if qtype == Q.Q8_0 else 4


def stack_packed(group: list) -> QuantizedWeight:
    """The layers' packed tensors of one param ((tensor, rows) each) -> a QuantizedWeight stacked (L, ...)."""
    parts = [packed_blocks(t, rows) for t, rows in group]
    qweight, scales, mins = (None if parts[0][i] is None else np.stack([p[i] for p in parts]) for i in range(3))
    t = group[0][0]
    return QuantizedWeight(
        qweight=jnp.asarray(qweight), scales=jnp.asarray(scales), zeros=None, perm=None,
        bits=block_bits(t.tensor_type), group_size=BLOCK, in_features=int(t.shape[0]),
        mins=None if mins is None else jnp.asarray(mins),
    )


def dense_param(t, shape: tuple[int, ...], rows: np.ndarray | None, p: family_lib.Param, norm: family_lib.Norm,
           transpose: bool) -> np.ndarray:
    """One tensor as the param's float32 array: dequantised to its `shape`, its rows taken, a norm's
    gain turned into the family's weight, transposed to (in, out) where the file stores (out, in)."""
    x = dequantize_tensor(t).reshape(shape)
    if rows is not None:
        x = x[rows]
    if p.role == "norm":
        x = norm.from_gain(x)
    return np.swapaxes(x, -1, -2) if transpose else x
