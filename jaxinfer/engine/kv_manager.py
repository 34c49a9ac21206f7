"""The host side of the paged KV cache: which pages each sequence owns.

  PageAllocator  free list, reference counts (shared prefixes, forked samples, copy-on-write)
                 and the prefix cache: a full page is found again by the hash of every token up to
                 and including it; unreferenced cached pages are evicted least recently used first.

Plain Python, no tracing. The device side (the page pytree and its copies) is
jaxinfer/models/kv_cache.py.
"""

from __future__ import annotations

import collections
from typing import Iterable, Sequence


class OutOfPages(RuntimeError):
    """No free or evictable page is left."""


class PageAllocator:
    """Hands out physical pages; tracks reference counts and the prefix cache.

    A page is in exactly one of three states: free (on the free list), referenced (refcount > 0),
    or cached and unreferenced (refcount 0, hashed, evictable in LRU order).
    """

    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages={num_pages} and page_size={page_size} must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_cache = prefix_cache
        self._free: collections.deque[int] = collections.deque(range(num_pages))
        self.refcount = [0] * num_pages
        self._page_hash: dict[int, int] = {}  # page -> hash of the tokens up to its end
        self._hash_page: dict[int, int] = {}  # hash -> page
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self.hits = 0
        self.lookups = 0

    @property
    def num_free(self) -> int:
        """Pages that an allocation can take now (free, or cached and unreferenced)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    def allocate(self, n: int = 1) -> list[int]:
        if n > self.num_free:
            raise OutOfPages(f"{n} pages asked for, {self.num_free} free")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._hash_page[self._page_hash.pop(page)]
            self.refcount[page] = 1
            pages.append(page)
        return pages

    def incref(self, page: int) -> None:
        if self.refcount[page] == 0:
            self._evictable.pop(page)  # a cached page comes back into use
        self.refcount[page] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference to each page; unreferenced pages go back (or stay cached)."""
        for page in pages:
            if self.refcount[page] <= 0:
                raise RuntimeError(f"page {page} freed with refcount {self.refcount[page]}")
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                if page in self._page_hash:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    # Prefix cache ------------------------------------------------------------------------------

    @staticmethod
    def page_hashes(tokens: Sequence[int], page_size: int, salt: int = 0) -> list[int]:
        """Chained hash of every full page of tokens: hash i covers tokens[: (i + 1) * page_size].
        The chain starts from `salt`: pages computed under different LoRA adapters never match."""
        hashes, h = [], salt
        for start in range(0, len(tokens) - page_size + 1, page_size):
            h = hash((h, tuple(tokens[start : start + page_size])))
            hashes.append(h)
        return hashes

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """The longest run of cached pages matching hashes from the start; each gets a reference."""
        if not self.prefix_cache:
            return []
        pages = []
        for h in hashes:
            self.lookups += 1
            page = self._hash_page.get(h)
            if page is None:
                break
            self.hits += 1
            self.incref(page)
            pages.append(page)
        return pages

    def register(self, page: int, h: int) -> None:
        """Record that a full, referenced page holds the tokens whose chained hash is h."""
        if not self.prefix_cache or page in self._page_hash or h in self._hash_page:
            return
        self._page_hash[page] = h
        self._hash_page[h] = page

    def unregister(self, page: int) -> None:
        """Forget a referenced page's prefix-cache entry (its owner is about to rewrite it). A page
        another sequence also holds keeps its entry: its owner copies it before writing."""
        if page in self._page_hash and self.refcount[page] == 1:
            del self._hash_page[self._page_hash.pop(page)]

    def check_invariants(self, owners: dict[int, Sequence[int]] | None = None) -> None:
        """Every page is in exactly one state; with owners (request -> pages), refcounts match."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not free & evictable, "a page is both free and cached"
        for page in range(self.num_pages):
            rc = self.refcount[page]
            assert rc >= 0, f"page {page} has refcount {rc}"
            states = (page in free) + (page in evictable) + (rc > 0)
            assert states == 1, f"page {page} is in {states} states"
            assert (page in evictable) <= (page in self._page_hash)
        assert all(self._hash_page[h] == p for p, h in self._page_hash.items())
        if owners is not None:
            counts = collections.Counter(p for pages in owners.values() for p in pages)
            for page in range(self.num_pages):
                assert counts[page] == self.refcount[page], f"page {page}: {counts[page]} owners, refcount {self.refcount[page]}"
