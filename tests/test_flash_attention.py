"""flash_attention and paged_flash_attention (interpret mode) against their references (draft-tree
attention: the model's XLA path too).

Shapes are drawn by hypothesis and kept tiny (each new shape costs an interpret-mode compile);
small block sizes make tiny shapes still cross several query and key blocks and page boundaries.
Interpret mode fills kernel outputs with NaN before the kernel runs, so an element the kernel
fails to write shows up as NaN; `test_interpret_outputs_start_poisoned` guards that assumption.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import INTERPRET, THOROUGH, TOLERANCE, draws, row_errors, row_rel_error
from hypothesis import example, given
from hypothesis import strategies as st
from jax.experimental import pallas as pl

from jaxinfer.models import attention
from pallas_kernels import flash_attention as fa
from pallas_kernels.common import pack_tree_mask

BLOCKS = [fa.BlockSizes(16, 16, 4, 2), fa.BlockSizes(32, 16, 4, 2), fa.BlockSizes(16, 32, 4, 2), None]


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _assert_matches(actual, expected, q_lens, dtype):
    """Rows of real queries (i < q_lens[b]) within tolerance; every row finite."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all(), "unwritten or non-finite output"
    real = np.arange(actual.shape[1])[None, :] < np.asarray(q_lens)[:, None]  # (B, T)
    errors = row_errors(actual[real], expected[real])
    assert errors.max() <= TOLERANCE[jnp.dtype(dtype).name], f"max row error {errors.max():.3g}"


@st.composite
def dense_cases(draw):
    K = draw(st.sampled_from([1, 2]))
    return dict(
        B=draw(st.integers(1, 2)),
        T=draw(st.integers(1, 40)),
        S_extra=draw(st.integers(0, 40)),
        K=K,
        G=draw(st.sampled_from([1, 4, 8])),
        H=draw(st.sampled_from([64, 128])),
        dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        window=draw(st.sampled_from([0, 0, 1, 7, 33])),
        softcap=draw(st.sampled_from([None, None, 2.0])),
        sinks=draw(st.sampled_from([False, False, True])),
        cut_kv=draw(st.booleans()),
        blocks=draw(st.sampled_from(range(len(BLOCKS)))),
        data_seed=draw(st.integers(0, 2**16)),
    )


def _dense(B, T, S_extra, K, G, H, dtype, window=0, cut_kv=False, blocks=0, data_seed=0, softcap=None, sinks=False):
    return dict(B=B, T=T, S_extra=S_extra, K=K, G=G, H=H, dtype=dtype, window=window, cut_kv=cut_kv, blocks=blocks,
                data_seed=data_seed, softcap=softcap, sinks=sinks)


def _sinks(rng, case, N):
    """kw with random attention sinks (logits of the scores' size) when the case asks for them."""
    return dict(sinks=jnp.asarray(2 * rng.standard_normal(N), jnp.float32)) if case.get("sinks") else {}


@draws(2)
@given(case=dense_cases())
@example(case=_dense(2, 1, 40, 1, 8, 64, "bfloat16"))  # one query per sequence after a ragged prefix, GQA 8
@example(case=_dense(2, 33, 7, 2, 4, 128, "float32", window=1, cut_kv=True, blocks=2))  # window 1, keys cut
@example(case=_dense(1, 20, 9, 2, 2, 64, "float32", window=7, softcap=2.0))  # soft-capped scores (Gemma 2)
@example(case=_dense(2, 20, 9, 2, 2, 64, "float32", window=7, cut_kv=True, blocks=0, sinks=True))  # sinks (gpt-oss)
def test_flash_attention_matches_reference(case, seed):
    """Chunked prefill over dense k/v: each sequence has q_len real queries after a prefix
    (and sometimes fewer keys than the last query's position: those queries see fewer keys)."""
    _run_dense(case, seed)


@pytest.mark.slow
@THOROUGH
@given(case=dense_cases())
def test_flash_attention_matches_reference_on_many_shapes(case, seed):
    _run_dense(case, seed)


