"""Speculative decoding: a drafter proposes k tokens per sequence, one target pass verifies them
all, and the acceptance rule (accept.py) keeps the output distribution exactly the target's.

  ji.EngineConfig(speculative=ji.SpeculativeConfig(method="eagle", num_tokens=5, draft="tiny-eagle"))

Drafters (each proposes tokens for a batch of sequences; see `Drafter`):
  ngram      prompt lookup: the tokens that followed the latest earlier occurrence of the
             sequence's last n tokens (ngram.py); no model
  draft      a smaller model with the same vocabulary and its own paged KV cache (draft_model.py)
  medusa     k heads on the target's final hidden state (medusa.py)
  eagle      a one-layer feature-level network: target hidden state + next token -> next hidden
             state, through the target's LM head (eagle.py); a chain of k drafts, or with
             tree=DraftTree(top_k, depth) an EAGLE-2 dynamic tree of k drafts verified in one pass
             (tree.py, accept.accept_tree)
  synthetic  stand-in tokens accepted with a set probability, to measure the engine's own cost at
             a given acceptance on a model with no trained drafter (not lossless)
The engine side (reserve pages, propose, verify, emit, give back rejected pages) is decoder.py.
"""

from __future__ import annotations

import os

from jaxinfer.checkpoints.weights import ASSETS_DIR, load_model
from jaxinfer.speculative.config import METHODS, SHIPPED_DRAFTERS, Drafter, DraftTree, Proposal, SpeculativeConfig
from jaxinfer.speculative.draft_model import DraftModelDrafter
from jaxinfer.speculative.eagle import EagleDrafter
from jaxinfer.speculative.medusa import MedusaDrafter
from jaxinfer.speculative.ngram import NgramDrafter
from jaxinfer.speculative.synthetic import SyntheticDrafter


def load_drafter(config: SpeculativeConfig, target, num_pages: int, page_size: int, max_seq_len: int,
                 impl) -> Drafter:
    """The drafter a config names, checked against the target (a ValueError naming the problem:
    a missing drafter directory, a vocabulary that differs from the target's)."""
    if config.method == "ngram":
        return NgramDrafter(config.ngram)
    if config.method == "synthetic":
        return SyntheticDrafter()
    name = config.draft
    if name in SHIPPED_DRAFTERS and SHIPPED_DRAFTERS[name] != config.method:
        raise ValueError(f"draft={name!r} is a {SHIPPED_DRAFTERS[name]} drafter, not one for method={config.method!r}")
    if name not in SHIPPED_DRAFTERS and not os.path.isdir(name):
        raise ValueError(f"draft={name!r} is neither a directory nor a shipped drafter ({', '.join(SHIPPED_DRAFTERS)})")
    path = os.path.join(ASSETS_DIR, name) if name in SHIPPED_DRAFTERS else name
    if config.method == "medusa":
        drafter = MedusaDrafter(target, path)
        if config.num_tokens > drafter.num_heads:
            raise ValueError(f"num_tokens={config.num_tokens} is more than the {drafter.num_heads} Medusa heads of "
                             f"draft={name!r}")
        return drafter
    if config.method == "eagle":
        if config.tree is not None and any(target.config.layer_windows):
            raise ValueError("speculative tree= needs a target without sliding windows (tree tokens sit at their "
                             "depth's position but in consecutive slots)")
        return EagleDrafter(target, path, num_pages, page_size, max_seq_len, impl, config.tree)
    draft = load_model(path, dtype=target.dtype)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft={name!r} has a vocabulary of {draft.config.vocab_size} tokens, the target "
                         f"{target.config.vocab_size}: a draft model must share the target's vocabulary")
    return DraftModelDrafter(draft, num_pages, page_size, max_seq_len, impl)


__all__ = ["METHODS", "SHIPPED_DRAFTERS", "DraftTree", "Drafter", "Proposal", "SpeculativeConfig", "load_drafter"]
