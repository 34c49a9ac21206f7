"""The requests an engine holds and what happens to their sequences as tokens arrive.

RequestTable remembers requests by id (their sequences, n samples each, and deadlines) and renders
the outputs a step hands back: the requests that finished, and those that got tokens and run on
(for step() callers and streams). SequenceEvents is the step contract's one update
(jaxinfer/engine/step.py): `apply` takes a step output and, row by row, records the prompt
log-probabilities it brings, advances each sequence over its computed tokens and appends its sampled ones (finishing it at a stop, failing it on non-finite
logits; with structured output, advancing its grammar matcher and finishing it when the grammar is
complete), forks a request's other samples (and their matchers) once its prompt is in the cache, and gives back pages
reserved past a sequence's end; `end` and `expire` finish requests (aborted, timed out).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import logging
import time

from jaxinfer.engine.requests import RequestOutput, StopRules, request_output, sequence_output
from jaxinfer.engine.scheduler import Scheduler, Sequence, Status
from jaxinfer.engine.step import StepOutput
from jaxinfer.sampling.params import SamplingParams
from jaxinfer.sampling.sampler import NONFINITE, Logprob

log = logging.getLogger("jaxinfer")


@dataclasses.dataclass(eq=False)
class Request:
    request_id: int
    prompt: list[int]
    sampling: SamplingParams
    sequences: list[Sequence]

    @property
    def done(self) -> bool:
        """Every sample has finished (a parent that ends before its first token forks no samples)."""
        seqs = self.sequences
        return (all(s.status is Status.FINISHED for s in seqs)
                and (len(seqs) == self.sampling.n or not seqs[0].generated))


def sample_seed(seed: int, index: int) -> int:
    """Seed of a request's index-th sample; sample 0 uses the request's own seed."""
    return seed if index == 0 else hash((seed, index)) & 0x7FFFFFFF


class RequestTable:
    def __init__(self, rules: StopRules):
        self.rules = rules
        self.live: dict[int, Request] = {}  # requests not yet returned finished
        self.touched: set[int] = set()  # requests that got tokens in this step
        self.streams: dict[int, collections.deque] = {}  # request id -> outputs not yet yielded by a stream
        self._deadlines: list[tuple[float, int]] = []  # heap of (deadline, request id)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self.live

    def __getitem__(self, request_id: int) -> Request:
        return self.live[request_id]

    def add(self, req: Request, deadline: float | None) -> None:
        self.live[req.request_id] = req
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, req.request_id))

    def expired(self, now: float) -> list[Request]:
        """The live requests whose deadline is <= now (each returned once)."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid = heapq.heappop(self._deadlines)
            if rid in self.live:
                out.append(self.live[rid])
        return out

    def outputs(self, finished: list[Sequence], partial: bool) -> list[RequestOutput]:
        """The outputs of a step: the requests that finished, and (partial, or for a stream) those
        that got tokens and run on; streamed ones are queued for their stream too."""
        outs = self.collect(finished)
        touched, self.touched = self.touched - {o.request_id for o in outs}, set()
        outs += [self.output(self.live[rid]) for rid in touched
                 if rid in self.live and (partial or rid in self.streams)]
        return self.emit(sorted(outs, key=lambda o: o.request_id))

    def emit(self, outs: list[RequestOutput]) -> list[RequestOutput]:
        for o in outs:
            if o.request_id in self.streams:
                self.streams[o.request_id].append(o)
        return outs

    def collect(self, finished: list[Sequence]) -> list[RequestOutput]:
        """The outputs of the requests that these sequences' finishing completed (forgotten now)."""
        outs = []
        for rid in dict.fromkeys(s.request_id for s in finished):
            req = self.live[rid]
            if req.done:
                del self.live[rid]
                outs.append(self.output(req))
        return outs

    def output(self, req: Request) -> RequestOutput:
        """A request's output: finished (with all n samples), or so far (finished False)."""
        samples = [sequence_output(req.prompt, s, self.rules, req.request_id)
                   for s in sorted(req.sequences, key=lambda s: s.sample_index)]
        return request_output(samples, req.done, req.sampling.n)


