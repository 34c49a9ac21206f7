"""What every kernel file shares: constants, the Triton compiler-params shim, shape padding, the
page gather of the references, and the tuned block sizes per card (`tuned.json`).

tuned.json holds, per kernel, entries keyed by card class ("sm_80" A100, "sm_86" RTX 30xx,
"sm_89" RTX 40xx / RTX 4000 Ada, "sm_90" H100/H200) plus "default" for a card it does not name;
interpret mode (no GPU) reads "interpret". `tuned(kernel)` returns the entry for the current device.
Each kernel's BlockSizes estimates the shared memory its tiles take (`shared_memory_bytes`), and
SHARED_MEMORY_KB says what a block may use on each card, so a test keeps every entry within its card.
"""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import triton as plgpu

# Score given to hidden keys: finite, so exp2(MASKED - m) is 0 and never NaN.
MASKED = -0.7 * float(np.finfo(np.float32).max)
LOG2_E = math.log2(math.e)
# Triton's tensor-core dot needs every dimension >= 16.
MIN_DOT = 16
# jax 0.11 names the Triton compiler params `CompilerParams`; older releases `TritonCompilerParams`.
CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")

# Shared memory one thread block may use (the opt-in maximum), KiB, by card class.
SHARED_MEMORY_KB = {"sm_80": 163, "sm_86": 99, "sm_87": 163, "sm_89": 99, "sm_90": 227, "sm_100": 227}


def tile_bytes(*shape_and_dtype) -> int:
    """Bytes of one tile: tile_bytes(16, 128, jnp.bfloat16) -> 4096."""
    *shape, dtype = shape_and_dtype
    return math.prod(shape) * jnp.dtype(dtype).itemsize


_TUNED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned.json")


def soft_cap(scores: jax.Array, cap: float) -> jax.Array:
    """Attention scores soft-capped, cap * tanh(scores / cap) (Gemma 2's attn_logit_softcapping)."""
    return cap * jnp.tanh(scores * (1.0 / cap))


