"""PageAllocator invariants under random workloads, prefix-cache behaviour, and page copies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxinfer as ji
from jaxinfer.engine.kv_manager import OutOfPages, PageAllocator
from jaxinfer.models.kv_cache import copy_pages

OPS = st.lists(
    st.tuples(st.sampled_from(["new", "grow", "share", "finish"]), st.integers(0, 7), st.integers(1, 5)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, num_pages=st.integers(1, 12), prefix_cache=st.booleans())
def test_allocator_invariants(ops, num_pages, prefix_cache):
    """Requests take, share and return pages at random: no page is owned twice, refcounts equal
    the number of owners and are never negative, and every page comes back at the end."""
    alloc = PageAllocator(num_pages, page_size=4, prefix_cache=prefix_cache)
    owners: dict[int, list[int]] = {}
    next_id = refused = 0
    for op, pick, n in ops:
        ids = sorted(owners)
        try:
            if op == "new":
                tokens = [pick] * (4 * n)  # requests with the same pick share a prefix
                hashes = PageAllocator.page_hashes(tokens, 4)
                pages = alloc.lookup(hashes[: n - 1])
                try:
                    pages += alloc.allocate(n - len(pages))
                except OutOfPages:
                    alloc.free(pages)  # a refused request gives back its prefix hits
                    raise
                owners[next_id] = pages
                for page, h in zip(pages, hashes):
                    alloc.register(page, h)
                next_id += 1
            elif op == "grow" and ids:
                owners[ids[pick % len(ids)]] += alloc.allocate(n)
            elif op == "share" and ids:
                src = owners[ids[pick % len(ids)]]
                for page in src:
                    alloc.incref(page)
                owners[next_id] = list(src)
                next_id += 1
            elif op == "finish" and ids:
                alloc.free(owners.pop(ids[pick % len(ids)]))
        except OutOfPages:
            refused += 1  # a refused request or growth changes nothing
        alloc.check_invariants(owners)
        assert alloc.num_used == len({p for pages in owners.values() for p in pages})
    for rid in list(owners):
        alloc.free(owners.pop(rid))
    alloc.check_invariants(owners)
    assert alloc.num_free == num_pages and alloc.num_used == 0


def test_prefix_cache_lru_eviction():
    alloc = PageAllocator(3, page_size=2)
    a, b = PageAllocator.page_hashes([1, 2, 3, 4], 2)
    pages = alloc.allocate(2)
    alloc.register(pages[0], a)
    alloc.register(pages[1], b)
    alloc.free(pages)  # cached, unreferenced, evictable
    assert alloc.num_free == 3 and alloc.lookup([a, b]) == pages
    alloc.free(pages)
    alloc.allocate(2)  # the free page, then the least recently freed cached page (pages[0])
    assert alloc.lookup([a]) == [] and alloc.lookups == 3 and alloc.hits == 2
    with pytest.raises(OutOfPages):
        alloc.allocate(2)
    with pytest.raises(RuntimeError, match="refcount 0"):
        alloc.free([pages[0]] * 3)


def test_page_hashes_chain_the_whole_prefix():
    h1 = PageAllocator.page_hashes([1, 2, 3, 4, 5], 2)
    h2 = PageAllocator.page_hashes([9, 2, 3, 4], 2)
    assert len(h1) == 2 and h1[1] != h2[1]  # same page tokens, different prefix


def test_copy_pages_copies_every_layer():
    cfg = ji.ModelConfig(num_layers=2, num_kv_heads=2, head_dim=4)
    cache = ji.PagedKVCache.zeros(cfg, num_pages=4, page_size=2)
    k = jax.random.normal(jax.random.key(0), cache.k.shape)
    cache = ji.PagedKVCache(k=k, v=-k)
    out = copy_pages(cache, jnp.array([1]), jnp.array([3]))
    np.testing.assert_array_equal(out.k[:, :, 3], k[:, :, 1])
    np.testing.assert_array_equal(out.v[:, :, 3], -k[:, :, 1])
    np.testing.assert_array_equal(out.k[:, :, :3], k[:, :, :3])
