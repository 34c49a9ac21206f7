"""A model runner with no model, for testing the scheduler and the engine in milliseconds.

It runs the step contract of `jaxinfer.engine.runner.ModelRunner` (jaxinfer/engine/step.py's Runner)
and keeps a host-side "KV cache" that stores
the token id written into each slot. A sequence's next token is a function of the tokens the
runner reads back through its block table, in position order (`next_token`):

    h = rolling_hash(context) = (c[0] * B^(n-1) + c[1] * B^(n-2) + ... + c[n-1]) mod M
    next_token(context) = (h + len(context) + noise) % vocab_size, or, when h % COPY_EVERY == 0
                          and the last token occurred before, the token that followed its latest
                          earlier occurrence, plus the noise (an induction head: drafts from prompt
                          lookup are accepted at times)

with noise = 0 for greedy rows and seed + step for sampled rows, so the expected output of any
request served alone can be worked out by hand (`expected_tokens`), and a scheduler that hands a
sequence the wrong pages, hands them in the wrong order, frees a page still in use or lets a write
land in a shared page makes the output differ (the hash depends on the order of the tokens, not
only on which tokens there are). Reading a slot that was never written raises.

LoRA adapters: `load_adapter` puts an adapter's tag (`adapter_tag`, from its name) in a slot. A
sequence on slot s writes token + TAG_WEIGHT * tag into the cache and adds the tag to its noise,
with the tag read from slot s at that moment: an adapter swapped out from under a running
sequence, or a prefix page computed under another adapter, changes the output.

Non-finite logits: with `nan_token`, a row whose context holds that token samples NONFINITE (as
the model runner reports a row whose logits hold a NaN or an infinity); `clear_pages` empties the
slots again, so a later owner that reads one before writing it fails loudly.
"""

from __future__ import annotations

import collections
import dataclasses
import zlib

import numpy as np

from jaxinfer.buckets import next_power_of_2
from jaxinfer.engine.lifecycle import sample_seed
from jaxinfer.engine.scheduler import Sequence
from jaxinfer.engine.step import RowOutput, StepOutput, StepPlan
from jaxinfer.sampling.sampler import NONFINITE

_EMPTY = -1
TAG_WEIGHT = 1009  # prime: a page written under another adapter holds other values, so the context hashes otherwise
# The rolling hash: a prime modulus below 2**20 and a base coprime to it, so a context of stored values
# (below 2**17: token + TAG_WEIGHT * tag) times a power stays below 2**37 and a dot product of up to
# 2**26 of them fits in int64.
HASH_BASE, HASH_MOD = 131, 1_000_003
_powers = np.ones(1, np.int64)  # HASH_BASE**i % HASH_MOD for i < len(_powers), grown on demand
COPY_EVERY = 2  # one context in COPY_EVERY (by its hash) copies, as an induction head does


def rolling_hash(context) -> int:
    """sum(context[i] * HASH_BASE**(n - 1 - i)) mod HASH_MOD: (h * B + token) mod M over the tokens in
    order, as one dot product. Swapping two different tokens changes it (unless their difference
    times a difference of powers is a multiple of M)."""
    global _powers
    context = np.asarray(context, np.int64)
    n = len(context)
    while len(_powers) < n:
        _powers = np.concatenate([_powers, _powers * (int(_powers[-1]) * HASH_BASE % HASH_MOD) % HASH_MOD])
    return int(np.dot(context % HASH_MOD, _powers[:n][::-1]) % HASH_MOD)


def next_token(context, vocab_size: int, noise: int = 0) -> int:
    """The mock model, a function of the context's tokens in order and the noise. With h =
    rolling_hash(context): (h + len(context) + noise) % vocab_size, except in one context in
    COPY_EVERY (h % COPY_EVERY == 0) whose last token occurred before: then the token that followed
    its latest earlier occurrence, plus the noise, as an induction head copies (so prompt lookup's
    drafts are accepted at times, in runs, and rejected at others)."""
    context = np.asarray(context, np.int64)
    h = rolling_hash(context)
    if h % COPY_EVERY == 0:
        earlier = np.flatnonzero(context[:-1] == context[-1])
        if earlier.size:
            return int(context[earlier[-1] + 1] + noise) % vocab_size
    return (h + len(context) + noise) % vocab_size


