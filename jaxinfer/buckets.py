"""Shape buckets: every jitted program is compiled for sizes rounded up to powers of two, so a run
compiles a handful of programs, not one per request."""

from __future__ import annotations


def next_power_of_2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= n (and >= minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def powers_of_2(n: int) -> list[int]:
    """1, 2, 4, ... up to next_power_of_2(n)."""
    return [1 << i for i in range(next_power_of_2(n).bit_length())]
