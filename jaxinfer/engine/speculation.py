"""Speculative decoding on the engine side: a step whose work is decoding only becomes one
verify pass per running sequence.

For each sequence: k' = min(k, tokens it may still generate - 1) drafts (so max_tokens and the
context are never exceeded), pages reserved for k' + 1 more positions (from free pages only; when
they do not fit, every row drafts nothing and the pass is a plain decode step), the drafter's
proposal, one target pass over [last token, drafts] with the acceptance rule, then the accepted
drafts and the target's own token appended (tokens after a stop are dropped), K/V past the new end
forgotten and the pages past it given back. A draft tree (SpeculativeConfig.tree) is the same
pass over k' + 1 tree tokens; the runner moves the accepted path's K/V into place (tree.py).

Counted: verify calls, target passes (one per sequence per verify), tokens emitted (the bonus token
counted, as EAGLE's papers count it), drafts proposed and accepted (for a tree: the tree's tokens
verified and the accepted path's), and the time spent drafting.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxinfer.buckets import next_power_of_2
from jaxinfer.engine.scheduler import Scheduler, Sequence, Status
from jaxinfer.speculative.config import Proposal, SpeculativeConfig


class SpeculativeDecoder:
    def __init__(self, config: SpeculativeConfig, drafter, scheduler: Scheduler, runner):
        self.config, self.drafter, self.scheduler, self.runner = config, drafter, scheduler, runner
        self.stats = collections.Counter(dict.fromkeys(
            ("spec_calls", "spec_passes", "spec_drafted", "spec_accepted", "spec_emitted", "spec_draft_s"), 0))

    def step(self, decode: list[Sequence], append: Callable[..., bool]) -> list[Sequence]:
        k, n = self.config.num_tokens, len(decode)
        want = [max(0, min(k, s.stop.budget - len(s.generated) - 1)) for s in decode]
        if not self.scheduler.reserve_ahead(decode, [w + 1 for w in want], [0] * n):
            want = [0] * n  # schedule() reserved the one token of a plain decode step
        t0 = time.perf_counter()
        if any(want):
            proposal = self.drafter.propose(decode, want, k, self.runner)
            jax.block_until_ready(proposal.tokens)
        else:
            empty = np.zeros((next_power_of_2(n), k), np.int32)
            proposal = Proposal(empty, parents=None if self.config.tree is None else empty)
        self.stats["spec_draft_s"] += time.perf_counter() - t0
        num = want if proposal.counts is None else [min(w, c) for w, c in zip(want, proposal.counts)]
        accepted, tokens, logprobs = self.runner.verify(decode, proposal.tokens, num, self.config.accept,
                                                        proposal.parents)
        self.stats["spec_calls"] += 1
        self.stats["spec_passes"] += n
        self.stats["spec_drafted"] += sum(num)
        self.stats["spec_accepted"] += int(accepted.sum())

        finished = []
        for i, (seq, a, row) in enumerate(zip(decode, accepted.tolist(), tokens)):
            for j, token in enumerate(row[: a + 1].tolist()):
                self.stats["spec_emitted"] += 1
                if append(seq, token, logprobs[i][j] if logprobs else None):
                    finished.append(seq)
                    break
            if seq.status is Status.RUNNING:
                self.scheduler.advance(seq, 1 + a)  # the last token and the accepted drafts are computed
                self.scheduler.release_unused(seq)
        self.drafter.accepted([s for s in decode if s.status is Status.RUNNING])
        return finished

    def metrics(self) -> dict[str, float]:
        s = self.stats
        return {**{k: float(v) for k, v in s.items()},
                "spec_tokens_per_pass": s["spec_emitted"] / s["spec_passes"] if s["spec_passes"] else 0.0,
                "spec_acceptance_rate": s["spec_accepted"] / s["spec_drafted"] if s["spec_drafted"] else 0.0}
