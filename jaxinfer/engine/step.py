"""The step contract: the scheduler makes one plan per step, a runner executes it and returns one
step output, one update applies that output to the requests (as vLLM v1's schedule ->
execute_model -> update_from_output).

A plan lists the sequences that run and what each feeds the model: one next token (decode rows),
a chunk of its prompt (prefill rows), and optionally, for a step whose work is decoding only,
several decode steps per row in one program (`num_steps`, with `ahead` tokens still in flight for
a look-ahead call) or drafted tokens to verify (`proposal`). Multi-step decode, overlap and
speculative verification are these properties of the plan, not separate loops.

A step output holds, per sequence that ran, the tokens whose K/V the step wrote (`computed`), the
tokens sampled for it (`tokens`), in order, and the prompt log-probabilities its chunk gave; the update (jaxinfer/engine/lifecycle.py) appends
them one by one, advancing the sequence over its inputs first, and stops at the sequence's end.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np

from jaxinfer.engine.batch import Bucket


@dataclasses.dataclass
class StepPlan:
    decode: list  # sequences that feed their next token (Sequence, jaxinfer/engine/scheduler.py)
    prefill: list[tuple[Any, int]]  # (sequence, tokens of its prompt chunk)
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (src, dst) pages to copy first
    preempted: list = dataclasses.field(default_factory=list)  # sent back to waiting by this plan
    finished: list = dataclasses.field(default_factory=list)  # ended by the scheduler: alone, and out of pages
    # Decode-only steps. num_steps: decode steps per row in one program (None: one, in a mixed step);
    # ahead: tokens past each row's num_computed still in flight; inputs: those in-flight tokens, on device.
    num_steps: list[int] | None = None
    ahead: list[int] | None = None
    inputs: Any = None
    proposal: Any = None  # a jaxinfer.speculative.Proposal: drafts to verify after each decode row's token
    num_drafts: list[int] | None = None  # drafts each row really has
    accept: float | None = None  # the synthetic drafter's acceptance probability (not lossless)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def kind(self) -> str:
        """"verify", "decode" (a multi-step decode call) or "mixed"."""
        return "verify" if self.proposal is not None else "decode" if self.num_steps is not None else "mixed"


@dataclasses.dataclass
class RowOutput:
    seq: Any  # the Sequence
    computed: int  # its tokens whose K/V this step wrote
    tokens: list[int]  # sampled for it, in order; tokens[j] follows input computed - len(tokens) + j
    forks: list[int] = dataclasses.field(default_factory=list)  # the first token of samples 1..n-1 (n > 1)
    # the Logprob (jaxinfer.sampling.Logprob) of each of tokens / forks, when the request asked (else None each);
    # empty when no row of the step asked
    logprobs: list = dataclasses.field(default_factory=list)
    fork_logprobs: list = dataclasses.field(default_factory=list)
    # (prompt position, Logprob) of each prompt token whose log-probability the request asks for (prompt_logprobs)
    # among those that the logits of this row's computed tokens predict
    prompt_logprobs: list = dataclasses.field(default_factory=list)
    release: bool = False  # give back pages reserved past the sequence's next token (rejected drafts)
    appended: int = 0  # set by the update: tokens appended before the sequence ended


@dataclasses.dataclass
class StepOutput:
    rows: list[RowOutput]
    accepted: np.ndarray | None = None  # verify: drafts accepted per row


class Pending(Protocol):
    """A dispatched plan whose tokens are not read back yet (a runner's own type)."""

    plan: StepPlan


class Runner(Protocol):
    """What the engine asks of a model runner (jaxinfer/engine/runner.py; jaxinfer/engine/mock_runner.py
    runs the same contract with no model)."""

    buckets: set[Bucket]  # program shapes run so far
    stats: Any  # collections.Counter: device_s, decode_tokens, prefill_tokens, copied_pages, ...
    features: Any  # the feature cache (None: not kept)

    def dispatch(self, plan: StepPlan) -> Pending:
        """Start the plan's program on the device; the pages it writes are reserved already."""

    def draw(self, pending: Pending) -> None:
        """Start the draw of a dispatched decode call whose rows' logits processors are filled late
        (processors.Processor.late), from the host's view now; nothing for any other call."""

    def collect(self, pending: Pending) -> StepOutput:
        """Read a dispatched plan's tokens back (blocks until computed)."""

    def newest(self, pending: Pending) -> Any:
        """A decode call's newest token per row, left on the device: the input of a look-ahead call."""

    def execute(self, plan: StepPlan) -> StepOutput:
        """dispatch, then collect."""

    def copy_pages(self, copies: list[tuple[int, int]]) -> None: ...

    def clear_pages(self, pages: list[int]) -> None: ...

    def load_adapter(self, slot: int, adapter) -> None: ...

    def warmup(self, buckets: list[Bucket], synthetic: float | None = None, tree: bool = False) -> int: ...

    def no_work(self) -> None: ...
