"""SpeculativeConfig and the interface every drafter implements."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import jax
import numpy as np

METHODS = ("draft", "ngram", "medusa", "eagle", "synthetic")
# Shipped drafters for the shipped tiny target (jaxinfer/assets): the draft model and trained heads.
SHIPPED_DRAFTERS = {"tiny-draft": "draft", "tiny-medusa": "medusa", "tiny-eagle": "eagle"}


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """method: one of METHODS. num_tokens: k, the tokens drafted per target pass. draft: a shipped
    drafter name (SHIPPED_DRAFTERS), a local directory, or None where the method needs none (ngram,
    synthetic). ngram: the longest suffix prompt lookup matches. accept: the synthetic drafter's
    acceptance probability."""

    method: str
    num_tokens: int = 5
    draft: str | None = None
    ngram: int = 3
    accept: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method={self.method!r} is not one of {METHODS}")
        if not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"speculative num_tokens={self.num_tokens!r} must be an integer >= 1")
        if self.method in ("draft", "medusa", "eagle") and not self.draft:
            raise ValueError(f"speculative method={self.method!r} needs draft= (a shipped name or a directory)")
        if self.method in ("ngram", "synthetic") and self.draft:
            raise ValueError(f"speculative method={self.method!r} takes no draft, got draft={self.draft!r}")
        if self.method == "synthetic" and not (self.accept is not None and 0 <= self.accept <= 1):
            raise ValueError(f"speculative method='synthetic' needs accept in [0, 1], got {self.accept!r}")
        if self.method != "synthetic" and self.accept is not None:
            raise ValueError("speculative accept= applies to method='synthetic' only")
        if self.ngram < 1:
            raise ValueError(f"speculative ngram={self.ngram} must be >= 1")


class Proposal(NamedTuple):
    tokens: np.ndarray | jax.Array  # (R, k) int32 drafted tokens (rows past the batch pad)
    probs: jax.Array | None  # (R, k, V) the distribution each was drawn from; None: deterministic
    counts: list[int] | None = None  # tokens actually proposed per sequence (n-gram may find fewer)


class Drafter(Protocol):
    features: bool  # reads the runner's feature cache (the target's hidden state of every token)

    def propose(self, seqs: list, num_drafts: list[int], k: int, runner) -> Proposal:
        """Draft up to num_drafts[i] (<= k) tokens after each sequence's tokens (its last token not
        yet computed by the target). Pages for k + 1 more positions are reserved."""

    def accepted(self, seqs: list) -> None:
        """The target accepted some drafts and set each sequence's num_computed: the drafter's own
        cache is valid up to min(draft_computed, num_computed)."""

    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of shared pages, in the drafter's own caches."""
