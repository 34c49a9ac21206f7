"""Batch layout: a step's sequences packed into the device inputs of one jitted program.

Each program kind has a bucket (its static shape, sizes rounded up to powers of two, so a run
compiles a handful of programs) and a named inputs structure, packed on the host and moved to the
device in one transfer:
  StepBucket(Rd, Rp, C, M)   a mixed step: Rd decode rows, Rp prompt chunks of C tokens  -> MixedInputs
  DecodeBucket(R, k, M)      k decode steps of R rows in one program                    -> DecodeInputs
  VerifyBucket(R, k, M)      one pass over R rows of a token and k drafts               -> VerifyInputs
M is the block-table width (pages per sequence). Packing with no sequences gives the padding of a
bucket: what warm-up compiles against, so the compiled and the run programs are the same.
Padding rows are greedy, write no K/V (their slots are past the cache) and read the padding page.
Each row's sampling parameters (SamplingBatch.from_rows) carry its logits processors' arrays, filled
from its sequence's tokens, only when some row of the batch asks for a processor. A mixed step
whose prompt chunks hold tokens whose log-probabilities a request asks for (prompt_logprobs)
carries their targets (PromptTargets); any other step carries None and runs the plain program.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import numpy as np
from flax import struct

from jaxinfer.buckets import MIN_CHUNK, min_pages, next_power_of_2, pages_bucket, powers_of_2
from jaxinfer.models.kv_cache import BatchDescriptor
from jaxinfer.sampling import processors
from jaxinfer.sampling.processors import Vocab
from jaxinfer.sampling.sampler import SamplingBatch, top_bucket


class StepBucket(NamedTuple):
    decode_rows: int
    prefill_rows: int
    chunk: int
    pages: int


class DecodeBucket(NamedTuple):
    rows: int
    steps: int
    pages: int


class VerifyBucket(NamedTuple):
    rows: int
    drafts: int
    pages: int


Bucket = StepBucket | DecodeBucket | VerifyBucket


@struct.dataclass
class PromptTargets:
    """The prompt log-probabilities a mixed step computes, for its Rp prompt chunks of C tokens.
      targets  (Rp, C) int32  the prompt token that each chunk token's logits predict (the next
                              one), -1 where no request asks for its log-probability
      top_n    (static)       alternatives per token (a bucket of the rows' asks)"""

    targets: jax.Array
    top_n: int = struct.field(pytree_node=False, default=0)


@struct.dataclass
class MixedInputs:
    """A mixed step's inputs: N = Rd + Rp * C tokens, R = Rd + Rp logits rows.
      tokens    (N,) int32        the step's tokens, laid out as `batch` says
      batch     BatchDescriptor   positions, slots, block tables, adapter ids
      sampling  SamplingBatch     (R,) each logits row's sampling parameters
      steps     (R,) int32        each row's generated-token index (its PRNG key's step)
      prompt    PromptTargets     the prompt log-probabilities asked for, or None (the plain program)"""

    tokens: jax.Array
    batch: BatchDescriptor
    sampling: SamplingBatch
    steps: jax.Array
    prompt: PromptTargets | None = None


@struct.dataclass
class DecodeInputs:
    """A k-step decode call's inputs, R rows.
      tokens        (R,) int32     each row's first input token
      positions     (R,) int32     its position
      valid         (R,) int32     steps the row takes (it writes K/V in those only; 0: padding)
      block_tables  (R, M) int32
      steps         (R,) int32     the first step's generated-token index
      sampling      SamplingBatch  (R,), or None (decode_logits: drawn later)
      adapter_ids   (R,) int32     LoRA slot, -1: the base model"""

    tokens: jax.Array
    positions: jax.Array
    valid: jax.Array
    block_tables: jax.Array
    steps: jax.Array
    sampling: SamplingBatch | None
    adapter_ids: jax.Array


@struct.dataclass
class VerifyInputs:
    """A verify pass's inputs (the drafts themselves come from the drafter), R rows of k + 1 tokens.
      last        (R,) int32     each row's next token (its drafts follow it)
      num_drafts  (R,) int32     drafts the row really has (the rest pad)
      batch       BatchDescriptor  R prefill rows of k + 1 tokens, logits at every token
      sampling    SamplingBatch  (R,)
      steps       (R,) int32     generated-token index of the first token the pass emits"""

    last: jax.Array
    num_drafts: jax.Array
    batch: BatchDescriptor
    sampling: SamplingBatch
    steps: jax.Array


class Layout:
    """How sequences map onto a paged cache of num_pages pages (plus one padding page, never
    written, that padded block-table entries point at: padding reads zeros, not another
    sequence's page, since attention weighs padding by zero and 0 * NaN is NaN)."""

    def __init__(self, num_pages: int, page_size: int, max_seq_len: int, max_batch: int, vocab: Vocab):
        """vocab: the model's (the logits processors' arrays are filled for it)."""
        self.num_pages, self.page_size, self.max_seq_len = num_pages, page_size, max_seq_len
        self.vocab = vocab
        self.pad_page = num_pages
        self.dropped_slot = (num_pages + 1) * page_size  # a slot past the cache: K/V written there are dropped
        # A step with prompt work always has room for every running sequence's decode row, so the
        # decode row count is no part of its shape.
        self.decode_rows = next_power_of_2(max_batch)

    def pages(self, seqs: list) -> int:
        return pages_bucket(max((len(s.pages) for s in seqs), default=1), self.page_size, self.max_seq_len)

    def _tables(self, seqs: list, rows: int, width: int) -> np.ndarray:
        tables = np.full((rows, width), self.pad_page, np.int32)
        for i, s in enumerate(seqs):
            tables[i, : len(s.pages)] = s.pages
        return tables

    # Buckets -------------------------------------------------------------------------------------

    def step_bucket(self, decode: list, prefill: list[tuple]) -> StepBucket:
        Rp = next_power_of_2(len(prefill)) if prefill else 0
        Rd = max(next_power_of_2(len(decode)), self.decode_rows) if Rp else next_power_of_2(len(decode))
        C = next_power_of_2(max(n for _, n in prefill), MIN_CHUNK) if prefill else 0
        return StepBucket(Rd, Rp, C, self.pages(decode + [s for s, _ in prefill]))

    def decode_bucket(self, seqs: list, wanted: list[int]) -> DecodeBucket:
        return DecodeBucket(next_power_of_2(len(seqs)), next_power_of_2(max(wanted)), self.pages(seqs))

    def verify_bucket(self, seqs: list, k: int) -> VerifyBucket:
        return VerifyBucket(next_power_of_2(len(seqs)), k, self.pages(seqs))

    # Packing -------------------------------------------------------------------------------------

    def mixed(self, bucket: StepBucket, decode: list = (), prefill: list[tuple] = ()) -> MixedInputs:
        """One token of each decode sequence, then a chunk of n prompt tokens of each prefill
        sequence, each from its num_computed on; every logits row sampled with its sequence's
        parameters."""
        Rd, Rp, C, M = bucket
        positions, live = np.zeros(Rd, np.int32), np.zeros(Rd, bool)
        start, lens = np.zeros(Rp, np.int32), np.zeros(Rp, np.int32)
        tokens, adapter_ids = np.zeros(Rd + Rp * C, np.int32), np.full(Rd + Rp * C, -1, np.int32)
        for i, s in enumerate(decode):
            positions[i], live[i], tokens[i], adapter_ids[i] = s.num_computed, True, s.tokens[s.num_computed], s.lora_slot
        for j, (s, n) in enumerate(prefill):
            offset = Rd + j * C
            start[j], lens[j] = s.num_computed, n
            tokens[offset : offset + n] = s.tokens[s.num_computed : s.num_computed + n]
            adapter_ids[offset : offset + C] = s.lora_slot  # the row's padding too: one adapter per row
        batch = BatchDescriptor.mixed(
            BatchDescriptor.decode_rows(positions, live, self._tables(decode, Rd, M), self.page_size,
                                        self.dropped_slot, adapter_ids[:Rd], xp=np),
            BatchDescriptor.chunk_rows(start, lens, self._tables([s for s, _ in prefill], Rp, M), C, self.page_size,
                                       self.dropped_slot, adapter_ids=adapter_ids[Rd:], xp=np), xp=np)
        rows = list(decode) + [None] * (Rd - len(decode)) + [s for s, _ in prefill]
        rows += [None] * (Rd + Rp - len(rows))
        sampling = SamplingBatch.from_rows(rows, vocab=self.vocab)
        steps = np.asarray([len(s.generated) if s else 0 for s in rows], np.int32)
        return MixedInputs(tokens, batch, sampling, steps, self._prompt_targets(bucket, prefill))

    @staticmethod
    def _prompt_targets(bucket: StepBucket, prefill: list[tuple]) -> PromptTargets | None:
        """The targets of the prompt log-probabilities that the chunks' logits give, or None when
        no chunk holds a token whose log-probability is asked for."""
        wanted = [(j, s, s.prompt_targets(n)) for j, (s, n) in enumerate(prefill)]
        wanted = [(j, s, t) for j, s, t in wanted if t is not None]
        if not wanted:
            return None
        targets = np.full((bucket.prefill_rows, bucket.chunk), -1, np.int32)
        for j, _, t in wanted:
            targets[j, : len(t)] = t
        return PromptTargets(targets, top_bucket([s.sampling.prompt_logprobs for _, s, _ in wanted]))

    def decode(self, bucket: DecodeBucket, seqs: list = (), wanted: list[int] = (),
               ahead: list[int] = (), sampling: bool = True) -> DecodeInputs:
        """Row i continues seqs[i] `ahead[i]` tokens past what the host has seen (tokens still in
        flight) for wanted[i] steps; its input token is the sequence's next uncomputed one (a
        look-ahead call replaces them with the last call's newest tokens, on the device).
        sampling=False: no sampling parameters (a forward pass whose draw is filled later)."""
        R, _, M = bucket
        tokens, positions, valid, steps = (np.zeros(R, np.int32) for _ in range(4))
        adapter_ids = np.full(R, -1, np.int32)
        for i, (s, w, a) in enumerate(zip(seqs, wanted, ahead)):
            positions[i], valid[i], steps[i], adapter_ids[i] = s.num_computed + a, w, len(s.generated) + a, s.lora_slot
            tokens[i] = s.tokens[s.num_computed] if s.num_computed < len(s.tokens) else 0
        return DecodeInputs(tokens, positions, valid, self._tables(seqs, R, M), steps,
                            SamplingBatch.from_rows(seqs, R, self.vocab) if sampling else None, adapter_ids)

    def verify(self, bucket: VerifyBucket, seqs: list = (), num_drafts: list[int] = (),
               proposal=None) -> VerifyInputs:
        """Each sequence's next token and its drafts, written from num_computed on. When a row asks
        for a logits processor filled per position (structured output's grammar), the sampling
        parameters are filled for every position from the proposal's drafts (read to the host)."""
        R, k, M = bucket
        C = k + 1
        start, lens, last, valid = (np.zeros(R, np.int32) for _ in range(4))
        adapter_ids, steps = np.full(R, -1, np.int32), np.zeros(R, np.int32)
        for i, (s, d) in enumerate(zip(seqs, num_drafts)):
            start[i], lens[i], last[i], valid[i] = s.num_computed, d + 1, s.tokens[s.num_computed], d
            adapter_ids[i], steps[i] = s.lora_slot, len(s.generated)
        batch = BatchDescriptor.chunk_rows(start, lens, self._tables(seqs, R, M), C, self.page_size, self.dropped_slot,
                                           all_logits=True, adapter_ids=np.repeat(adapter_ids, C), xp=np)
        drafts = None
        if proposal is not None and any(processors.by_position(s.sampling) for s in seqs):
            host = lambda x: None if x is None else np.asarray(x)[:R]
            drafts = processors.Drafts(host(proposal.tokens), host(proposal.parents), list(num_drafts) + [0] * R)
        return VerifyInputs(last, valid, batch, SamplingBatch.from_rows(seqs, R, self.vocab, drafts), steps)

    # Every shape a run can need ------------------------------------------------------------------

    def possible_buckets(self, *, max_batch: int, max_tokens_per_step: int, chunked_prefill: bool, decode_steps: int,
                         multi_step_decode: bool, max_prompt_len: int, max_len: int,
                         speculative_tokens: int = 0) -> list[Bucket]:
        """Every program shape the engine can run under these limits (n = 1 sampling): steps with
        prompt work (max_batch decode rows, up to max_batch prefill rows, chunks up to the token
        budget or, unchunked, a whole prompt, block tables up to the longest sequence's pages, but
        not narrower than its chunk needs), decode-only steps when decode does not run as calls,
        and k-step decode calls, or, with speculative_tokens = k, verify passes of k drafts.
        Sequences are at most max_len tokens (prompt and output), prompts at most max_prompt_len."""
        B, page, narrowest = next_power_of_2(max_batch), self.page_size, min_pages(self.page_size, self.max_seq_len)
        max_pages = min(math.ceil(min(max_len, self.max_seq_len) / page), self.num_pages)
        pages = sorted({next_power_of_2(m, narrowest) for m in range(1, max_pages + 1)})
        max_chunk = min(max_tokens_per_step, max_prompt_len) if chunked_prefill else max_prompt_len
        out: list[Bucket] = []
        chunks = sorted({max(C, MIN_CHUNK) for C in powers_of_2(max_chunk)})
        for Rp, C in itertools.product(powers_of_2(max_batch), chunks):
            if chunked_prefill and Rp // 2 >= max_tokens_per_step:
                continue  # more prompt rows than tokens in the budget
            shortest = C // 2 + 1 if C > MIN_CHUNK else 1  # the shortest chunk that buckets to C
            need = next_power_of_2(math.ceil(shortest / page), narrowest)
            out += [StepBucket(B, Rp, C, M) for M in pages if M >= need]
        rows = powers_of_2(max_batch)
        if speculative_tokens:
            out += [VerifyBucket(R, speculative_tokens, M) for R in rows for M in pages]
        elif multi_step_decode:
            out += [DecodeBucket(R, k, M) for R in rows for k in powers_of_2(decode_steps) for M in pages]
        else:
            out += [StepBucket(R, 0, 0, M) for R in rows for M in pages]
        return out
