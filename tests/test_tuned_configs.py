"""Every card's kernel configs fit that card: each tuned.json entry's shared memory, worked out here
from its block shapes and dtypes at the largest shapes its class serves, within the card's per-block
limit, so a 99 KiB consumer card (RTX 3080 sm_86, RTX 4000 Ada sm_89) is never handed an H100 tile.

The footprints below are written from the kernels' inner loops (pallas_kernels/*.py), not from
their `BlockSizes.shared_memory_bytes`: what Triton's pipeliner keeps in flight is num_stages
copies of the tiles one inner step loads, plus the tiles loaded once per program. Each kernel's own
estimate must equal this one, so an estimate that drops or double-counts a tile fails here. Tiles
are taken at the configured block shape: where a wrapper shrinks a tile to fit a small input, the
footprint only falls."""

from __future__ import annotations

import itertools

import pytest

from pallas_kernels import flash_attention as fa
from pallas_kernels import lora_matmul as lm
from pallas_kernels import paged_attention as pa
from pallas_kernels import quant_matmul as qm
from pallas_kernels import w8a8_matmul as w8
from pallas_kernels.common import SHARED_MEMORY_KB, _tuned_table

# Every card class tuned.json names, and one it does not (Blackwell consumer, sm_120: 99 KiB per
# block, the smallest of the target cards) for its "default" entry.
CARDS = {"sm_80": (8, 0), "sm_86": (8, 6), "sm_87": (8, 7), "sm_89": (8, 9), "sm_90": (9, 0), "sm_100": (10, 0),
         "default": (12, 0)}
KERNELS = ("flash_attention", "paged_attention", "quant_matmul", "lora_matmul", "w8a8_matmul")
HEAD_DIMS = (64, 128, 256)
DTYPES = ("bfloat16", "float16", "float32")
KV_DTYPES = (None, "int8", "float8_e4m3fn")  # None: the pages in the model dtype
# 16 is the engine's default; a page larger than a key block enlarges the block. Pages of 32 tokens
# are left out: float32 pages at head dim 256 then take 144 KiB per block, over the 99 KiB cards.
PAGE_SIZES = (8, 16)
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "int8": 1, "uint8": 1, "float8_e4m3fn": 1}
DOT = 16  # Triton's tensor-core dot needs every dimension >= 16, and power-of-two tensors


def limit(card: str) -> int:
    return SHARED_MEMORY_KB.get(card, min(SHARED_MEMORY_KB.values())) * 1024


def padded(n: int) -> int:
    """n raised to a power of two, at least DOT: how the kernels pad head dims, GQA groups and ranks."""
    p = DOT
    while p < n:
        p *= 2
    return p


def tiles(*tiles: tuple) -> int:
    """Bytes of (rows, cols, dtype name) tiles."""
    return sum(rows * cols * BYTES[dtype] for rows, cols, dtype in tiles)


