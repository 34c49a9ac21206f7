"""Prompt lookup (n-gram) drafting: no model. The sequence's last n tokens (n from `max_n` down
to 1) are looked up in its own earlier tokens, prompt included; the tokens that followed the
latest earlier occurrence are the drafts. Deterministic (q one-hot), on the host."""

from __future__ import annotations

import numpy as np

from jaxinfer.buckets import next_power_of_2
from jaxinfer.speculative.config import DraftContext, Proposal, register_drafter


def lookup(tokens: list[int], max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix (<= max_n)."""
    for n in range(min(max_n, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest occurrence first, not the suffix itself
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


class NgramDrafter:
    def __init__(self, max_n: int):
        self.max_n = max_n

    def propose(self, seqs, num_drafts, k, features) -> Proposal:
        R = next_power_of_2(len(seqs))
        tokens = np.zeros((R, k), np.int32)
        counts = []
        for i, (s, want) in enumerate(zip(seqs, num_drafts)):
            found = lookup(s.tokens, self.max_n, want) if want else []
            tokens[i, : len(found)] = found
            counts.append(len(found))
        return Proposal(tokens, counts)

    def accepted(self, seqs) -> None:
        pass

    def copy_pages(self, copies) -> None:
        pass


@register_drafter("ngram", checkpoint=False, features=False)
def build(ctx: DraftContext) -> NgramDrafter:
    return NgramDrafter(ctx.config.ngram)
