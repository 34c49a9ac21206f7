"""Speculative decoding on the engine side: a step whose work is decoding only becomes one verify
pass per running sequence (StepPlan.proposal; jaxinfer/engine/step.py).

For each sequence: k' = min(k, tokens it may still generate - 1) drafts (so max_tokens and the
context are never exceeded), pages reserved for k' + 1 more positions (from free pages only; when
they do not fit, every row drafts nothing and the pass is a plain decode step), and the drafter's
proposal. The runner runs one target pass over [last token, drafts] with the acceptance rule; the
step's update appends the accepted drafts and the target's own token (tokens after a stop are
dropped), and gives back the pages past the new end. A draft tree (SpeculativeConfig.tree) is the
same pass over k' + 1 tree tokens; the runner moves the accepted path's K/V into place (tree.py).

Counted: verify calls, target passes (one per sequence per verify), tokens emitted (the bonus token
counted, as EAGLE's papers count it), drafts proposed and accepted (for a tree: the tree's tokens
verified and the accepted path's), and the time spent drafting.
"""

from __future__ import annotations

import collections
import time

import jax
import numpy as np

from jaxinfer.buckets import next_power_of_2
from jaxinfer.engine.scheduler import Scheduler, Status
from jaxinfer.engine.step import StepOutput, StepPlan
from jaxinfer.speculative.config import Proposal, SpeculativeConfig


class Speculation:
    def __init__(self, config: SpeculativeConfig, drafter, scheduler: Scheduler):
        self.config, self.drafter, self.scheduler = config, drafter, scheduler
        self.stats = collections.Counter(dict.fromkeys(
            ("spec_calls", "spec_passes", "spec_drafted", "spec_accepted", "spec_emitted", "spec_draft_s"), 0))

    def extend(self, plan: StepPlan, features) -> StepPlan:
        """A decode-only plan as a verify pass: pages reserved and drafts proposed for each row.
        features: the runner's feature cache, for drafters that read it."""
        k, decode = self.config.num_tokens, plan.decode
        n = len(decode)
        want = [max(0, min(k, s.stop.budget - len(s.generated) - 1)) for s in decode]
        if not self.scheduler.kv.reserve_ahead(decode, [w + 1 for w in want], [0] * n):
            want = [0] * n  # schedule() reserved the one token of a plain decode step
        t0 = time.perf_counter()
        if any(want):
            proposal = self.drafter.propose(decode, want, k, features)
            jax.block_until_ready(proposal.tokens)
        else:
            empty = np.zeros((next_power_of_2(n), k), np.int32)
            proposal = Proposal(empty, parents=None if self.config.tree is None else empty)
        self.stats["spec_draft_s"] += time.perf_counter() - t0
        plan.proposal = proposal
        plan.num_drafts = want if proposal.counts is None else [min(w, c) for w, c in zip(want, proposal.counts)]
        plan.accept = self.config.accept
        return plan

    def applied(self, plan: StepPlan, output: StepOutput) -> None:
        """After the update: count the pass, and tell the drafter what the target kept."""
        self.stats["spec_calls"] += 1
        self.stats["spec_passes"] += len(plan.decode)
        self.stats["spec_drafted"] += sum(plan.num_drafts)
        self.stats["spec_accepted"] += int(output.accepted.sum())
        self.stats["spec_emitted"] += sum(row.appended for row in output.rows)
        self.drafter.accepted([s for s in plan.decode if s.status is Status.RUNNING])

    def metrics(self) -> dict[str, float]:
        s = self.stats
        return {**{k: float(v) for k, v in s.items()},
                "spec_tokens_per_pass": s["spec_emitted"] / s["spec_passes"] if s["spec_passes"] else 0.0,
                "spec_acceptance_rate": s["spec_accepted"] / s["spec_drafted"] if s["spec_drafted"] else 0.0}
