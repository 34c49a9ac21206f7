"""Speculative decoding: a drafter proposes k tokens per sequence, one target pass verifies them
all, and the acceptance rule (accept.py) keeps the output distribution exactly the target's.

  ji.EngineConfig(speculative=ji.SpeculativeConfig(method="eagle", num_tokens=5, draft="tiny-eagle"))

Drafters register themselves (config.register_drafter) with what they need; built in:
  ngram      prompt lookup: the tokens that followed the latest earlier occurrence of the
             sequence's last n tokens (ngram.py); no model
  draft      a smaller model with the same vocabulary and its own paged KV cache (draft_model.py)
  medusa     k heads on the target's final hidden state (medusa.py)
  eagle      a one-layer feature-level network: target hidden state + next token -> next hidden
             state, through the target's LM head (eagle.py); a chain of k drafts, or with
             tree=DraftTree(top_k, depth) an EAGLE-2 dynamic tree of k drafts verified in one pass
             (tree.py, accept.accept_tree)
  eagle3     EAGLE-3: the layer reads a fusion of three target layers and its own output, and
             drafts from its own head over a draft vocabulary; checkpoints in the format SGLang
             and vLLM load (eagle3.py); chain or tree as eagle
  synthetic  stand-in tokens accepted with a set probability, to measure the engine's own cost at
             a given acceptance on a model with no trained drafter (not lossless)
The engine side (reserve pages, propose, verify, emit, give back rejected pages) is
jaxinfer/engine/speculation.py.
"""

from __future__ import annotations

import os

from jaxinfer.checkpoints.weights import ASSETS_DIR
from jaxinfer.speculative import draft_model, eagle, eagle3, medusa, ngram, synthetic  # noqa: F401  (they register)
from jaxinfer.speculative.config import (
    DRAFTERS,
    SHIPPED_DRAFTERS,
    DraftContext,
    Drafter,
    DrafterSpec,
    DraftTree,
    Proposal,
    SpeculativeConfig,
    register_drafter,
)


def load_drafter(config: SpeculativeConfig, target, num_pages: int, page_size: int, max_seq_len: int,
                 impl) -> Drafter:
    """The drafter a config names, built through its registry entry and checked against the target
    (a ValueError naming the problem: a missing drafter directory, a vocabulary that differs)."""
    spec, path, name = DRAFTERS[config.method], None, config.draft
    if spec.checkpoint:
        if name in SHIPPED_DRAFTERS and SHIPPED_DRAFTERS[name] != config.method:
            raise ValueError(f"draft={name!r} is a {SHIPPED_DRAFTERS[name]} drafter, not one for "
                             f"method={config.method!r}")
        if name not in SHIPPED_DRAFTERS and not os.path.isdir(name):
            raise ValueError(f"draft={name!r} is neither a directory nor a shipped drafter "
                             f"({', '.join(SHIPPED_DRAFTERS)})")
        path = os.path.join(ASSETS_DIR, name) if name in SHIPPED_DRAFTERS else name
    return spec.build(DraftContext(config, target, path, num_pages, page_size, max_seq_len, impl))


__all__ = ["DRAFTERS", "SHIPPED_DRAFTERS", "DraftContext", "DraftTree", "Drafter", "DrafterSpec", "Proposal",
           "SpeculativeConfig", "load_drafter", "register_drafter"]