def adapter_tag(adapter) -> int:
    """The mock's stand-in for an adapter's effect: a number from its name, 0 for the base model."""
    return 0 if adapter is None else 1 + zlib.crc32(adapter.name.encode()) % 97


def expected_tokens(prompt: list[int], max_tokens: int, vocab_size: int, seed: int = 0, greedy: bool = True,
                    adapter=None) -> list[int]:
    """What the mock serves a request alone (no stop tokens), worked out without a cache."""
    tokens, tag = list(prompt), adapter_tag(adapter)
    for step in range(max_tokens):
        context = [t + TAG_WEIGHT * tag for t in tokens]
        tokens.append(next_token(context, vocab_size, (0 if greedy else seed + step) + tag))
    return tokens[len(prompt):]


@dataclasses.dataclass
class MockPending:
    plan: StepPlan
    output: StepOutput


class MockRunner:
    def __init__(self, model, num_pages: int, page_size: int, max_seq_len: int, max_batch: int, impl=None,
                 features: bool = False, kv_dtype: str | None = None, lora=None, nan_token: int | None = None,
                 feature_layers: tuple[int, ...] = ()):
        """nan_token: rows whose context holds this token id sample NONFINITE (None: none do)."""
        del max_seq_len, impl, features, kv_dtype, feature_layers
        self.nan_token = nan_token
        self.tags = [0] * (0 if lora is None else lora.num_slots)  # adapter_tag of each slot's adapter
        self.vocab_size = model.config.vocab_size
        self.page_size, self.num_pages = page_size, num_pages
        self.slots = np.full(num_pages * page_size, _EMPTY, np.int64)
        self.decode_rows = next_power_of_2(max_batch)
        self.buckets: set = set()
        self.features = None  # no feature cache: feature-level drafters need the model runner
        self.stats: collections.Counter = collections.Counter()
        self.calls: list[tuple[str, int]] = []  # ("step", tokens) / ("decode", rows) in dispatch order

    def _write(self, seq: Sequence, position: int, token: int) -> None:
        page = seq.pages[position // self.page_size]
        if not 0 <= page < self.num_pages:
            raise AssertionError(f"page {page} outside the cache")
        self.slots[page * self.page_size + position % self.page_size] = token + TAG_WEIGHT * self._tag(seq)

    def _tag(self, seq: Sequence) -> int:
        return self.tags[seq.lora_slot] if seq.lora_slot >= 0 else 0

    def _context(self, seq: Sequence, length: int) -> np.ndarray:
        pos = np.arange(length)
        pages = np.asarray(seq.pages)[pos // self.page_size]
        ctx = self.slots[pages * self.page_size + pos % self.page_size]
        if (ctx == _EMPTY).any():
            raise AssertionError(f"request {seq.request_id} read an unwritten slot")
        return ctx

    def _sample(self, seq: Sequence, context: np.ndarray, step: int, seed: int | None = None) -> int:
        if self.nan_token is not None and np.any(context % TAG_WEIGHT == self.nan_token):
            return NONFINITE
        noise = 0 if seq.sampling.temperature == 0 else (seq.seed if seed is None else seed) + step
        return next_token(context, self.vocab_size, noise + self._tag(seq))

    def load_adapter(self, slot: int, adapter) -> None:
        self.tags[slot] = adapter_tag(adapter)

    def clear_pages(self, pages) -> None:
        for page in pages:
            self.slots[page * self.page_size : (page + 1) * self.page_size] = _EMPTY
        self.stats["cleared_pages"] += len(pages)

    def copy_pages(self, copies) -> None:
        for src, dst in copies:
            s, d = src * self.page_size, dst * self.page_size
            self.slots[d : d + self.page_size] = self.slots[s : s + self.page_size]
        self.stats["copied_pages"] += len(copies)

    # The step contract: the mock computes a plan's tokens when it is dispatched.

    def execute(self, plan: StepPlan) -> StepOutput:
        return self.collect(self.dispatch(plan))

    def dispatch(self, plan: StepPlan) -> MockPending:
        if plan.kind == "verify":
            return MockPending(plan, self._verify(plan))
        if plan.kind == "decode":
            return self._decode(plan)
        return MockPending(plan, self._mixed(plan))

    def draw(self, pending: MockPending) -> None:
        pass  # the mock has no logits processors

    def collect(self, pending: MockPending) -> StepOutput:
        return pending.output

    def newest(self, pending: MockPending) -> np.ndarray:
        return np.asarray([row.tokens[-1] if row.tokens else 0 for row in pending.output.rows])

    def _mixed(self, plan: StepPlan) -> StepOutput:
        decode, prefill = plan.decode, plan.prefill
        rows = [(s, 1) for s in decode] + list(prefill)
        self.calls.append(("step", sum(n for _, n in rows)))
        for seq, n in rows:
            for p in range(seq.num_computed, seq.num_computed + n):
                self._write(seq, p, seq.tokens[p])
        self.stats["decode_tokens"] += len(decode)
        self.stats["prefill_tokens"] += sum(n for _, n in prefill)
        out = []
        for seq, n in rows:
            end = seq.num_computed + n
            context = self._context(seq, end)
            if end < len(seq.tokens):  # a prompt chunk that does not finish the prompt samples nothing
                bad = self._sample(seq, context, len(seq.generated)) == NONFINITE  # but its logits are checked
                out.append(RowOutput(seq, n, [NONFINITE] if bad else []))
                continue
            forks = seq.sampling.n - 1 if not seq.generated and seq.sample_index == 0 else 0
            out.append(RowOutput(seq, n, [self._sample(seq, context, len(seq.generated))],
                                 [self._sample(seq, context, 0, sample_seed(seq.seed, i)) for i in range(1, 1 + forks)]))
        return StepOutput(out)

    def _decode(self, plan: StepPlan) -> MockPending:
        seqs, wanted, ahead = plan.decode, plan.num_steps, plan.ahead or [0] * len(plan.decode)
        self.calls.append(("decode", len(seqs)))
        rows = []
        for i, (s, w, a) in enumerate(zip(seqs, wanted, ahead)):
            tok = s.tokens[s.num_computed] if plan.inputs is None else int(plan.inputs[i])
            tokens = []
            for j in range(w):
                pos = s.num_computed + a + j
                self._write(s, pos, tok)
                tokens.append(self._sample(s, self._context(s, pos + 1), len(s.generated) + a + j))
                tok = max(tokens[-1], 0)  # a failed row runs on with token 0, as the model runner's does
            rows.append(RowOutput(s, w, tokens))
        self.stats["decode_tokens"] += sum(wanted)
        return MockPending(plan, StepOutput(rows))

    def _verify(self, plan: StepPlan) -> StepOutput:
        """Write each row's next token and drafts; accept drafts while they equal the mock's own
        next token (the mock target is deterministic), then emit its token after them. Chains
        only (no parents): draft trees need the model runner."""
        if plan.proposal.parents is not None:
            raise ValueError("MockRunner verifies chains of drafts only, not draft trees")
        seqs, num_drafts = plan.decode, plan.num_drafts
        self.calls.append(("verify", len(seqs)))
        drafts = np.asarray(plan.proposal.tokens)
        accepted, rows = np.zeros(len(seqs), np.int64), []
        for i, (s, num) in enumerate(zip(seqs, num_drafts)):
            row = [s.tokens[s.num_computed], *drafts[i, :num].tolist()]
            for j, tok in enumerate(row):
                self._write(s, s.num_computed + j, tok)
            out = []
            for j in range(num + 1):
                out.append(self._sample(s, self._context(s, s.num_computed + j + 1), len(s.generated) + j))
                if j == num or out[-1] != row[j + 1]:
                    accepted[i] = j
                    break
            rows.append(RowOutput(s, len(out), out, release=True))
        self.stats["verify_tokens"] += sum(n + 1 for n in num_drafts)
        return StepOutput(rows, accepted=accepted)

    def warmup(self, buckets) -> int:
        return 0

    def no_work(self) -> None:
        pass
