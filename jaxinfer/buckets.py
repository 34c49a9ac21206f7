"""Shape buckets: every jitted program is compiled for sizes rounded up to powers of two, so a run
compiles a handful of programs, not one per request."""

from __future__ import annotations


def next_power_of_2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= n (and >= minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def powers_of_2(n: int) -> list[int]:
    """1, 2, 4, ... up to next_power_of_2(n)."""
    return [1 << i for i in range(next_power_of_2(n).bit_length())]


MIN_CHUNK = 16  # the smallest prefill chunk bucket
MIN_PAGES = 4  # the smallest block-table width bucket


def min_pages(page_size: int, max_seq_len: int) -> int:
    """The narrowest block table: MIN_PAGES, or fewer where a whole sequence needs fewer pages."""
    return min(MIN_PAGES, -(-max_seq_len // page_size))


def pages_bucket(pages: int, page_size: int, max_seq_len: int) -> int:
    """The block-table width (pages per sequence) of a program whose longest sequence holds `pages`."""
    return next_power_of_2(pages, min_pages(page_size, max_seq_len))
