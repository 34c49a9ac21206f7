"""paged_decode_attention (interpret mode) against its reference, plain and int8 / fp8 pages.

Shapes are drawn by hypothesis and kept tiny. Interpret mode fills kernel outputs with NaN before
the kernel runs (see test_flash_attention.py), and every split's partial output feeds the final
one, so an unwritten partial shows up as NaN.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import (
    INTERPRET,
    THOROUGH,
    TOLERANCE,
    assert_rows_close,
    draws,
    row_rel_error,
)
from hypothesis import example, given
from hypothesis import strategies as st

from pallas_kernels import paged_attention as pa

BLOCKS = [pa.BlockSizes(1, 1), pa.BlockSizes(1, 4), pa.BlockSizes(2, 2), pa.BlockSizes(4, 8), None]


def _pool(rng, *, B, K, H, page_size, lengths, dtype):
    """K/V pages in a shuffled pool; slots past a sequence's length hold large finite garbage."""
    max_pages = int(-(-max(lengths) // page_size)) + 1  # one spare column, never read
    P = B * max_pages + 2
    block_tables = rng.permutation(P)[: B * max_pages].reshape(B, max_pages)
    used = np.zeros((P, page_size), bool)
    for b, n in enumerate(lengths):
        pos = np.arange(n)
        used[block_tables[b, pos // page_size], pos % page_size] = True
    used = used[None, :, :, None]
    if dtype in ("int8", "float8_e4m3fn"):
        k = rng.integers(-127, 128, (K, P, page_size, H))
        v = rng.integers(-127, 128, (K, P, page_size, H))
        k_pages = jnp.asarray(np.where(used, k, 127)).astype(dtype)
        v_pages = jnp.asarray(np.where(used, v, -127)).astype(dtype)
        scales = dict(
            k_scales=jnp.asarray(rng.uniform(0.002, 0.03, (K, P, page_size)), jnp.float32),
            v_scales=jnp.asarray(rng.uniform(0.002, 0.03, (K, P, page_size)), jnp.float32),
        )
    else:
        garbage = 1e4 * rng.standard_normal((K, P, page_size, H))
        k_pages = jnp.asarray(np.where(used, rng.standard_normal((K, P, page_size, H)), garbage), dtype)
        v_pages = jnp.asarray(np.where(used, rng.standard_normal((K, P, page_size, H)), -garbage), dtype)
        scales = {}
    return k_pages, v_pages, jnp.asarray(block_tables, jnp.int32), scales


def _check(actual, expected, dtype):
    assert_rows_close(actual, expected, TOLERANCE[jnp.dtype(dtype).name])


def _lengths(page_size):
    return st.sampled_from([1, page_size - 1, page_size, page_size + 1, 5 * page_size + 3])


@st.composite
def decode_cases(draw, kv_dtypes):
    page_size = draw(st.sampled_from([8, 16, 32]))
    B = draw(st.integers(1, 3))
    return dict(
        B=B,
        lengths=[draw(_lengths(page_size)) for _ in range(B)],
        page_size=page_size,
        K=draw(st.sampled_from([1, 2])),
        G=draw(st.sampled_from([1, 4, 8])),
        H=draw(st.sampled_from([64, 128])),
        dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        kv_dtype=draw(st.sampled_from(kv_dtypes)),
        window=draw(st.sampled_from([0, 0, 1, 9, 40])),
        softcap=draw(st.sampled_from([None, None, 2.0])),
        sinks=draw(st.sampled_from([False, False, True])),
        blocks=draw(st.sampled_from(range(len(BLOCKS)))),
        data_seed=draw(st.integers(0, 2**16)),
    )


def _run_case(case, seed):
    rng = np.random.default_rng([seed, case["data_seed"]])
    B, K, H, dtype = case["B"], case["K"], case["H"], case["dtype"]
    kv_dtype = case["kv_dtype"] or dtype
    k_pages, v_pages, block_tables, scales = _pool(
        rng, B=B, K=K, H=H, page_size=case["page_size"], lengths=case["lengths"], dtype=kv_dtype
    )
    q = jnp.asarray(rng.standard_normal((B, K * case["G"], H)), dtype)
    args = (q, k_pages, v_pages, block_tables, jnp.asarray(case["lengths"], jnp.int32))
    kw = dict(scales, window=case["window"], softcap=case.get("softcap"), block_sizes=BLOCKS[case["blocks"]])
    if case.get("sinks"):  # logits of the scores' size, so the sink takes a real share
        kw["sinks"] = jnp.asarray(2 * rng.standard_normal(K * case["G"]), jnp.float32)
    _check(pa.paged_decode_attention(*args, **kw, interpret=INTERPRET), pa.reference(*args, **kw), dtype)


def _case(lengths, page_size, K, G, H, dtype, kv_dtype=None, window=0, blocks=0, data_seed=0, softcap=None,
          sinks=False):
    return dict(B=len(lengths), lengths=lengths, page_size=page_size, K=K, G=G, H=H, dtype=dtype, kv_dtype=kv_dtype,
                window=window, blocks=blocks, data_seed=data_seed, softcap=softcap, sinks=sinks)


@draws(2)
@given(case=decode_cases(kv_dtypes=[None]))
@example(case=_case([15, 16, 17], 16, 1, 8, 64, "bfloat16", blocks=0))  # around a page boundary, GQA 8, 1-page blocks
@example(case=_case([1, 43], 8, 2, 4, 128, "float32", window=9, blocks=3))  # a one-token sequence beside a long one
@example(case=_case([9, 30], 8, 2, 2, 64, "float32", window=9, softcap=2.0))  # soft-capped scores (Gemma 2)
@example(case=_case([0, 9, 70], 8, 2, 4, 64, "float32", window=9, blocks=1, sinks=True))  # sinks (gpt-oss), split-K
def test_decode_matches_reference(case, seed):
    """Pages in the query's dtype; ragged lengths around page boundaries; windows; GQA 1/4/8."""
    _run_case(case, seed)


@draws(2)
@given(case=decode_cases(kv_dtypes=["int8", "float8_e4m3fn"]))
@example(case=_case([32, 33], 32, 2, 8, 128, "bfloat16", kv_dtype="float8_e4m3fn", blocks=1))  # fp8, a page boundary
@example(case=_case([1, 7, 9], 8, 1, 4, 64, "float32", kv_dtype="int8", window=1, blocks=2))  # int8, window 1
@example(case=_case([12, 40], 8, 2, 2, 64, "float32", kv_dtype="int8", softcap=2.0))  # int8 keys' scales, then the cap
def test_quantised_decode_matches_reference(case, seed):
    """int8 and fp8 pages with per-token scales, dequantised in the kernel."""
    _run_case(case, seed)


@pytest.mark.slow
@THOROUGH
@given(case=decode_cases(kv_dtypes=[None, "int8", "float8_e4m3fn"]))
def test_decode_matches_reference_on_many_shapes(case, seed):
    _run_case(case, seed)


@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
def test_reference_matches_naive_loops(rng, kv_dtype):
    """The reference against float64 loops over a hand gather of dequantised pages: int8 values, or
    e4m3 values read by NumPy through ml_dtypes (an implementation of the format apart from XLA's)."""
    B, K, G, H, page_size = 2, 2, 3, 8, 4
    lengths = np.array([11, 3])
    max_pages = 3
    P = B * max_pages + 1
    tables = rng.permutation(P)[: B * max_pages].reshape(B, max_pages)
    q = rng.standard_normal((B, K * G, H)).astype(np.float32)
    if kv_dtype == "int8":
        k_pages = rng.integers(-127, 128, (K, P, page_size, H)).astype(np.int8)
        v_pages = rng.integers(-127, 128, (K, P, page_size, H)).astype(np.int8)
    else:  # every e4m3 magnitude from subnormals to 448, both signs
        k_pages = (rng.choice([-1, 1], (K, P, page_size, H)) * 2.0 ** rng.uniform(-9, 8.8, (K, P, page_size, H)))
        v_pages = (rng.choice([-1, 1], (K, P, page_size, H)) * 2.0 ** rng.uniform(-9, 8.8, (K, P, page_size, H)))
        k_pages, v_pages = k_pages.astype(ml_dtypes.float8_e4m3fn), v_pages.astype(ml_dtypes.float8_e4m3fn)
    low = 0.01 if kv_dtype == "int8" else 0.002  # scores of a few units either way
    k_scales = rng.uniform(low, 3 * low, (K, P, page_size)).astype(np.float32)
    v_scales = rng.uniform(low, 3 * low, (K, P, page_size)).astype(np.float32)
    sink_logits = 2 * rng.standard_normal(K * G)
    for window, softcap, sinks in ((0, None, None), (4, None, None), (4, 1.5, None), (4, None, sink_logits)):
        expected = np.zeros((B, K * G, H))
        for b in range(B):
            pos = lengths[b] - 1
            keys = [j for j in range(lengths[b]) if window == 0 or pos - j < window]
            pages, offs = tables[b, np.array(keys) // page_size], np.array(keys) % page_size
            for n in range(K * G):
                kv = n // G
                k = k_pages[kv, pages, offs].astype(np.float64) * k_scales[kv, pages, offs][:, None]
                v = v_pages[kv, pages, offs].astype(np.float64) * v_scales[kv, pages, offs][:, None]
                s = k @ q[b, n] / np.sqrt(H)
                if softcap:
                    s = softcap * np.tanh(s / softcap)
                top = s.max() if sinks is None else max(s.max(), sinks[n])
                p = np.exp(s - top)
                expected[b, n] = p @ v / (p.sum() + (0 if sinks is None else np.exp(sinks[n] - top)))
        actual = pa.reference(q, jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(tables),
                              jnp.asarray(lengths), k_scales=jnp.asarray(k_scales), v_scales=jnp.asarray(v_scales),
                              window=window, softcap=softcap, sinks=None if sinks is None else jnp.asarray(sinks))
        assert row_rel_error(actual, expected) <= 1e-5


def test_empty_sequence_gives_zeros(rng):
    """lengths = 0 (a padded batch slot): zeros, never NaN, in kernel and reference."""
    k_pages = jnp.asarray(rng.standard_normal((1, 4, 16, 64)), jnp.float32)
    args = (jnp.ones((2, 4, 64), jnp.float32), k_pages, k_pages, jnp.array([[0], [1]], jnp.int32),
            jnp.array([0, 16], jnp.int32))
    out = np.asarray(pa.paged_decode_attention(*args, interpret=INTERPRET))
    assert np.array_equal(out[0], np.zeros_like(out[0]))
    assert np.array_equal(np.asarray(pa.reference(*args))[0], out[0])
    assert np.isfinite(out).all()


def test_bad_input_raises_value_error(rng):
    q = jnp.ones((1, 4, 64), jnp.float32)
    pages = jnp.zeros((2, 3, 16, 64), jnp.int8)
    table, lengths = jnp.zeros((1, 2), jnp.int32), jnp.array([5], jnp.int32)
    with pytest.raises(ValueError, match="k_scales"):
        pa.paged_decode_attention(q, pages, pages, table, lengths)
    with pytest.raises(ValueError, match="v_scales"):
        pa.paged_decode_attention(q, pages, pages, table, lengths, k_scales=jnp.ones((2, 3, 16)),
                                  v_scales=jnp.ones((2, 3, 8)))
    with pytest.raises(ValueError, match="N=3"):
        pa.paged_decode_attention(q[:, :3], pages.astype(jnp.float32), pages.astype(jnp.float32), table, lengths)
    with pytest.raises(ValueError, match="lengths"):
        pa.paged_decode_attention(q, pages.astype(jnp.float32), pages.astype(jnp.float32), table, lengths[:0])


@st.composite
def latent_cases(draw):
    page_size = draw(st.sampled_from([8, 16]))
    B = draw(st.integers(1, 3))
    return dict(B=B, lengths=[draw(_lengths(page_size)) for _ in range(B)], page_size=page_size,
                N=draw(st.sampled_from([4, 16, 32])), C=draw(st.sampled_from([32, 64])), R=draw(st.sampled_from([8, 16])),
                dtype=draw(st.sampled_from(["float32", "bfloat16"])), kv_dtype=draw(st.sampled_from([None, "int8"])),
                blocks=draw(st.sampled_from(range(len(BLOCKS)))), data_seed=draw(st.integers(0, 2**16)))


@draws(3)
@given(case=latent_cases())
@example(case=dict(B=2, lengths=[15, 17], page_size=16, N=16, C=64, R=16, dtype="float32", kv_dtype=None, blocks=0,
                   data_seed=0))  # around a page boundary, 16 query heads on one latent head
@example(case=dict(B=3, lengths=[1, 9, 43], page_size=8, N=4, C=32, R=8, dtype="bfloat16", kv_dtype="int8", blocks=3,
                   data_seed=1))  # int8 latent rows, split-K
def test_latent_pages_match_reference(case, seed):
    """Multi-head latent attention's decode: one page of latent rows (C + R wide) read once for the
    scores and, its first C columns, for the values. Kernel (interpret mode) against the reference,
    and the reference against the standard reference with the rows as both keys and values."""
    rng = np.random.default_rng([seed, case["data_seed"]])
    B, N, C, H, dtype = case["B"], case["N"], case["C"], case["C"] + case["R"], case["dtype"]
    k_pages, _, tables, scales = _pool(rng, B=B, K=1, H=H, page_size=case["page_size"], lengths=case["lengths"],
                                       dtype=case["kv_dtype"] or dtype)
    q = jnp.asarray(rng.standard_normal((B, N, H)), dtype)
    lengths = jnp.asarray(case["lengths"], jnp.int32)
    k_scales = scales.get("k_scales")
    expected = pa.reference(q, k_pages, None, tables, lengths, k_scales=k_scales, values=C)
    assert expected.shape == (B, N, C)
    both = pa.reference(q, k_pages, k_pages, tables, lengths, k_scales=k_scales, v_scales=k_scales)[..., :C]
    np.testing.assert_array_equal(np.asarray(expected), np.asarray(both))
    actual = pa.paged_decode_attention(q, k_pages, None, tables, lengths, k_scales=k_scales, values=C,
                                       block_sizes=BLOCKS[case["blocks"]], interpret=INTERPRET)
    _check(actual, expected, dtype)


def test_latent_pages_bad_input_raises_value_error():
    q, pages = jnp.ones((1, 4, 40), jnp.float32), jnp.zeros((1, 3, 8, 40), jnp.float32)
    table, lengths = jnp.zeros((1, 2), jnp.int32), jnp.array([5], jnp.int32)
    with pytest.raises(ValueError, match="values in"):
        pa.paged_decode_attention(q, pages, None, table, lengths, values=41)
    with pytest.raises(ValueError, match="latent pages"):
        pa.paged_decode_attention(q, pages, pages, table, lengths, values=32)
