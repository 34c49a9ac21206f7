"""What an engine counts as it runs, and the run-level figures built from it: steps, preemptions,
peak batch, host time, and after each step the pages in use and the KV slots reserved against the
tokens they hold (kv_waste: the share of reserved slots that held no token)."""

from __future__ import annotations

import collections

import numpy as np

from jaxinfer.engine.kv_manager import PageAllocator


class EngineMeter:
    def __init__(self, allocator: PageAllocator):
        self.allocator = allocator
        self.counts: collections.Counter = collections.Counter()  # steps, preemptions, peak_running, host_s
        self.pages_in_use: list[int] = []  # after each step
        self.kv_usage: list[tuple[int, int]] = []  # after each step: (slots reserved, tokens held)

    def scheduled(self, preempted: int, running: int) -> None:
        self.counts["preemptions"] += preempted
        self.counts["peak_running"] = max(self.counts["peak_running"], running)

    def stepped(self, tokens_held: int, host_s: float) -> None:
        """After a step: tokens_held by running sequences; host_s, its time outside blocking reads."""
        a = self.allocator
        self.pages_in_use.append(a.num_used)
        self.kv_usage.append((a.num_used * a.page_size, tokens_held))
        self.counts["steps"] += 1
        self.counts["host_s"] += host_s

    def metrics(self, stats: collections.Counter, compiled_programs: int) -> dict[str, float]:
        """Run-level figures: the counters in stats (this meter's merged with the runner's), page
        use, kv_waste, the prefix cache's hit rate and the programs compiled."""
        a, pages = self.allocator, self.pages_in_use or [0]
        reserved = sum(r for r, _ in self.kv_usage)
        held = sum(min(r, h) for r, h in self.kv_usage)
        return {
            **{k: float(v) for k, v in stats.items()},
            "pages_in_use_mean": float(np.mean(pages)),
            "pages_in_use_max": float(max(pages)),
            "num_pages": float(a.num_pages),
            "kv_waste": 1.0 - held / reserved if reserved else 0.0,
            "prefix_cache_hit_rate": a.hits / a.lookups if a.lookups else 0.0,
            "compiled_programs": float(compiled_programs),
        }
