"""Decode calls: up to `decode_steps` decode steps in one device call, and with `overlap`, the next
call dispatched before the last one's tokens are read back, so the device does not wait on the
host between calls.

The pipeline holds at most one call in flight. `start` dispatches a call for a step that has only
decode work; `collect` reads the call in flight back, dispatching its successor first when the
next step is sure to decode the same sequences (the look-ahead). Tokens past a sequence's stop are
dropped when read, so outputs equal single-step decoding; pages for the extra steps come from free
pages only (no preemption), reserved through the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxinfer.engine.runner import DecodeCall
from jaxinfer.engine.scheduler import Scheduler, Sequence, Status
from jaxinfer.sampling import processors

# append(seq, token, logprob) -> True if the sequence finished with that token.
Append = Callable[..., bool]


class DecodePipeline:
    def __init__(self, scheduler: Scheduler, runner, decode_steps: int, overlap: bool):
        self.scheduler, self.runner = scheduler, runner
        self.decode_steps, self.overlap = decode_steps, overlap
        self.in_flight: DecodeCall | None = None  # dispatched and not yet read back
        self.lookahead_calls = 0

    def wanted(self, seqs: list[Sequence], ahead: list[int]) -> list[int]:
        """Decode steps each sequence can still take in one call, `ahead` tokens past the host's view
        (one for a sequence whose logits processors run single-step)."""
        return [max(0, min(self.decode_steps if processors.may_multi_step(s.sampling) else 1,
                           s.stop.budget - len(s.generated) - a)) for s, a in zip(seqs, ahead)]

    def start(self, decode: list[Sequence], append: Append) -> list[Sequence]:
        """Dispatch a decode call for these sequences (schedule() reserved one token each). With
        overlap it is left in flight; otherwise it is read back now. Returns the finished ones."""
        ahead = [0] * len(decode)
        wanted = self.wanted(decode, ahead)
        if not self.scheduler.reserve_ahead(decode, wanted, ahead):
            wanted = [1] * len(decode)
        call = self.runner.decode(decode, wanted, ahead)
        if self.overlap:
            self.in_flight = call
            return []
        return self._finish(call, append)

    def collect(self, append: Append) -> list[Sequence]:
        """Read the call in flight back (after dispatching the look-ahead, when it is sure to be
        needed); returns the sequences that finished."""
        call, self.in_flight = self.in_flight, None
        if self.overlap:
            self.in_flight = self._look_ahead(call)
        return self._finish(call, append)

    def _look_ahead(self, call: DecodeCall) -> DecodeCall | None:
        """The call after `call`, when the next step is sure to decode the same sequences: nothing
        waits that a free slot would admit, and free pages cover every row. Rows whose sequence
        stops inside `call` are wasted work, dropped when read."""
        sched = self.scheduler
        if sched.waiting and len(sched.running) < sched.max_batch and sched.policy == "continuous":
            return None
        if {id(s) for s in sched.running} != {id(s) for s in call.seqs}:
            return None
        if not all(processors.may_overlap(s.sampling) for s in call.seqs):
            return None  # a processor needs every earlier token on the host
        wanted = self.wanted(call.seqs, call.wanted)
        if not any(wanted) or not sched.reserve_ahead(call.seqs, wanted, call.wanted):
            return None
        self.lookahead_calls += 1
        return self.runner.decode(call.seqs, wanted, call.wanted, self.runner.newest(call))

    def _finish(self, call: DecodeCall, append: Append) -> list[Sequence]:
        """Read a call back and advance its sequences (skipping those already finished)."""
        new_tokens, logprobs = self.runner.read(call)  # (k, R)
        finished = []
        for i, (s, w) in enumerate(zip(call.seqs, call.wanted)):
            for j in range(w if s.status is Status.RUNNING else 0):
                self.scheduler.advance(s, 1)
                if append(s, int(new_tokens[j, i]), logprobs[j][i] if logprobs else None):
                    finished.append(s)
                    break
        return finished


def run_mixed(plan, runner, scheduler: Scheduler, append: Append,
              fork: Callable[[Sequence, int], list[Sequence]]) -> list[Sequence]:
    """One mixed step (decode rows and prompt chunks) read back now. Sequences that finish their
    prompt sample a token (n > 1: fork(seq, chunk) adds the other samples, which sample too).
    Returns the sequences that finished."""
    samplers = list(enumerate(plan.decode))
    for j, (seq, n) in enumerate(plan.prefill):
        if seq.num_computed + n == len(seq.tokens):
            samplers.append((len(plan.decode) + j, seq))
            if not seq.generated and seq.sample_index == 0 and seq.sampling.n > 1:
                samplers += [(len(plan.decode) + j, child) for child in fork(seq, n)]
    out = runner.step(plan.decode, plan.prefill, samplers)
    for seq in plan.decode:
        scheduler.advance(seq, 1)
    for seq, n in plan.prefill:
        scheduler.advance(seq, n)
    logprobs = out.logprobs or [None] * len(samplers)
    return [seq for (_, seq), tok, lp in zip(samplers, out.tokens.tolist(), logprobs) if append(seq, tok, lp)]
