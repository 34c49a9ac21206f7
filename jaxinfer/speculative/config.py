"""SpeculativeConfig, the interface every drafter implements, and the registry of drafters.

A drafter registers itself by method name with what it needs (`register_drafter`): a checkpoint
named by draft=, the target's feature cache, whether it drafts trees, whether it is lossless. The
config checks against the entry and the engine builds the drafter through it; a new drafter is one
module that registers. (A drafter that samples draws with the target's keys, through
jaxinfer.sampling.sampler.draw, so its drafts carry no distribution: the acceptance rule compares
them with the target's own draws.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

# Shipped drafters for the shipped tiny target (jaxinfer/assets): the draft model and trained heads.
SHIPPED_DRAFTERS = {"tiny-draft": "draft", "tiny-medusa": "medusa", "tiny-eagle": "eagle", "tiny-eagle3": "eagle3"}


class DraftContext(NamedTuple):
    """What building a drafter is given: its config, the target model (as placed), the checkpoint
    directory draft= resolves to (None where the method needs none), the target's paged-cache
    geometry (a drafter with its own cache mirrors the target's pages) and its implementations."""

    config: Any  # SpeculativeConfig
    target: Any  # jaxinfer.checkpoints.model.Model
    path: str | None
    num_pages: int
    page_size: int
    max_seq_len: int
    impl: Any  # jaxinfer.models.decoder.Impl


@dataclasses.dataclass(frozen=True)
class DrafterSpec:
    """A registered drafter. build(ctx) -> Drafter; raises ValueError naming what does not fit."""

    method: str
    build: Callable[[DraftContext], Any]
    checkpoint: bool  # loaded from draft= (a shipped name or a directory)
    features: bool  # reads the target's feature cache (its final-norm hidden state of every token, and the
    # hidden states entering the layers the drafter names in its feature_layers)
    tree: bool = False  # takes tree= (a DraftTree): drafts a tree of candidates
    lossless: bool = True  # False: a stand-in accepted at a set rate (SpeculativeConfig.accept), not lossless
    markers: tuple[str, ...] = ()  # a drafter directory of this method holds one of these files (checked early)


DRAFTERS: dict[str, DrafterSpec] = {}


def register_drafter(method: str, *, checkpoint: bool, features: bool, tree: bool = False, lossless: bool = True,
                     markers: tuple[str, ...] = ()):
    """Decorator: register build(ctx: DraftContext) -> Drafter as the drafter of `method`."""
    def decorate(build):
        DRAFTERS[method] = DrafterSpec(method, build, checkpoint, features, tree, lossless, markers)
        return build

    return decorate


@dataclasses.dataclass(frozen=True)
class DraftTree:
    """An EAGLE-2 style dynamic draft tree (Li et al. 2024, "EAGLE-2"): from the root (the last
    token) the drafter expands, depth - 1 times, the top_k candidates of the newest layer by
    cumulative draft log-probability, each into its top_k next tokens; then the num_tokens
    candidates of highest cumulative log-probability (an ancestor-closed set) are verified in one
    target pass. Candidates: top_k + (depth - 1) * top_k**2, so num_tokens must not exceed that.
    temperature: of the draft's log-probabilities that score candidates (1: EAGLE-2's raw
    confidence). The score stands for the chance the path is accepted; a greedy target accepts a
    drafter's first choice more often than its probability says (tiny-eagle: 0.79 against a mean
    0.54), and temperature scaling fitted to the target's argmax on held-out text corrects that
    (tiny-eagle: 0.4; benchmarks/results/speculative.md). Candidates are the draft's top tokens, not
    samples: lossless at any temperature, but a sampling request accepts each only with the target's
    probability of it, far less often than a chain's sampled drafts on a high-entropy target (tiny at
    T=1: 2.3 against 4.6 tokens per pass). Meant for greedy and low-temperature decoding."""

    top_k: int = 4
    depth: int = 5
    temperature: float = 1.0

    def __post_init__(self):
        for name in ("top_k", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DraftTree {name}={value!r} must be an integer >= 1")
        if not self.temperature > 0:
            raise ValueError(f"DraftTree temperature={self.temperature!r} must be > 0")

    @property
    def num_candidates(self) -> int:
        return self.top_k + (self.depth - 1) * self.top_k**2


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """method: a registered drafter (DRAFTERS: draft, ngram, medusa, eagle, synthetic, and any
    registered since). num_tokens: k, the tokens drafted per target pass (with a tree, the tree's
    draft tokens: the verify pass is k + 1 tokens either way). draft: a shipped drafter name
    (SHIPPED_DRAFTERS), a local directory, or None where the method needs none (ngram, synthetic).
    ngram: the longest suffix prompt lookup matches. accept: None (the lossless rule), or the
    probability with which the verify pass accepts each draft instead: the synthetic drafter's, or,
    with a real drafter (a randomly initialised EAGLE-3 head of a large shape, say), its true
    drafting cost timed at a set acceptance; not lossless. tree: None (a chain of k drafts) or a
    DraftTree (a method that drafts trees)."""

    method: str
    num_tokens: int = 5
    draft: str | None = None
    ngram: int = 3
    accept: float | None = None
    tree: DraftTree | None = None

    def __post_init__(self):
        if self.method not in DRAFTERS:
            raise ValueError(f"speculative method={self.method!r} is not one of {tuple(DRAFTERS)}")
        spec = DRAFTERS[self.method]
        if not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"speculative num_tokens={self.num_tokens!r} must be an integer >= 1")
        if spec.checkpoint and not self.draft:
            raise ValueError(f"speculative method={self.method!r} needs draft= (a shipped name or a directory)")
        if not spec.checkpoint and self.draft:
            raise ValueError(f"speculative method={self.method!r} takes no draft, got draft={self.draft!r}")
        if not spec.lossless and not (self.accept is not None and 0 <= self.accept <= 1):
            raise ValueError(f"speculative method={self.method!r} needs accept in [0, 1], got {self.accept!r}")
        if self.accept is not None and not 0 <= self.accept <= 1:
            raise ValueError(f"speculative accept={self.accept!r} must be in [0, 1]")
        if self.accept is not None and self.tree is not None:
            raise ValueError("speculative accept= (a set acceptance rate) applies to a chain of drafts, not to a tree")
        if self.ngram < 1:
            raise ValueError(f"speculative ngram={self.ngram} must be >= 1")
        if self.tree is not None:
            if not isinstance(self.tree, DraftTree):
                raise ValueError(f"speculative tree is a {type(self.tree).__name__}, not a DraftTree (or None)")
            if not spec.tree:
                trees = [m for m, d in DRAFTERS.items() if d.tree]
                raise ValueError(f"speculative tree= applies to method {' or '.join(map(repr, trees))} only, "
                                 f"not {self.method!r}")
            if self.num_tokens > self.tree.num_candidates:
                raise ValueError(f"speculative num_tokens={self.num_tokens} is more than the {self.tree.num_candidates} "
                                 f"candidates of {self.tree}")

    @property
    def spec(self) -> DrafterSpec:
        return DRAFTERS[self.method]

    def verify_programs(self) -> dict:
        """Which verify programs this config runs (ModelRunner.warmup's keywords): the synthetic
        rate, or a draft tree."""
        return {"synthetic": self.accept, "tree": self.tree is not None}


class Proposal(NamedTuple):
    tokens: np.ndarray | jax.Array  # (R, k) int32 drafted tokens (rows past the batch pad)
    counts: list[int] | None = None  # tokens actually proposed per sequence (n-gram may find fewer)
    parents: jax.Array | None = None  # (R, k) int32 a tree's parent of each draft (0: the root, i: draft i); None: a chain


class Drafter(Protocol):
    # Optional: the layers whose input hidden states (the residual stream entering each, as HF's
    # output_hidden_states gives them) the feature cache keeps too, for a drafter registered with
    # features=True. Each slot's row is then [final-norm hidden, layer l's input for l in order].
    feature_layers: tuple[int, ...]

    def propose(self, seqs: list, num_drafts: list[int], k: int, features: jax.Array | None) -> Proposal:
        """Draft up to num_drafts[i] (<= k) tokens after each sequence's tokens (its last token not
        yet computed by the target). Pages for k + 1 more positions are reserved. features: the
        target's feature cache (num_pages * page_size, D), by KV slot, for drafters that read it."""

    def accepted(self, seqs: list) -> None:
        """The target accepted some drafts and set each sequence's num_computed: the drafter's own
        cache is valid up to min(draft_computed, num_computed)."""

    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of shared pages, in the drafter's own caches."""