def flash_footprint(bs: fa.BlockSizes, H: int, dtype: str, kv: str | None, page_size: int, paged: bool) -> int:
    """Once: the (block_q, Hp) query tile. Per stage, one key block: its K and V tiles in the page
    dtype and, for 8-bit pages, a float32 scale per key for each. Paged, a key block is whole pages
    (at least one, and at least 16 keys)."""
    kv = kv or dtype
    if paged:
        pages = max(bs.block_k // page_size, 1, -(-DOT // page_size))
        keys = pages * page_size
    else:
        keys = bs.block_k
    step = tiles((keys, padded(H), kv), (keys, padded(H), kv))
    if BYTES[kv] == 1:
        step += tiles((keys, 1, "float32"), (keys, 1, "float32"))
    return tiles((bs.block_q, padded(H), dtype)) + bs.num_stages * step


def decode_footprint(bs: pa.BlockSizes, group: int, H: int, page_size: int, dtype: str, kv: str | None) -> int:
    """Once: the (Gp, Hp) query tile of a kv group. Per stage, one key block of pages_per_block pages
    (raised to reach 16 tokens): its K and V tiles and, for 8-bit pages, their float32 scales."""
    kv = kv or dtype
    keys = max(bs.pages_per_block, -(-DOT // page_size)) * page_size
    step = tiles((keys, padded(H), kv), (keys, padded(H), kv))
    if BYTES[kv] == 1:
        step += tiles((keys, 1, "float32"), (keys, 1, "float32"))
    return tiles((padded(group), padded(H), dtype)) + bs.num_stages * step


def quant_footprint(bs: qm.BlockSizes, bits: int, dtype: str, group_size: int, mins: bool) -> int:
    """Per stage, one K step of block_k packed rows: the x tile (4 bits: the low and the high halves,
    one tile each), the packed uint8 weight tile, and for each group the step spans a scale row
    (x's dtype) and a zero row (uint8) or, Q4_1-style, a min row (x's dtype)."""
    halves = 2 if bits == 4 else 1
    rows_per_group = group_size * bits // 8
    groups = -(-bs.block_k // rows_per_group)
    step = halves * tiles((bs.block_m, bs.block_k, dtype)) + tiles((bs.block_k, bs.block_n, "uint8"))
    step += tiles((groups, bs.block_n, dtype), (groups, bs.block_n, dtype if mins else "uint8"))
    return bs.num_stages * step


def lora_footprint(bs: lm.BlockSizes, tokens_per_segment: int, rank: int, dtype: str) -> int:
    """Two programs; the larger counts. Shrink: per stage an x tile (rows, block_k) and an A tile
    (block_k, Rp). Expand: per stage a B tile (Rp, block_n) and a y tile (rows, block_n). Both keep
    the (rows, Rp) float32 intermediate. BGMV (one token per segment) works on one row."""
    rows, r = (1 if tokens_per_segment == 1 else bs.block_m), padded(rank)
    shrink = tiles((rows, bs.block_k, dtype), (bs.block_k, r, dtype))
    expand = tiles((r, bs.block_n, dtype), (rows, bs.block_n, dtype))
    return bs.num_stages * max(shrink, expand) + tiles((rows, r, "float32"))


def w8a8_footprint(bs: w8.BlockSizes) -> int:
    """Per stage: an 8-bit x tile (block_m, block_k) and an 8-bit weight tile (block_k, block_n); the
    row and column scales are read once, in the epilogue, into registers."""
    return bs.num_stages * tiles((bs.block_m, bs.block_k, "int8"), (bs.block_k, bs.block_n, "int8"))


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_names_every_target_card(kernel):
    assert set(CARDS) - {"default"} <= set(_tuned_table()[kernel])
    assert "default" in _tuned_table()[kernel]


@pytest.mark.parametrize("card", CARDS)
def test_attention_tiles_fit_the_card(card):
    cap = CARDS[card]
    for H, dtype, kv, page in itertools.product(HEAD_DIMS, DTYPES, KV_DTYPES, PAGE_SIZES):
        bs = fa.BlockSizes.default(H, dtype, cap)
        for paged in (True, False):
            used = flash_footprint(bs, H, dtype, kv if paged else None, page, paged)
            assert used <= limit(card), f"flash {card} H={H} {dtype} kv={kv} page={page}: {bs} uses {used}"
            assert bs.shared_memory_bytes(H, dtype, kv if paged else None, page, paged=paged) == used, (card, H, dtype)
        for group in (1, 4, 8):
            d = pa.BlockSizes.default(32, 8, 256, page, H, dtype if kv is None else kv, cap)
            used = decode_footprint(d, group, H, page, dtype, kv)
            assert used <= limit(card), f"decode {card} H={H} {dtype} kv={kv} page={page}: {d} uses {used}"
            assert d.shared_memory_bytes(group, H, page, dtype, kv) == used, (card, H, dtype, kv, group)


@pytest.mark.parametrize("card", CARDS)
def test_matmul_tiles_fit_the_card(card):
    cap = CARDS[card]
    for dtype, bits, group, mins, M in itertools.product(DTYPES, (4, 8), (32, 128), (False, True), (1, 256)):
        bs = qm.BlockSizes.default(M, 14336, 4096, dtype, cap)
        used = quant_footprint(bs, bits, dtype, group, mins)
        assert used <= limit(card), f"quant_matmul {card} M={M} int{bits} g{group}: {bs} uses {used}"
        assert bs.shared_memory_bytes(bits, dtype, group, mins) == used, (card, dtype, bits, group, mins, M)
    for dtype, T, rank in itertools.product(DTYPES, (1, 32), (16, 64)):
        bs = lm.BlockSizes.default(T, cap)
        used = lora_footprint(bs, T, rank, dtype)
        assert used <= limit(card), f"lora_matmul {card} T={T} rank={rank}: {bs} uses {used}"
        assert bs.shared_memory_bytes(T, rank, dtype) == used, (card, dtype, T, rank)
    for M in (1, 256):
        bs = w8.BlockSizes.default(M, cap)
        used = w8a8_footprint(bs)
        assert used <= limit(card), f"w8a8_matmul {card} M={M}: {bs} uses {used}"
        assert bs.shared_memory_bytes() == used, (card, M)


def test_the_footprint_tells_an_h100_tile_from_a_consumer_one():
    """The measured H100 prefill tile (128 x 128, 3 stages, head dim 128, bf16) needs 224 KiB: it
    fits sm_90's 227 KiB and not the 99 KiB of an RTX 3080 or RTX 4000 Ada, whose entry is smaller."""
    h100 = fa.BlockSizes.default(128, "bfloat16", CARDS["sm_90"])
    assert h100 == fa.BlockSizes(128, 128, 8, 3)
    assert flash_footprint(h100, 128, "bfloat16", None, 16, paged=False) == (128 * 128 * 2) * 7 == 224 * 1024
    assert limit("sm_86") < flash_footprint(h100, 128, "bfloat16", None, 16, paged=True) <= limit("sm_90")
    assert fa.BlockSizes.default(128, "bfloat16", CARDS["sm_86"]) != h100
    # a 4-page-per-block decode entry in float32 at head dim 256 would not fit a consumer card
    assert decode_footprint(pa.BlockSizes(4, 8, 4, 2), 8, 256, 16, "float32", None) > limit("sm_89")


def test_the_footprints_by_hand():
    """Two footprints worked out on paper, so the functions above are checked too. Decode, group 8,
    head dim 128, int8 pages of 16 tokens, 4 pages a block, 2 stages: the (16, 128) bf16 query tile
    4 KiB, then per stage K and V (64, 128) int8 (8 KiB each) and 64 float32 scales each (256 B):
    4096 + 2 * (16384 + 512) = 37,888 B. int4 matmul, 16 x 128 x 64 tiles, groups of 32 (16 packed
    rows), 3 stages, bf16: x halves 2 * 2 KiB, weight 8 KiB, 4 groups of scale (bf16) and zero
    (uint8) rows 1 KiB + 512 B: 3 * 13,824 = 41,472 B."""
    assert decode_footprint(pa.BlockSizes(4, 8, 4, 2), 8, 128, 16, "bfloat16", "int8") == 37_888
    assert quant_footprint(qm.BlockSizes(16, 128, 64, 1, 4, 3), 4, "bfloat16", 32, False) == 41_472


@pytest.mark.parametrize("card,auto_runs", [((8, 0), "xla"), ((8, 6), "xla"), ((8, 9), "pallas"), ((9, 0), "pallas")])
def test_fp8_kv_pages_on_a_card_without_fp8(monkeypatch, card, auto_runs):
    """Triton reads float8_e4m3fn pages from sm_89 on: before it, attention="auto" over an fp8 cache
    falls back to the XLA path and attention="pallas" is refused when the engine is configured (not
    inside the first step's trace); int8 pages and bf16 caches keep the kernels on every card."""
    import jax

    import jaxinfer as ji
    from jaxinfer.models.decoder import Impl

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr("pallas_kernels.common.capability", lambda: card)
    assert ji.EngineConfig(attention="auto", kv_dtype="fp8").attention == auto_runs
    assert Impl(attention="auto", kv_dtype="fp8").attention == auto_runs
    assert ji.EngineConfig(attention="auto", kv_dtype="int8").attention == "pallas"
    assert ji.EngineConfig(attention="auto").attention == "pallas"
    if auto_runs == "pallas":
        assert ji.EngineConfig(attention="pallas", kv_dtype="fp8").attention == "pallas"
    else:
        with pytest.raises(ValueError, match=r"kv_dtype='fp8' with attention='pallas' needs a GPU of compute "
                                             r"capability >= 8.9"):
            ji.EngineConfig(attention="pallas", kv_dtype="fp8")
