"""The requests an engine holds, by id: their sequences (n samples each), their deadlines, and the
outputs a step hands back: the requests that finished, and those that got tokens and run on (for
step() callers and streams).

The engine (jaxinfer/engine.py) decides what happens to a request; this table only remembers
requests and renders their outputs.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq

from jaxinfer.requests import RequestOutput, StopRules, sequence_output
from jaxinfer.sampling import SamplingParams
from jaxinfer.scheduler import Sequence, Status


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
        if req.done:
            if len(samples) > 1:
                samples[0].samples = samples
            return samples[0]
        if len(samples) == 1 and len(req.sequences) == req.sampling.n:
            return samples[0]
        return dataclasses.replace(samples[0], finish_reason=None, error=None, finished=False, samples=samples)
