"""A stand-in drafter for measuring the engine at a set acceptance rate on a model with no trained
drafter (e.g. random weights of the Llama-3-8B shape): it proposes placeholder tokens and the
verify pass accepts each with probability `SpeculativeConfig.accept` (accept.accept_synthetic),
emitting the target's own argmax. The cost of drafting is not modelled (it drafts for free), so the
measured speedup is the engine's ceiling at that acceptance. Not lossless."""

from __future__ import annotations

import numpy as np

from jaxinfer.buckets import next_power_of_2
from jaxinfer.speculative.config import DraftContext, Proposal, register_drafter


class SyntheticDrafter:
    def propose(self, seqs, num_drafts, k, features) -> Proposal:
        return Proposal(np.zeros((next_power_of_2(len(seqs)), k), np.int32))

    def accepted(self, seqs) -> None:
        pass

    def copy_pages(self, copies) -> None:
        pass


@register_drafter("synthetic", checkpoint=False, features=False, lossless=False)
def build(ctx: DraftContext) -> SyntheticDrafter:
    return SyntheticDrafter()
