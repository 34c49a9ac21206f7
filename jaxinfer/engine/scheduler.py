"""Iteration-level scheduling: which sequences run in the next step, and with which pages.

Plain host-side Python. Each step the scheduler
  1. gives every running sequence that has finished its prompt one decode token,
  2. spends the rest of the token budget on prompt chunks (chunked prefill), first of running
     sequences mid-prompt, then of waiting sequences it admits (continuous batching), or admits
     a whole batch only when nothing runs (static batching),
  3. makes sure each scheduled sequence owns the pages its new tokens go to, through its KV
     manager (jaxinfer/engine/kv_manager.py: allocation on demand, copy-on-write, prefix hits),
     preempting the most recently admitted sequence (its pages freed, recomputed later) when
     pages run out.
The plan it returns is the step contract's (jaxinfer/engine/step.py).

With LoRA adapters (`adapters`, a jaxinfer.lora.AdapterRegistry), a sequence is admitted only
once its adapter holds a device slot; one whose adapter finds every slot in use waits in its
place while later sequences may be admitted. A sequence whose grammar matcher (structured output) is
still being built waits the same way. Slot references are dropped as sequences stop running.

Every page reservation goes through its KV manager (`kv`): the one-token reservations of a
step, the extra pages of a multi-step or look-ahead decode call (`kv.reserve_ahead`), the pages
shared by forked samples (`fork`), the pages given back when a sequence's newest tokens are
dropped (`kv.rollback`, `kv.release_unused`), finishes or is aborted.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import enum
import math
from typing import Any

from jaxinfer.engine.kv_manager import KVManager, OutOfPages, PageAllocator
from jaxinfer.engine.requests import StopChecker
from jaxinfer.engine.step import StepPlan
from jaxinfer.sampling.sampler import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One stream of tokens: a request's prompt plus what has been generated for it so far."""

    request_id: int
    sample_index: int  # which of the request's n samples
    tokens: list[int]  # prompt + generated
    prompt_len: int
    sampling: SamplingParams
    seed: int
    arrival: float
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    hashes: list[int] = dataclasses.field(default_factory=list)  # chained hash of each full page
    num_registered: int = 0  # full pages offered to the prefix cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None  # why it failed (finish_reason "error")
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    stop: StopChecker | None = None  # decides when the sequence ends (its budget, stop tokens and strings)
    draft_computed: int = 0  # leading tokens whose K/V a speculative drafter holds in its own cache
    adapter: str | None = None  # the LoRA adapter it runs under (None: the base model)
    lora_slot: int = -1  # the device slot holding that adapter while it runs
    cache_salt: int = 0  # starts its prefix-cache hash chain: one per added adapter (its K/V differ), 0 for the base
    logprobs: list = dataclasses.field(default_factory=list)  # per generated token, when sampling.logprobs asks
    # When sampling.prompt_logprobs asks: one entry per prompt position (None until computed, and at 0), and
    # the first position whose log-probability is still to compute (positions before it are not wanted or done).
    prompt_logprobs: list | None = None
    prompt_logprobs_from: int = 1
    # With sampling.structured: the grammar matcher at its next token (jaxinfer.structured), and while
    # the matcher is being built off the step loop, its future (the sequence is not admitted until it is done).
    grammar: Any = None
    compiling: concurrent.futures.Future | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def cacheable(self) -> int:
        """Leading tokens whose K/V may come from the prefix cache: all but the last (its logits are
        needed), and none from the one before the first prompt token whose log-probability is
        still to compute (its logits are needed too): a request that asks for the whole prompt's
        log-probabilities computes it all, one that asks from position p shares the pages before p - 1."""
        if self.prompt_logprobs is not None and self.prompt_logprobs_from < self.prompt_len:
            return min(len(self.tokens) - 1, self.prompt_logprobs_from - 1)
        return len(self.tokens) - 1

    def wanted_prompt(self, start: int, n: int) -> range:
        """The prompt positions whose log-probabilities are still to compute among those that the
        logits of n tokens from position `start` predict (start + 1 .. start + n)."""
        if self.prompt_logprobs is None:
            return range(0)
        return range(max(start + 1, self.prompt_logprobs_from), min(start + 1 + n, self.prompt_len))

    def prompt_targets(self, n: int) -> list[int] | None:
        """The token each of the next n tokens' logits predicts where its log-probability is wanted
        (-1 elsewhere), or None where none of them is."""
        wanted = self.wanted_prompt(self.num_computed, n)
        if not wanted:
            return None
        first = self.num_computed + 1  # the position the first of them predicts
        return [-1] * (wanted.start - first) + self.tokens[wanted.start : wanted.stop] + [-1] * (first + n - wanted.stop)

    @property
    def num_uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_uncomputed > 1 or not self.generated


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        *,
        policy: str = "continuous",
        max_batch: int = 8,
        max_tokens_per_step: int = 256,
        chunked_prefill: bool = True,
        adapters=None,
    ):
        if policy not in ("continuous", "static"):
            raise ValueError(f"batching={policy!r} is not one of 'continuous', 'static'")
        self.allocator = allocator
        self.kv = KVManager(allocator)
        self.policy = policy
        self.max_batch = max_batch
        self.max_tokens_per_step = max_tokens_per_step
        self.chunked_prefill = chunked_prefill
        self.adapters = adapters  # acquire(seq) -> bool, release(seq): LoRA slots; None without adapters
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self._admitting = True

    @property
    def page_size(self) -> int:
        return self.allocator.page_size

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # Pages, through the KV manager ---------------------------------------------------------------

    def _admit(self, seq: Sequence) -> None:
        """Take prefix-cache hits for a newly (re)admitted sequence and run it."""
        self.kv.admit(seq)
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed
        seq.status = Status.RUNNING
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._release_adapter(seq)
        self.kv.free(seq)
        seq.hashes = []
        seq.num_computed = seq.num_registered = seq.draft_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _reserve(self, seq: Sequence, num_tokens: int, plan: StepPlan) -> bool:
        """Make seq own writable pages for its next num_tokens tokens, preempting later-admitted
        sequences if needed. False if seq itself was preempted, or finished because even alone
        it does not fit in the cache."""
        while True:
            try:
                self.kv.reserve(seq, num_tokens, plan.copies)
                return True
            except OutOfPages:
                if self.running == [seq]:
                    self.finish(seq, "length")
                    plan.finished.append(seq)
                    return False
                victim = self.running[-1]
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    return False

    def advance(self, seq: Sequence, n: int) -> None:
        """seq's next n tokens now have their K/V in its pages."""
        self.kv.advance(seq, n, register=seq.status is Status.RUNNING)

    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Run children beside parent, sharing its pages (copy-on-write before either writes)."""
        for child in children:
            self.kv.share(parent, child)
            child.status = Status.RUNNING
            if self.adapters is not None:
                self.adapters.acquire(child)  # the parent's adapter is resident: always succeeds
            self.running.append(child)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self._release_adapter(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)

    def _release_adapter(self, seq: Sequence) -> None:
        if self.adapters is not None:
            self.adapters.release(seq)

    # The plan ----------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan(decode=[], prefill=[])
        budget = self.max_tokens_per_step

        for seq in list(self.running):
            if seq.status is Status.RUNNING and not seq.in_prefill and self._reserve(seq, 1, plan):
                plan.decode.append(seq)
        budget -= len(plan.decode)

        for seq in list(self.running):
            if seq.status is Status.RUNNING and seq.in_prefill:
                n = self._chunk(seq, budget, first=not plan.prefill)
                if n and self._reserve(seq, n, plan):
                    plan.prefill.append((seq, n))
                    budget -= n

        if self.policy == "continuous" or not self.running:
            self._admitting = True
        blocked = []  # waiting for an adapter slot: they keep their places
        while self.waiting and self._admitting and not plan.preempted and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if math.ceil(len(seq.tokens) / self.page_size) > self.allocator.num_pages:
                # A preempted forked sample outgrew the cache it shared with its parent: it can never run again.
                self.finish(seq, "length")
                plan.finished.append(seq)
                continue
            n = self._chunk_len(len(seq.tokens), budget, first=not plan.prefill)
            if n == 0 and self.policy == "continuous":
                break  # no budget left this step
            if self.allocator.num_free < math.ceil(max(n, 1) / self.page_size):
                break
            self.waiting.popleft()
            if seq.compiling is not None and not self._grammar_ready(seq, plan):
                if seq.status is Status.WAITING:
                    blocked.append(seq)
                continue
            if self.adapters is not None and not self.adapters.acquire(seq):
                blocked.append(seq)
                continue
            self._admit(seq)
            n = self._chunk(seq, budget, first=not plan.prefill)  # prefix hits may shorten it
            if n and self._reserve(seq, n, plan):
                plan.prefill.append((seq, n))
                budget -= n
        self.waiting.extendleft(reversed(blocked))
        if self.policy == "static" and self.running:
            self._admitting = False  # a static batch takes no one else until it drains

        # A sequence preempted after it was planned must not run.
        plan.decode = [s for s in plan.decode if s.status is Status.RUNNING]
        plan.prefill = [(s, n) for s, n in plan.prefill if s.status is Status.RUNNING]
        return plan

    def _grammar_ready(self, seq: Sequence, plan: StepPlan) -> bool:
        """Whether seq's grammar matcher is built (then it is taken from its future); a matcher that
        failed to build finishes the sequence with "error"."""
        if not seq.compiling.done():
            return False
        future, seq.compiling = seq.compiling, None
        try:
            seq.grammar = future.result()
        except ValueError as e:
            seq.error = f"structured output: the grammar matcher could not be built: {e}"
            self.finish(seq, "error")
            plan.finished.append(seq)
            return False
        return True

    def _chunk_len(self, remaining: int, budget: int, first: bool) -> int:
        if self.chunked_prefill:
            return min(remaining, budget)
        # Whole prompts only; the first prefill of a step may exceed the budget.
        return remaining if (remaining <= budget or first) else 0

    def _chunk(self, seq: Sequence, budget: int, first: bool) -> int:
        return self._chunk_len(seq.num_uncomputed, budget, first)