def check_softcap(softcap) -> float | None:
    """A kernel's static soft-cap: None, or a positive finite float; ValueError otherwise."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap={softcap!r} must be None or a positive number")
    return float(softcap)


def check_sinks(sinks, num_heads: int) -> None:
    """Attention sinks: None, or one logit per query head, (N,); ValueError otherwise."""
    if sinks is not None and tuple(sinks.shape) != (num_heads,):
        raise ValueError(f"sinks must have shape (N,)=({num_heads},), got {tuple(sinks.shape)}")


def sink_softmax(s: jax.Array, visible: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """The references' softmax over the last axis of float32 scores s (-inf where hidden), a row
    with no visible key giving zeros; with sinks (broadcast to s[..., :1]), each row's softmax
    has one more logit, the sink, whose probability is dropped (it has no value: gpt-oss)."""
    m = jnp.max(s, axis=-1, keepdims=True)
    if sinks is not None:
        m = jnp.maximum(m, sinks.astype(jnp.float32))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(visible, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    if sinks is not None:
        l = l + jnp.exp(sinks.astype(jnp.float32) - m)
    return p / jnp.where(l > 0, l, 1.0)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """x zero-padded at the end of `axis` to `size`."""
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def gather_pages(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """pages (K, P, page_size, H), block_tables (B, M) -> (B, M * page_size, K, H): each row's
    context, dense (the XLA path and the kernels' references read pages this way)."""
    K, _, page_size, H = pages.shape
    B, M = block_tables.shape
    dense = pages[:, block_tables]  # (K, B, M, page_size, H)
    return dense.reshape(K, B, M * page_size, H).transpose(1, 2, 0, 3)


QUANTISED_PAGES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def check_page_scales(k_pages, v_pages, k_scales, v_scales) -> None:
    """int8 / fp8 pages need per-token scales (K, P, page_size); float pages may have none."""
    K, P, page_size, _ = k_pages.shape
    for name, pages, scales in (("k", k_pages, k_scales), ("v", v_pages, v_scales)):
        if scales is None and jnp.dtype(pages.dtype) in QUANTISED_PAGES:
            raise ValueError(f"{name}_pages are {pages.dtype}: {name}_scales (K, P, page_size) are required")
        if scales is not None and scales.shape != (K, P, page_size):
            raise ValueError(f"{name}_scales must have shape (K, P, page_size)={(K, P, page_size)}, got {scales.shape}")


def fp8_supported() -> bool:
    """Whether the current device runs float8_e4m3fn in a Triton kernel: compute capability >= 8.9
    (Ada, Hopper), which is also where FP8 tensor cores exist. False off CUDA."""
    cap = capability()
    return cap is not None and cap >= (8, 9)


def check_fp8_supported(dtype, interpret: bool, what: str = "KV pages",
                        instead: str = "use int8 pages with scales") -> None:
    """Triton casts float8_e4m3fn only on compute capability >= 8.9 (Ada, Hopper): say so early."""
    if interpret or jnp.dtype(dtype) != jnp.dtype(jnp.float8_e4m3fn):
        return
    cap = capability()
    if cap is not None and cap < (8, 9):
        raise ValueError(
            f"float8_e4m3fn {what} need a GPU of compute capability >= 8.9, this one is {cap[0]}.{cap[1]}: {instead}"
        )


def dequantize_pages(pages: jax.Array, scales: jax.Array | None) -> jax.Array:
    """(K, P, page_size, H) pages -> float32, times their per-token scales (K, P, page_size) if any."""
    x = pages.astype(jnp.float32)
    return x if scales is None else x * scales.astype(jnp.float32)[..., None]


def pack_tree_mask(visible: jax.Array) -> jax.Array:
    """visible (B, T, T) bool, [b, i, j]: tree token i sees tree token j -> the kernels' tree mask
    (B, T, W) int32, W = ceil(T / 32): bit j % 32 of word j // 32 set where token i sees token j."""
    B, T, _ = visible.shape
    W = -(-T // 32)
    bits = pad_axis(visible.astype(jnp.uint32), 2, 32 * W).reshape(B, T, W, 32)
    words = jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    return jax.lax.bitcast_convert_type(words, jnp.int32)


def tree_visible(tree_mask: jax.Array, rel: jax.Array) -> jax.Array:
    """tree_mask (B, T, W) int32, rel (B, S) each key's index in the tree (its position minus the
    tree's first) -> (B, T, S) bool: the key is a tree token the query sees (False outside the tree)."""
    W = tree_mask.shape[2]
    word = jnp.take_along_axis(tree_mask, jnp.clip(rel // 32, 0, W - 1)[:, None, :], axis=2)  # (B, T, S)
    bit = jax.lax.shift_right_logical(word, jnp.clip(rel % 32, 0, 31)[:, None, :]) & 1
    return (bit == 1) & ((rel >= 0) & (rel < 32 * W))[:, None, :]


def capability() -> tuple[int, int] | None:
    """Compute capability of the default device, or None off CUDA (CPU, interpret mode)."""
    cap = getattr(jax.devices()[0], "compute_capability", None)
    return None if cap is None else tuple(int(x) for x in str(cap).split("."))[:2]


def card_class(cap: tuple[int, int] | None) -> str:
    """The tuned.json key of a compute capability: "sm_XY", or "interpret" for None."""
    return "interpret" if cap is None else f"sm_{cap[0]}{cap[1]}"


@functools.cache
def _tuned_table() -> dict:
    with open(_TUNED_PATH) as f:
        return json.load(f)


def tuned(kernel: str, cap: tuple[int, int] | None | str = "current") -> dict:
    """The tuned entry of `kernel` for a card (default: the current device's), falling back to the
    kernel's "default" entry for a card the table does not name."""
    table = _tuned_table()[kernel]
    key = card_class(capability() if cap == "current" else cap)
    return table.get(key, table["default"])