def _run_dense(case, seed):
    rng = np.random.default_rng([seed, case["data_seed"]])
    B, T, K, H, dtype = case["B"], case["T"], case["K"], case["H"], case["dtype"]
    N = K * case["G"]
    S = T + case["S_extra"]
    q_lens = rng.integers(1, T + 1, B)
    q_offsets = rng.integers(0, S - q_lens + 1)  # the prefix already in the cache
    kv_lens = q_offsets + q_lens
    if case["cut_kv"]:  # kv_lens also hides keys from real queries: the mask must apply it
        kv_lens -= rng.integers(0, q_lens + 1)
    args = (
        _normal(rng, (B, T, N, H), dtype), _normal(rng, (B, S, K, H), dtype), _normal(rng, (B, S, K, H), dtype),
        jnp.asarray(q_offsets, jnp.int32), jnp.asarray(kv_lens, jnp.int32),
    )
    kw = dict(window=case["window"], softcap=case.get("softcap"), block_sizes=BLOCKS[case["blocks"]], **_sinks(rng, case, N))
    actual = fa.flash_attention(*args, **kw, interpret=INTERPRET)
    _assert_matches(actual, fa.reference(*args, **kw), q_lens, dtype)


def _paged_inputs(rng, *, B, T, N, K, H, page_size, kv_lens, dtype, spare_pages=3):
    """Random pages in a shuffled pool; slots past a sequence's length hold large finite garbage."""
    max_pages = int(-(-max(kv_lens) // page_size))
    P = B * max_pages + spare_pages
    k_pages = _normal(rng, (K, P, page_size, H), dtype)
    v_pages = _normal(rng, (K, P, page_size, H), dtype)
    block_tables = rng.permutation(P)[: B * max_pages].reshape(B, max_pages)
    used = np.zeros((P, page_size), bool)
    for b, n in enumerate(kv_lens):
        pos = np.arange(n)
        used[block_tables[b, pos // page_size], pos % page_size] = True
    garbage = jnp.asarray(1e4 * rng.standard_normal((K, P, page_size, H)), dtype)
    k_pages = jnp.where(used[None, :, :, None], k_pages, garbage)
    v_pages = jnp.where(used[None, :, :, None], v_pages, -garbage)
    return k_pages, v_pages, jnp.asarray(block_tables, jnp.int32)


@st.composite
def paged_cases(draw):
    page_size = draw(st.sampled_from([8, 16, 32]))
    lengths = st.sampled_from([1, page_size - 1, page_size, page_size + 1, 3 * page_size + 5])
    return dict(
        B=draw(st.integers(1, 2)),
        T=draw(st.sampled_from([1, 5, 16, 23])),
        kv_lens=[draw(lengths), draw(lengths)],
        page_size=page_size,
        K=draw(st.sampled_from([1, 2])),
        G=draw(st.sampled_from([1, 4, 8])),
        H=draw(st.sampled_from([64, 128])),
        dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        window=draw(st.sampled_from([0, 0, 3, 20])),
        softcap=draw(st.sampled_from([None, None, 2.0])),
        sinks=draw(st.sampled_from([False, False, True])),
        blocks=draw(st.sampled_from(range(len(BLOCKS)))),
        data_seed=draw(st.integers(0, 2**16)),
    )


def _paged(B, T, kv_lens, page_size, K, G, H, dtype, window=0, blocks=0, data_seed=0, softcap=None, sinks=False):
    return dict(B=B, T=T, kv_lens=kv_lens, page_size=page_size, K=K, G=G, H=H, dtype=dtype, window=window,
                blocks=blocks, data_seed=data_seed, softcap=softcap, sinks=sinks)


@draws(2)
@given(case=paged_cases())
@example(case=_paged(2, 23, [101, 40], 32, 2, 4, 128, "float32", window=20, data_seed=1))
@example(case=_paged(2, 1, [16, 17], 16, 1, 8, 64, "bfloat16", blocks=1))  # one query each side of a page boundary
@example(case=_paged(2, 5, [1, 8], 8, 2, 1, 128, "float32", window=3, blocks=3))  # a one-token sequence, a full page
@example(case=_paged(2, 16, [40, 17], 16, 1, 4, 64, "bfloat16", blocks=1, softcap=2.0))  # soft-capped scores
@example(case=_paged(2, 5, [40, 3], 8, 2, 2, 64, "float32", window=20, sinks=True))  # sinks (gpt-oss)
def test_paged_flash_attention_matches_reference(case, seed):
    """Chunked prefill / prefix-cache hit: the chunk's queries are the last q_len of kv_len tokens."""
    _run_paged(case, seed)


@pytest.mark.slow
@THOROUGH
@given(case=paged_cases())
def test_paged_flash_attention_matches_reference_on_many_shapes(case, seed):
    _run_paged(case, seed)


def _run_paged(case, seed):
    rng = np.random.default_rng([seed, case["data_seed"]])
    B, T, K, H, dtype = case["B"], case["T"], case["K"], case["H"], case["dtype"]
    N = K * case["G"]
    kv_lens = np.asarray(case["kv_lens"][:B])
    q_lens = np.minimum(kv_lens, T)
    k_pages, v_pages, block_tables = _paged_inputs(
        rng, B=B, T=T, N=N, K=K, H=H, page_size=case["page_size"], kv_lens=kv_lens, dtype=dtype
    )
    args = (
        _normal(rng, (B, T, N, H), dtype), k_pages, v_pages, block_tables,
        jnp.asarray(kv_lens - q_lens, jnp.int32), jnp.asarray(kv_lens, jnp.int32),
    )
    kw = dict(window=case["window"], softcap=case.get("softcap"), block_sizes=BLOCKS[case["blocks"]], **_sinks(rng, case, N))
    actual = fa.paged_flash_attention(*args, **kw, interpret=INTERPRET)
    _assert_matches(actual, fa.paged_reference(*args, **kw), q_lens, dtype)


def _naive(q, k, v, q_offsets, kv_lens, window, tree=None, softcap=None, sinks=None):
    """Loops in float64 numpy over (b, n, i): the definition of masked-by-position attention
    (tree (B, T, T) bool: from q_offsets[b] on, query i sees key q_offsets[b] + j only if tree[b, i, j])."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    G = N // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            for i in range(T):
                pos = q_offsets[b] + i
                keys = [j for j in range(kv_lens[b]) if j <= pos and (window == 0 or pos - j < window)
                        and (tree is None or j < q_offsets[b] or tree[b, i, j - q_offsets[b]])]
                if not keys:
                    continue
                s = k[b, keys, n // G] @ q[b, i, n] / np.sqrt(H)
                if softcap:
                    s = softcap * np.tanh(s / softcap)
                top = s.max() if sinks is None else max(s.max(), sinks[n])
                p = np.exp(s - top)
                out[b, i, n] = p @ v[b, keys, n // G] / (p.sum() + (0 if sinks is None else np.exp(sinks[n] - top)))
    return out


def test_references_match_naive_loops(rng):
    """The references themselves, against plain loops (dense) and a hand gather of pages (paged)."""
    B, T, S, K, G, H, page_size = 2, 6, 21, 2, 2, 8, 4
    q = rng.standard_normal((B, T, K * G, H)).astype(np.float32)
    k = rng.standard_normal((B, S, K, H)).astype(np.float32)
    v = rng.standard_normal((B, S, K, H)).astype(np.float32)
    q_offsets, kv_lens = np.array([15, 0]), np.array([21, 4])  # sequence 1: queries past kv_len
    sink_logits = 2 * rng.standard_normal(K * G)
    for window, softcap, sinks in ((0, None, None), (5, None, None), (5, 1.5, None), (5, None, sink_logits)):
        expected = _naive(q, k, v, q_offsets, kv_lens, window, softcap=softcap, sinks=sinks)
        actual = fa.reference(q, k, v, jnp.asarray(q_offsets), jnp.asarray(kv_lens), window=window, softcap=softcap,
                              sinks=None if sinks is None else jnp.asarray(sinks))
        assert row_rel_error(actual, expected + 1e-30) <= 1e-5
    assert row_rel_error(_naive(q, k, v, q_offsets, kv_lens, 5, softcap=1.5), _naive(q, k, v, q_offsets, kv_lens, 5)) > 1e-2

    max_pages = -(-S // page_size)
    P = B * max_pages + 2
    tables = rng.permutation(P)[: B * max_pages].reshape(B, max_pages)
    k_pages = rng.standard_normal((K, P, page_size, H)).astype(np.float32)
    v_pages = rng.standard_normal((K, P, page_size, H)).astype(np.float32)
    k_dense = np.zeros((B, max_pages * page_size, K, H), np.float32)
    v_dense = np.zeros_like(k_dense)
    for b in range(B):
        for t in range(max_pages * page_size):
            k_dense[b, t] = k_pages[:, tables[b, t // page_size], t % page_size]
            v_dense[b, t] = v_pages[:, tables[b, t // page_size], t % page_size]
    expected = _naive(q, k_dense, v_dense, q_offsets, kv_lens, 3)
    actual = fa.paged_reference(q, k_pages, v_pages, jnp.asarray(tables), jnp.asarray(q_offsets),
                                jnp.asarray(kv_lens), window=3)
    assert row_rel_error(actual, expected + 1e-30) <= 1e-5


def _random_trees(rng, B, T):
    """(B, T, T) bool: token i sees token j iff j is i's ancestor or i itself (parents come first)."""
    visible = np.zeros((B, T, T), bool)
    for b in range(B):
        visible[b] = np.eye(T, dtype=bool)
        for i in range(1, T):
            visible[b, i] |= visible[b, rng.integers(0, i)]
    return visible


@pytest.mark.parametrize("T, page_size, blocks, prefix", [
    (6, 8, 0, [0, 13]), (40, 16, 1, [21, 64]),  # 40 tokens: two mask words
])
def test_paged_tree_attention_matches_reference(rng, T, page_size, blocks, prefix):
    """A speculative draft tree verified in one pass: the T queries are tree tokens at the end of
    the pages, each seeing the prefix and its ancestors only (kernel vs reference vs loops)."""
    B, K, G, H, dtype = 2, 2, 2, 64, "float32"
    kv_lens = np.asarray(prefix) + T
    k_pages, v_pages, block_tables = _paged_inputs(rng, B=B, T=T, N=K * G, K=K, H=H, page_size=page_size,
                                                   kv_lens=kv_lens, dtype=dtype)
    tree = _random_trees(rng, B, T)
    mask = pack_tree_mask(jnp.asarray(tree))
    args = (_normal(rng, (B, T, K * G, H), dtype), k_pages, v_pages, block_tables, jnp.asarray(prefix, jnp.int32),
            jnp.asarray(kv_lens, jnp.int32))
    kw = dict(tree_mask=mask, block_sizes=BLOCKS[blocks])
    expected = fa.paged_reference(*args, **kw)
    _assert_matches(fa.paged_flash_attention(*args, **kw, interpret=INTERPRET), expected, [T] * B, dtype)
    for impl in attention.IMPLEMENTATIONS:  # the model's dispatch point passes the mask on
        out = attention.paged_prefill(args[0], k_pages, v_pages, None, None, block_tables, args[4], jnp.full(B, T),
                                      impl=impl, tree_mask=mask)
        _assert_matches(out, expected, [T] * B, dtype)
    dense = [np.asarray(fa.gather_pages(p, block_tables)) for p in (k_pages, v_pages)]
    naive = _naive(args[0], *dense, np.asarray(prefix), kv_lens, 0, tree)
    assert row_rel_error(expected, naive + 1e-30) <= 1e-5
    plain = fa.paged_reference(*args, block_sizes=BLOCKS[blocks])  # a chain is not a branching tree
    assert not np.allclose(np.asarray(plain), np.asarray(expected), atol=1e-3)


def test_queries_that_see_no_key_get_zeros(rng):
    """kv_lens = 0, or a window that hides everything: zeros, never NaN, in kernel and reference."""
    q = _normal(rng, (2, 16, 2, 64), jnp.float32)
    k = _normal(rng, (2, 16, 1, 64), jnp.float32)
    args = (q, k, k, jnp.array([0, 40], jnp.int32), jnp.array([0, 16], jnp.int32))  # 1: 40 - 15 >= window 20
    for fn in (fa.flash_attention, fa.reference):
        out = np.asarray(fn(*args, window=20, interpret=INTERPRET))
        assert np.array_equal(out, np.zeros_like(out))


def test_interpret_outputs_start_poisoned():
    """The poisoning the tests rely on: interpret mode starts outputs as NaN, not zeros."""
    def writes_nothing(x_ref, o_ref):
        del x_ref, o_ref

    out = pl.pallas_call(
        writes_nothing, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32), interpret=True
    )(jnp.ones((16, 16), jnp.float32))
    assert np.isnan(np.asarray(out)).all()


def test_bad_input_raises_value_error(rng):
    q = _normal(rng, (1, 4, 3, 64), jnp.float32)
    k = _normal(rng, (1, 8, 2, 64), jnp.float32)
    lens = jnp.array([4], jnp.int32)
    with pytest.raises(ValueError, match="N=3"):
        fa.flash_attention(q, k, k, lens, lens, interpret=True)
    pages = _normal(rng, (1, 4, 12, 64), jnp.float32)
    with pytest.raises(ValueError, match="page_size=12"):
        fa.paged_flash_attention(q[:, :, :2], pages, pages, jnp.zeros((1, 2), jnp.int32), lens, lens)
    with pytest.raises(ValueError, match="window"):
        fa.flash_attention(q[:, :, :2], k, k, lens, lens, window=-1)
    with pytest.raises(ValueError, match="tree_mask must be int32"):
        fa.flash_attention(q[:, :, :2], k, k, lens, lens, tree_mask=jnp.zeros((1, 3, 1), jnp.int32))
