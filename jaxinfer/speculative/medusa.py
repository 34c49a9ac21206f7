"""Medusa drafting: k heads read the target's hidden state at each sequence's last computed
position (from the runner's feature cache) and guess the next k tokens at once, each drawn from
its head's logits as the target will draw the token of that index (draft_model.draft_token).
No cache of its own: nothing to catch up or roll back."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import sharding
from jaxinfer.buckets import next_power_of_2
from jaxinfer.sampling.processors import Vocab
from jaxinfer.sampling.sampler import SamplingBatch
from jaxinfer.speculative.config import DraftContext, Proposal, register_drafter
from jaxinfer.speculative.draft_model import draft_token
from jaxinfer.speculative.heads import CONFIG_FILE, load_heads, medusa_logits, with_draft_head


@functools.partial(jax.jit, static_argnames=("cfg", "k"))
def _propose(target_params, cfg, heads, features, slots, sp, steps, *, k):
    """slots (R,): where each row's last computed hidden state sits -> drafts (R, k)."""
    logits = medusa_logits(target_params, cfg, {**heads, "w": heads["w"][:k], "b": heads["b"][:k]},
                           features[slots])  # (R, k, V)
    drafted = jnp.full((logits.shape[0], k), -1, jnp.int32)
    for j in range(k):
        _, drafted = draft_token(logits[:, j], sp, steps, j, drafted)
    return drafted


class MedusaDrafter:
    def __init__(self, target, path: str, page_size: int):
        self.target, self.page_size, self.vocab = target, page_size, Vocab.of(target)
        heads, meta = load_heads(path, "medusa", sharding.logical_config(target), target.dtype)
        self.heads = with_draft_head(target.params, target.config, heads)
        self.num_heads = int(self.heads["w"].shape[0])

    def propose(self, seqs, num_drafts, k, features) -> Proposal:
        R, page = next_power_of_2(len(seqs)), self.page_size
        slots, steps = np.zeros(R, np.int32), np.zeros(R, np.int32)
        for i, s in enumerate(seqs):
            p = s.num_computed - 1
            slots[i], steps[i] = s.pages[p // page] * page + p % page, len(s.generated)
        drafts = _propose(self.target.params, self.target.config, self.heads, features, slots,
                          SamplingBatch.from_rows(seqs, R, self.vocab), steps, k=k)
        return Proposal(drafts)

    def accepted(self, seqs) -> None:
        pass

    def copy_pages(self, copies) -> None:
        pass


@register_drafter("medusa", checkpoint=True, features=True, markers=(CONFIG_FILE,))
def build(ctx: DraftContext) -> MedusaDrafter:
    drafter = MedusaDrafter(ctx.target, ctx.path, ctx.page_size)
    if ctx.config.num_tokens > drafter.num_heads:
        raise ValueError(f"num_tokens={ctx.config.num_tokens} is more than the {drafter.num_heads} Medusa heads of "
                         f"draft={ctx.config.draft!r}")
    return drafter
