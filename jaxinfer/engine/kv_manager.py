"""The host side of the paged KV cache: which pages each sequence owns.

  PageAllocator  free list, reference counts (shared prefixes, forked samples, copy-on-write)
                 and the prefix cache: a full page is found again by the hash of every token up to
                 and including it; unreferenced cached pages are evicted least recently used first.
  KVManager      a sequence's pages over the allocator: prefix hits at admission, pages for its
                 next tokens (copying a shared page before it is written), pages reserved ahead
                 for multi-step and speculative calls and given back, rollback of rejected tokens,
                 full pages offered to the prefix cache, pages shared by forked samples. The
                 scheduler composes one and decides only who runs (and who is preempted).

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


class KVManager:
    """Pages of sequences (jaxinfer/engine/scheduler.py's Sequence: pages, num_computed, hashes,
    num_registered, cache_salt, tokens) over one PageAllocator."""

    def __init__(self, allocator: PageAllocator):
        self.allocator = allocator
        self.page_size = allocator.page_size

    def pages_for(self, seq, num_tokens: int) -> int:
        """Pages seq must newly allocate to hold num_tokens more tokens."""
        return max(0, -(-(seq.num_computed + num_tokens) // self.page_size) - len(seq.pages))

    def admit(self, seq) -> None:
        """Give a newly (re)admitted sequence the cached pages of its longest cached prefix among its
        `cacheable` leading tokens (never the last: its logits are needed; nor those whose logits
        give prompt log-probabilities still to compute)."""
        page = self.page_size
        seq.hashes = PageAllocator.page_hashes(seq.tokens[: seq.cacheable], page, seq.cache_salt)
        seq.pages = self.allocator.lookup(seq.hashes)
        seq.num_computed = len(seq.pages) * page
        seq.num_registered = len(seq.pages)
        seq.draft_computed = 0  # a drafter recomputes its own cache (pages it shares come out the same)

    def reserve(self, seq, num_tokens: int, copies: list[tuple[int, int]]) -> None:
        """Writable pages for seq's next num_tokens tokens: a shared page they go into is copied
        first (appended to copies), new pages allocated. OutOfPages if they do not fit."""
        idx = seq.num_computed // self.page_size
        if idx < len(seq.pages) and self.allocator.refcount[seq.pages[idx]] > 1:
            (dst,) = self.allocator.allocate(1)
            copies.append((seq.pages[idx], dst))
            self.allocator.free([seq.pages[idx]])
            seq.pages[idx] = dst
        seq.pages += self.allocator.allocate(self.pages_for(seq, num_tokens))

    def reserve_ahead(self, seqs: list, wanted: list[int], ahead: list[int]) -> bool:
        """Pages for a call in which seqs[i], ahead[i] tokens past its num_computed, takes wanted[i]
        steps: all taken from free pages or none, returning whether."""
        counts = [self.pages_for(s, a + w) for s, w, a in zip(seqs, wanted, ahead)]
        if sum(counts) > self.allocator.num_free:
            return False
        for s, n in zip(seqs, counts):
            s.pages += self.allocator.allocate(n)
        return True

    def release_unused(self, seq) -> None:
        """Give back the pages past the one seq's next token goes into (reserved for speculative
        tokens that were rejected)."""
        keep = seq.num_computed // self.page_size + 1
        self.allocator.free(seq.pages[keep:])
        del seq.pages[keep:]

    def advance(self, seq, n: int, register: bool = True) -> None:
        """seq's next n tokens now have their K/V in its pages (register: offer full pages to the
        prefix cache)."""
        seq.num_computed += n
        if register:
            self.register_full_pages(seq)

    def register_full_pages(self, seq) -> None:
        """Offer newly completed pages of seq to the prefix cache."""
        page = self.page_size
        full = seq.num_computed // page
        while len(seq.hashes) < full:  # extend the chained hashes over generated tokens
            prev = seq.hashes[-1] if seq.hashes else seq.cache_salt
            i = len(seq.hashes)
            seq.hashes.append(hash((prev, tuple(seq.tokens[i * page : (i + 1) * page]))))
        for i in range(seq.num_registered, full):
            self.allocator.register(seq.pages[i], seq.hashes[i])
        seq.num_registered = max(seq.num_registered, full)

    def share(self, parent, child) -> None:
        """child holds parent's pages too (copy-on-write before either writes into a shared one)."""
        child.pages = list(parent.pages)
        for p in child.pages:
            self.allocator.incref(p)

    def rollback(self, seq, n: int) -> None:
        """Drop seq's newest n generated tokens (rejected speculative tokens). The newest token
        left becomes its next input: K/V from its position on are forgotten, pages past them come
        back, and a kept page that will be rewritten leaves the prefix cache."""
        if not 0 <= n <= len(seq.generated):
            raise ValueError(f"rollback of {n} tokens, but the sequence has generated {len(seq.generated)}")
        del seq.tokens[len(seq.tokens) - n :]
        seq.num_computed = min(seq.num_computed, len(seq.tokens) - 1)
        seq.draft_computed = min(seq.draft_computed, seq.num_computed)
        page = self.page_size
        keep = -(-seq.num_computed // page)
        self.allocator.free(seq.pages[keep:])
        del seq.pages[keep:]
        full = seq.num_computed // page
        for p in seq.pages[full:]:
            self.allocator.unregister(p)
        del seq.hashes[full:]
        seq.num_registered = min(seq.num_registered, full)

    def forget_own(self, seq) -> list[int]:
        """The pages seq alone holds, taken out of the prefix cache (a failed sequence's: they may
        hold NaN, to be zeroed before reuse)."""
        own = [p for p in seq.pages if self.allocator.refcount[p] == 1]
        for p in own:
            self.allocator.unregister(p)
        return own

    def free(self, seq) -> None:
        """Give back every page of seq (they stay cached where the prefix cache holds them)."""
        self.allocator.free(seq.pages)
        seq.pages = []