class SequenceEvents:
    """How step outputs and ends change an engine's sequences; the pages of a finished sequence go
    back through the scheduler."""

    def __init__(self, requests: RequestTable, scheduler: Scheduler, runner):
        self.requests, self.scheduler, self.runner = requests, scheduler, runner

    def apply(self, output: StepOutput) -> list[Sequence]:
        """The update of one step: for each row, in order, advance its sequence over the inputs
        before its first sampled token, then per sampled token advance over its input and append
        it, until the sequence ends. A row that ended while its step ran (aborted, timed out) is
        skipped. Returns the sequences that finished."""
        finished = []
        for row in output.rows:
            seq = row.seq
            if seq.status is not Status.RUNNING:
                continue
            for position, logprob in row.prompt_logprobs:
                seq.prompt_logprobs[position] = logprob
                seq.prompt_logprobs_from = max(seq.prompt_logprobs_from, position + 1)
            lead = row.computed - len(row.tokens)
            if lead:
                self.scheduler.advance(seq, lead)
            children = []
            for token, logprob in zip(row.tokens, row.logprobs or [None] * len(row.tokens)):
                self.scheduler.advance(seq, 1)
                if row.forks and not children:
                    children = self._fork(seq)  # the prompt is in the cache; its first tokens follow
                row.appended += 1
                if self.append(seq, token, logprob):
                    finished.append(seq)
                    break
            finished += [child for child, token, logprob in zip(children, row.forks, row.fork_logprobs or
                                                                 [None] * len(row.forks))
                         if self.append(child, token, logprob)]
            if row.release and seq.status is Status.RUNNING:
                self.scheduler.kv.release_unused(seq)
        return finished

    def append(self, seq: Sequence, token: int, logprob: Logprob | None = None) -> bool:
        """Append a sampled token (and its Logprob, when the request asked) to a running sequence;
        finish it if it stops (or fail it if the token is NONFINITE). True if it finished."""
        now = time.perf_counter()
        self.requests.touched.add(seq.request_id)
        if token == NONFINITE:
            seq.finish_time = now
            self.fail(seq, f"non-finite logits (NaN or Inf) at generated token {len(seq.generated)} "
                           f"(the request's step {len(seq.generated)})")
            return True
        seq.tokens.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        seq.first_token_time = seq.first_token_time or now
        if seq.grammar is not None and not seq.grammar.advance(token):
            seq.finish_time = now
            self.fail(seq, f"token {token} is outside the structured output's grammar (SamplingParams.structured; "
                           f"bad_token_ids or stop_token_ids may have banned every allowed token): {seq.grammar.error}")
            return True
        reason = seq.stop(seq.generated)
        if seq.grammar is not None and seq.grammar.complete and reason != "stop":
            reason = "stop"  # the constraint is complete: nothing but end-of-sequence could follow
        if reason is not None:
            seq.finish_time = now
            self.scheduler.finish(seq, reason)
        return reason is not None

    def fail(self, seq: Sequence, error: str) -> None:
        """Finish a sequence with "error": the pages it alone holds leave the prefix cache and are
        zeroed on the device (they may hold NaN), then come back."""
        log.warning("request %d failed: %s", seq.request_id, error)
        own = self.scheduler.kv.forget_own(seq)
        if own:
            self.runner.clear_pages(own)
        seq.error = error
        self.scheduler.finish(seq, "error")

    def end(self, req: Request, reason: str) -> None:
        """Finish every unfinished sequence of a request now; its pages come back."""
        now = time.perf_counter()
        for seq in req.sequences:
            if seq.status is not Status.FINISHED:
                seq.finish_time = now
                self.scheduler.finish(seq, reason)

    def expire(self) -> list[Sequence]:
        """End the requests whose deadline has passed ("timeout"); returns their sequences."""
        ended = self.requests.expired(time.perf_counter())
        for req in ended:
            self.end(req, "timeout")
        return [req.sequences[0] for req in ended]

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The other samples of a request (n > 1 sampling), sharing the parent's pages once its
        prompt is computed in them, before its first token."""
        req = self.requests[parent.request_id]
        children = [dataclasses.replace(parent, sample_index=i, tokens=list(parent.tokens), pages=[], logprobs=[],
                                        hashes=list(parent.hashes), seed=sample_seed(parent.seed, i),
                                        stop=self.requests.rules.checker(parent.sampling, parent.stop.room),
                                        grammar=None if parent.grammar is None else parent.grammar.fork())
                    for i in range(1, parent.sampling.n)]
        self.scheduler.fork(parent, children)
        req.sequences += children
        return children
