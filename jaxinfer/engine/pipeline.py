"""Decode calls: a step whose work is decoding only runs up to `decode_steps` decode steps per row
in one program, and with `overlap` the next call is dispatched before the last one's tokens are
read back, so the device does not wait on the host between calls.

A call with a row whose logits processors are filled late (the grammar of structured output;
processors.Processor.late) takes one step, run by the runner as the forward pass and then the draw:
a look-ahead call's draw waits until the last call's tokens are read and applied.

Both are properties of the plan (StepPlan.num_steps, .ahead, .inputs; jaxinfer/engine/step.py):
`extend` turns a decode-only plan into a multi-step call; `look_ahead` plans the call after a
dispatched one when the next step is sure to decode the same sequences. Tokens past a sequence's
stop are dropped by the update, so outputs equal single-step decoding; pages for the extra steps
come from free pages only (no preemption), reserved through the scheduler.
"""

from __future__ import annotations

from jaxinfer.engine.scheduler import Scheduler, Sequence
from jaxinfer.engine.step import StepPlan
from jaxinfer.sampling import processors


class DecodeCalls:
    def __init__(self, scheduler: Scheduler, decode_steps: int):
        self.scheduler, self.decode_steps = scheduler, decode_steps
        self.lookahead_calls = 0

    def wanted(self, seqs: list[Sequence], ahead: list[int]) -> list[int]:
        """Decode steps each sequence can still take in one call, `ahead` tokens past the host's view
        (one for a sequence whose logits processors run single-step; one for every sequence of a
        call with a row whose processors are filled late, as that call runs one step split in two)."""
        most = 1 if any(processors.is_late(s.sampling) for s in seqs) else self.decode_steps
        return [max(0, min(most if processors.may_multi_step(s.sampling) else 1,
                           s.stop.budget - len(s.generated) - a)) for s, a in zip(seqs, ahead)]

    def extend(self, plan: StepPlan) -> StepPlan:
        """A decode-only plan as one call of up to decode_steps steps per row (schedule() reserved
        one token each; the rest come from free pages, or every row takes one step)."""
        ahead = [0] * len(plan.decode)
        wanted = self.wanted(plan.decode, ahead)
        if not self.scheduler.kv.reserve_ahead(plan.decode, wanted, ahead):
            wanted = [1] * len(plan.decode)
        plan.num_steps, plan.ahead = wanted, ahead
        return plan

    def look_ahead(self, last: StepPlan) -> StepPlan | None:
        """The call after `last` (dispatched, not read back), when the next step is sure to decode
        the same sequences: nothing waits that a free slot would admit, and free pages cover every
        row. Rows whose sequence stops inside `last` are wasted work, dropped when read. Its input
        tokens (plan.inputs) are `last`'s newest, which the caller takes from the device."""
        sched = self.scheduler
        if sched.waiting and len(sched.running) < sched.max_batch and sched.policy == "continuous":
            return None
        if {id(s) for s in sched.running} != {id(s) for s in last.decode}:
            return None
        if not all(processors.may_overlap(s.sampling) for s in last.decode):
            return None  # a processor needs every earlier token of its row on the host
        wanted = self.wanted(last.decode, last.num_steps)
        if not any(wanted) or not sched.kv.reserve_ahead(last.decode, wanted, last.num_steps):
            return None
        self.lookahead_calls += 1
        return StepPlan(decode=list(last.decode), prefill=[], num_steps=wanted, ahead=list(last.num_steps))
