"""Every card's kernel configs fit that card: each tuned.json entry's shared memory, computed from
its block shapes and dtypes at the largest shapes its class serves, within the card's per-block
limit, so a 99 KiB consumer card (RTX 3080 sm_86, RTX 4000 Ada sm_89) is never handed an H100 tile."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import pytest

from pallas_kernels import flash_attention as fa
from pallas_kernels import lora_matmul as lm
from pallas_kernels import paged_attention as pa
from pallas_kernels import quant_matmul as qm
from pallas_kernels import w8a8_matmul as w8
from pallas_kernels.common import SHARED_MEMORY_KB, _tuned_table

CARDS = {"sm_80": (8, 0), "sm_86": (8, 6), "sm_89": (8, 9), "sm_90": (9, 0)}
KERNELS = ("flash_attention", "paged_attention", "quant_matmul", "lora_matmul", "w8a8_matmul")
HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
KV_DTYPES = (None, jnp.int8, jnp.float8_e4m3fn)  # None: the pages in the model dtype
PAGE_SIZE = 16  # the engine's default; a larger page than a class's key block enlarges the block to one page


def limit(card: str) -> int:
    return SHARED_MEMORY_KB[card] * 1024


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_names_every_target_card(kernel):
    assert set(CARDS) <= set(_tuned_table()[kernel])


@pytest.mark.parametrize("card", CARDS)
def test_attention_tiles_fit_the_card(card):
    cap = CARDS[card]
    for H, dtype, kv in itertools.product(HEAD_DIMS, DTYPES, KV_DTYPES):
        bs = fa.BlockSizes.default(H, dtype, cap)
        for paged in (True, False):
            used = bs.shared_memory_bytes(H, dtype, kv if paged else None, PAGE_SIZE, paged=paged)
            assert used <= limit(card), f"flash {card} H={H} {jnp.dtype(dtype).name} kv={kv}: {bs} uses {used}"
        for group in (1, 4, 8):
            d = pa.BlockSizes.default(32, 8, 256, PAGE_SIZE, H, dtype if kv is None else kv, cap)
            used = d.shared_memory_bytes(group, H, PAGE_SIZE, dtype, kv)
            assert used <= limit(card), f"decode {card} H={H} {jnp.dtype(dtype).name} kv={kv}: {d} uses {used}"


@pytest.mark.parametrize("card", CARDS)
def test_matmul_tiles_fit_the_card(card):
    cap = CARDS[card]
    for dtype, bits, group, mins, M in itertools.product(DTYPES, (4, 8), (32, 128), (False, True), (1, 256)):
        bs = qm.BlockSizes.default(M, 14336, 4096, dtype, cap)
        used = bs.shared_memory_bytes(bits, dtype, group, mins)
        assert used <= limit(card), f"quant_matmul {card} M={M} int{bits} g{group}: {bs} uses {used}"
    for dtype, T, rank in itertools.product(DTYPES, (1, 32), (16, 64)):
        bs = lm.BlockSizes.default(T, cap)
        used = bs.shared_memory_bytes(T, rank, dtype)
        assert used <= limit(card), f"lora_matmul {card} T={T} rank={rank}: {bs} uses {used}"
    for M in (1, 256):
        bs = w8.BlockSizes.default(M, cap)
        assert bs.shared_memory_bytes() <= limit(card), f"w8a8_matmul {card} M={M}: {bs}"


def test_the_footprint_tells_an_h100_tile_from_a_consumer_one():
    """The measured H100 prefill tile (128 x 128, 3 stages, head dim 128, bf16) needs 224 KiB: it
    fits sm_90's 227 KiB and not the 99 KiB of an RTX 3080 or RTX 4000 Ada, whose entry is smaller."""
    h100 = fa.BlockSizes.default(128, jnp.bfloat16, CARDS["sm_90"])
    assert h100 == fa.BlockSizes(128, 128, 8, 3)
    assert h100.shared_memory_bytes(128, jnp.bfloat16, paged=False) == (128 * 128 * 2) * 7 == 224 * 1024
    assert limit("sm_86") < h100.shared_memory_bytes(128, jnp.bfloat16) <= limit("sm_90")
    assert fa.BlockSizes.default(128, jnp.bfloat16, CARDS["sm_86"]) != h100
    # a 4-page-per-block decode entry in float32 at head dim 256 would not fit a consumer card
    assert pa.BlockSizes(4, 8, 4, 2).shared_memory_bytes(8, 256, 16, jnp.float32) > limit("sm_89")
