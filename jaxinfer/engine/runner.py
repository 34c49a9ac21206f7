"""The model runner: params, the paged KV cache and the jitted programs, behind a few verbs.

The engine decides what runs (through the scheduler); the runner turns that into device work:
  step(decode, prefill, samplers)   one mixed step (decode tokens and prompt chunks) laid out
                                    flat, packed into device arrays in one transfer; samples the
                                    rows that finished their input and returns their tokens
  decode(seqs, wanted, ahead, ...)  dispatch up to k decode steps in one program, not read back
  newest(call) / read(call)         the last tokens of a dispatched call, on device / on the host
  verify(seqs, drafts, ...)         one target pass over each sequence's last token and k drafted
                                    tokens, and the acceptance rule (jaxinfer.speculative.accept)
  copy_pages(copies)                copy-on-write of shared pages
  load_adapter(slot, adapter)       write a LoRA adapter into a device slot (jaxinfer.lora)
  warmup(buckets)                   compile every program shape a run can need, up front
Every shape is bucketed to powers of two: ("step", decode rows, prefill rows, chunk, pages per
sequence), ("decode", rows, k steps, pages), ("verify", rows, k drafts, pages); `buckets`
records those run, so a test can count the programs compiled.

With `features=True` the runner also keeps a feature cache: the final-norm hidden state of every
token it computes, stored by KV slot (the pages and slots of the KV cache), which feature-level
drafters (Medusa, EAGLE) read.

With LoRA slots every program also takes them and each token's slot (BatchDescriptor.adapter_ids);
the slots have a fixed size, so adapters add no program shapes.

A model placed on a tensor-parallel mesh (jaxinfer.sharding; model.placement) keeps its params
there; the runner makes the KV cache split over KV heads on the same mesh, the feature cache and
LoRA slots as the sharding rules say, puts every step's host arrays on it replicated, and traces
and runs every program under the mesh. Nothing is re-placed between steps.

The runner also times the device from the host: the time it blocks on results (device_s) and
an estimate of the time the device sat idle waiting for the host (device_idle_s): from the moment
a blocking read found the device drained until the next dispatch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import lora as lora_lib
from jaxinfer import sharding
from jaxinfer.buckets import next_power_of_2
from jaxinfer.engine.requests import model_vocab
from jaxinfer.engine.scheduler import Sequence
from jaxinfer.models import decoder as model_lib
from jaxinfer.models.kv_cache import (
    BatchDescriptor,
    PagedKVCache,
    copy_pages,
    copy_slots,
)
from jaxinfer.sampling.sampler import (
    NONFINITE,
    SamplingBatch,
    TokenLogprobs,
    host_logprobs,
    sample_checked,
)
from jaxinfer.speculative import tree as tree_lib
from jaxinfer.speculative.accept import accept, accept_synthetic, accept_tree
from pallas_kernels.common import pack_tree_mask

# How many times each jitted program was traced (= compiled); tests assert on it.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()

Bucket = tuple  # ("step", decode rows, prefill rows, chunk, pages) | ("decode" | "verify", rows, k, pages)
MIN_CHUNK = 16  # the smallest prefill chunk bucket
MIN_PAGES = 4  # the smallest block-table width bucket


def _store(features, batch, hidden):
    """The feature cache with every token's hidden state (N, D) written at its slot."""
    if features is None:
        return None
    return features.at[batch.slot_mapping].set(hidden.astype(features.dtype), mode="drop")


def _with_adapters(params, lora, lora_batch, impl, lora_impl):
    """The params and projection hook of a step: with LoRA slots, each token's delta is added."""
    if lora is None:
        return params, None
    return lora_lib.with_adapters(params, lora, lora_batch, impl, lora_impl)


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "lora_impl"), donate_argnames=("cache", "features"))
def _step(params, cfg, tokens, cache, features, batch, sp, steps, lora=None, *, impl, lora_impl="xla"):
    """tokens (N,) laid out as `batch` says; sp, steps (R,) each logits row's sampling and token
    index; lora: the adapter slots (jaxinfer.lora.LoraWeights) or None -> a token sampled from
    each of the R rows at batch.logits_at (Sampled: NONFINITE where its logits are not finite;
    log-probabilities when sp asks), their logits (R, V) and hidden states (R, D), the cache and
    the feature cache (None: none kept)."""
    TRACE_COUNTS["step"] += 1
    params, project = _with_adapters(params, lora, lora_lib.LoraBatch.from_descriptor(batch), impl, lora_impl)
    out = model_lib.forward_paged(params, cfg, tokens, cache, batch, impl=impl, all_hidden=features is not None,
                                  project=project)
    hidden = out.hidden if features is None else out.hidden[batch.logits_at]
    return sample_checked(out.logits, sp, steps), out.logits, hidden, out.cache, _store(features, batch, out.hidden)


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "synthetic", "lora_impl"),
                   donate_argnames=("cache", "features"))
def _verify(params, cfg, last, drafts, num_drafts, cache, features, batch, sp, steps, lora=None, parents=None, *,
            impl, synthetic, lora_impl="xla"):
    """One target pass over rows [last, d_1, .., d_k] (batch: R prefill rows of k + 1 tokens) and
    the acceptance rule -> accepted (R,), Sampled with tokens (R, k + 1) (and their
    log-probabilities when sp asks), the cache and the feature cache.
    synthetic: None, or the probability a synthetic drafter's token is accepted (not lossless).
    parents (R, k): the drafts are a tree (jaxinfer.speculative.tree): positions by depth, attention
    by ancestry, the tree rule, and the accepted path's K/V and features compacted into place.
    A row whose logits are not finite at a position j <= accepted stops there: accepted becomes j
    and tokens[j] NONFINITE (a tree: any non-finite node stops the row at its first token)."""
    TRACE_COUNTS["verify"] += 1
    R, k = drafts.shape
    tokens = jnp.concatenate([last[:, None], drafts], axis=1).reshape(-1)  # (R * (k + 1),)
    if parents is not None:
        visible, depth = tree_lib.ancestry(parents, num_drafts)
        batch = batch.replace(positions=(batch.prefill_start[:, None] + depth).reshape(-1),
                              prefill_tree_mask=pack_tree_mask(visible))
    params, project = _with_adapters(params, lora, lora_lib.LoraBatch.from_descriptor(batch), impl, lora_impl)
    out = model_lib.forward_paged(params, cfg, tokens, cache, batch, impl=impl, all_hidden=features is not None,
                                  project=project)
    logits = out.logits.reshape(R, k + 1, -1)
    cache, features = out.cache, _store(features, batch, out.hidden)
    if parents is not None:
        accepted, emitted, path = accept_tree(logits, drafts, parents, num_drafts, sp, steps)
        dropped = cache.num_pages * cache.page_size
        src, dst = tree_lib.compaction(batch.slot_mapping.reshape(R, k + 1), path, accepted, dropped)
        cache = copy_slots(cache, src, dst)
        if features is not None:
            features = features.at[dst].set(features.at[src].get(mode="clip"), mode="drop")
    elif synthetic is None:
        accepted, emitted = accept(logits, drafts, num_drafts, sp, steps)
    else:
        accepted, emitted = accept_synthetic(logits, num_drafts, sp, steps, synthetic)
    position = jnp.arange(k + 1)[None, :]
    ok = jnp.all(jnp.isfinite(logits), axis=-1) | (position > num_drafts[:, None])  # (R, k + 1); padding is ok
    first_bad = jnp.where(jnp.all(ok, axis=1), k + 1, 0 if parents is not None else jnp.argmin(ok, axis=1))  # (R,)
    accepted = jnp.minimum(accepted, first_bad)
    emitted = dataclasses.replace(emitted, tokens=jnp.where(position == first_bad[:, None], NONFINITE, emitted.tokens))
    return accepted, emitted, cache, features


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "num_steps", "lora_impl"), donate_argnames=("cache",))
def _multi_decode(params, cfg, tokens, positions, valid, block_tables, cache, sp, steps, lora=None, adapter_ids=None,
                  *, impl, num_steps, lora_impl="xla"):
    """num_steps decode steps in one program, each sampled token fed to the next step (and, when sp
    has processors, counted by them as generated). tokens, positions, valid, steps, adapter_ids
    (R,); a row writes K/V only in its first valid[r] steps. Returns Sampled with tokens
    (num_steps, R) (NONFINITE where a row's logits are not finite) and the cache."""
    TRACE_COUNTS["multi_decode"] += 1
    R = tokens.shape[0]
    adapter_ids = jnp.full((R,), -1, jnp.int32) if adapter_ids is None else adapter_ids
    params, project = _with_adapters(params, lora, lora_lib.LoraBatch(adapter_ids, adapter_ids[:0]), impl, lora_impl)
    page = cache.page_size
    dropped = cache.num_pages * page
    empty = jnp.zeros((0, block_tables.shape[1]), jnp.int32)

    def one(carry, j):
        tokens, drawn, cache = carry
        pos = positions + j
        live = j < valid
        slots = jnp.take_along_axis(block_tables, (pos // page)[:, None], axis=1)[:, 0] * page + pos % page
        batch = BatchDescriptor(
            positions=pos, logits_at=jnp.arange(R), slot_mapping=jnp.where(live, slots, dropped),
            decode_block_tables=block_tables, decode_lens=jnp.where(live, pos + 1, 0), prefill_block_tables=empty,
            prefill_start=jnp.zeros((0,), jnp.int32), prefill_lens=jnp.zeros((0,), jnp.int32), adapter_ids=adapter_ids,
        )
        out = model_lib.forward_paged(params, cfg, tokens, cache, batch, impl=impl, project=project)
        new = sample_checked(out.logits, sp, steps + j, drawn)
        if drawn is not None:
            drawn = drawn.at[:, j].set(new.tokens)
        return (jnp.maximum(new.tokens, 0), drawn, out.cache), new  # a failed row runs on, on token 0 (it is failed)

    drawn = None if sp.processors is None else jnp.full((R, num_steps), -1, jnp.int32)
    (_, _, cache), new = jax.lax.scan(one, (tokens, drawn, cache), jnp.arange(num_steps))
    return new, cache


@functools.partial(jax.jit, static_argnames="page_size", donate_argnames="features")
def _copy_slots(features, src, dst, *, page_size):
    """The feature cache with whole pages src[i] copied to dst[i]."""
    offsets = jnp.arange(page_size)
    return features.at[(dst[:, None] * page_size + offsets).reshape(-1)].set(
        features[(src[:, None] * page_size + offsets).reshape(-1)])


@jax.jit
def _newest(tokens, last):
    """tokens (k, R), last (R,) -> tokens[last[r], r]: each row's newest sampled token."""
    return jnp.take_along_axis(tokens, last[None], axis=0)[0]


@jax.jit
def _sample_rows(logits, rows, sp, steps):
    """More samples from given rows of a step's logits (the other n - 1 samples of a prompt)."""
    TRACE_COUNTS["sample"] += 1
    return sample_checked(logits[rows], sp, steps)


@functools.partial(jax.jit, donate_argnames=("cache", "features"))
def _clear_pages(cache, features, pages):
    """The cache (and feature cache) with pages (n,) zeroed; indices past the cache are ignored."""
    TRACE_COUNTS["clear"] += 1
    cache = jax.tree.map(lambda x: x.at[:, :, pages].set(0, mode="drop"), cache)
    if features is None:
        return cache, None
    page_size = cache.page_size
    slots = (pages[:, None] * page_size + jnp.arange(page_size)).reshape(-1)
    return cache, features.at[slots].set(0, mode="drop")


@dataclasses.dataclass
class DecodeCall:
    """A dispatched decode call: row i continues seqs[i] for wanted[i] steps (later steps pad)."""

    tokens: jax.Array  # (k, R) sampled tokens, on device until read
    seqs: list[Sequence]
    wanted: list[int]
    logprobs: TokenLogprobs | None = None  # (k, R, ...) when asked, on device until read


@dataclasses.dataclass
class StepOutput:
    tokens: np.ndarray  # (S,) the token sampled for each requested row
    hidden: jax.Array | None = None  # (S, D) their final-norm hidden states, on device, when asked
    logprobs: TokenLogprobs | None = None  # (S, ...) on the host, when some row asked


def _abstract(x) -> jax.ShapeDtypeStruct:
    """x's shape, dtype and, for a placed array, its sharding (the program compiled for it)."""
    placed = isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=x.sharding if placed else None)


def _powers_of_2(n: int) -> list[int]:
    """1, 2, 4, ... up to next_power_of_2(n)."""
    return [1 << i for i in range(next_power_of_2(n).bit_length())]


class ModelRunner:
    def __init__(self, model, num_pages: int, page_size: int, max_seq_len: int, max_batch: int,
                 impl: model_lib.Impl, features: bool = False, kv_dtype: str | None = None,
                 lora: lora_lib.SlotConfig | None = None):
        """max_batch: sequences running at once; a step with prompt work always has room for that
        many decode rows, so the decode row count is no part of its shape. features: keep the
        feature cache (num_pages * page_size, D). kv_dtype: None (the model dtype), "int8" or "fp8".
        lora: the LoRA adapter slots to hold (None: no adapters)."""
        self.model, self.impl = model, impl
        self.mesh = None if model.placement is None else model.placement.mesh
        self.lora_impl = "xla" if lora is None else lora.impl
        cfg, dtype = model.config, model.dtype
        self.lora = None if lora is None else lora_lib.LoraWeights.zeros(cfg, lora.num_slots, lora.rank, dtype)
        self.page_size, self.max_seq_len = page_size, max_seq_len
        self.vocab = model_vocab(model)
        self.decode_rows = next_power_of_2(max_batch)
        # One page past the allocator's, never written: block-table padding points at it, so a row's padding
        # reads zeros, not another sequence's page (attention weighs the padding by zero, and 0 * NaN is NaN).
        self.pad_page = num_pages
        features_shape = (num_pages * page_size, cfg.hidden_size)
        if self.mesh is None:
            self.cache = PagedKVCache.zeros(cfg, num_pages + 1, page_size, dtype, kv_dtype)
            self.features = jnp.zeros(features_shape, dtype) if features else None
        else:
            self.cache = sharding.zeros_cache(cfg, num_pages + 1, page_size, dtype, kv_dtype, self.mesh)
            self.features = sharding.zeros(features_shape, dtype, self.mesh) if features else None
            if self.lora is not None:
                self.lora = sharding.put(self.lora, sharding.lora_specs(self.lora), self.mesh)
        # Allocate the cache now: dispatched asynchronously, its zero-fill (GBs for a long context)
        # would otherwise land in the first request's time to first token.
        jax.block_until_ready((self.cache, self.features))
        self.buckets: set[Bucket] = set()
        self.stats: collections.Counter = collections.Counter()  # device_s, device_idle_s, copied_pages, ...
        self.stats["adapter_device_bytes"] = 0 if self.lora is None else self.lora.nbytes
        self._last_dispatched: jax.Array | None = None
        self._idle_since: float | None = None

    @property
    def num_pages(self) -> int:
        """Pages the allocator hands out (the cache holds one more: the padding page)."""
        return self.pad_page

    @property
    def dropped_slot(self) -> int:
        """A slot index past the cache: K/V written there are dropped."""
        return self.cache.num_pages * self.page_size

    def _put(self, tree):
        """Host arrays onto the device in one transfer (on a mesh: replicated on every device)."""
        return jax.device_put(tree, None if self.mesh is None else sharding.replicated(self.mesh))

    def sampling_batch(self, seqs: list[Sequence | None], rows: int) -> SamplingBatch:
        """The sequences' sampling parameters and logits processors' arrays, padded with greedy
        rows (None: a padding row too) to `rows`."""
        return SamplingBatch.from_rows(seqs, rows, self.vocab)

    def pages_bucket(self, pages: int) -> int:
        return next_power_of_2(pages, min(MIN_PAGES, math.ceil(self.max_seq_len / self.page_size)))

    # Verbs -------------------------------------------------------------------------------------

    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        src, dst = self._put(tuple(np.asarray(x, np.int32) for x in zip(*copies)))
        with sharding.use_mesh(self.mesh):
            self.cache = copy_pages(self.cache, src, dst)
            if self.features is not None:
                self.features = _copy_slots(self.features, src, dst, page_size=self.page_size)
        self.stats["copied_pages"] += len(copies)

    def clear_pages(self, pages: list[int]) -> None:
        """Zero pages (and their feature slots) that a failed request wrote, so that no NaN or
        infinity it left there reaches the page's next owner: attention weighs a page's unwritten
        slots by zero, and zero times NaN is NaN. (One small program, compiled when first needed.)"""
        padded = np.full(next_power_of_2(len(pages)), self.cache.num_pages, np.int32)
        padded[: len(pages)] = pages
        with sharding.use_mesh(self.mesh):
            self.cache, self.features = _clear_pages(self.cache, self.features, self._put(padded))

    def load_adapter(self, slot: int, adapter: lora_lib.LoraAdapter | None) -> None:
        """Write an adapter (None: nothing) into a device slot, between steps; blocks until written."""
        if adapter is not None and self.model.placement is not None:  # wk / wv widened like the weights
            adapter = sharding.widen_adapter(adapter, self.model.config.head_dim, self.model.placement.kv_replicas)
        with sharding.use_mesh(self.mesh):
            self.lora = jax.block_until_ready(lora_lib.write_slot(self.lora, slot, adapter, self.model.config))

    def step(self, decode: list[Sequence], prefill: list[tuple[Sequence, int]],
             samplers: list[tuple[int, Sequence]], *, hidden: bool = False) -> StepOutput:
        """Run one mixed step: one token of each decode sequence, then a chunk of n prompt tokens
        of each prefill sequence, from each sequence's num_computed on. `samplers` (plan row,
        sequence) name the rows to sample (plan rows: decode first, then prefill; a row may be
        sampled for several sequences, e.g. the n samples of one prompt)."""
        page = self.page_size
        Rp = next_power_of_2(len(prefill)) if prefill else 0
        Rd = max(next_power_of_2(len(decode)), self.decode_rows) if Rp else next_power_of_2(len(decode))
        C = next_power_of_2(max(n for _, n in prefill), MIN_CHUNK) if prefill else 0
        scheduled = decode + [s for s, _ in prefill]
        M = self.pages_bucket(max(len(s.pages) for s in scheduled))
        N = Rd + Rp * C
        self.buckets.add(("step", Rd, Rp, C, M))
        tokens, positions, adapter_ids = np.zeros(N, np.int32), np.zeros(N, np.int32), np.full(N, -1, np.int32)
        slots = np.full(N, self.dropped_slot, np.int32)
        d_tables, d_lens = np.full((Rd, M), self.pad_page, np.int32), np.zeros(Rd, np.int32)
        p_tables, p_start = np.full((Rp, M), self.pad_page, np.int32), np.zeros(Rp, np.int32)
        p_lens = np.zeros(Rp, np.int32)
        logits_at = np.zeros(Rd + Rp, np.int32)

        def place(seq, offset, n):
            pos = np.arange(seq.num_computed, seq.num_computed + n)
            tokens[offset : offset + n] = seq.tokens[seq.num_computed : seq.num_computed + n]
            positions[offset : offset + n] = pos
            slots[offset : offset + n] = np.asarray(seq.pages)[pos // page] * page + pos % page

        for i, seq in enumerate(decode):
            place(seq, i, 1)
            adapter_ids[i] = seq.lora_slot
            d_tables[i, : len(seq.pages)] = seq.pages
            d_lens[i] = seq.num_computed + 1
            logits_at[i] = i
        for j, (seq, n) in enumerate(prefill):
            offset = Rd + j * C
            place(seq, offset, n)
            adapter_ids[offset : offset + C] = seq.lora_slot  # the row's padding too: one adapter per row
            p_tables[j, : len(seq.pages)] = seq.pages
            p_start[j], p_lens[j] = seq.num_computed, n
            logits_at[Rd + j] = offset + n - 1

        batch = BatchDescriptor(positions=positions, logits_at=logits_at, slot_mapping=slots,
                                decode_block_tables=d_tables, decode_lens=d_lens, prefill_block_tables=p_tables,
                                prefill_start=p_start, prefill_lens=p_lens, adapter_ids=adapter_ids)
        # Every logits row is sampled in the step with its sequence's parameters (padding: greedy).
        row_seqs = decode + [None] * (Rd - len(decode)) + [s for s, _ in prefill]
        row_seqs += [None] * (Rd + Rp - len(row_seqs))
        sp = self.sampling_batch(row_seqs, Rd + Rp)
        steps = np.asarray([len(s.generated) if s else 0 for s in row_seqs], np.int32)
        tokens, batch, sp, steps = self._put((tokens, batch, sp, steps))  # one transfer
        self._mark_dispatch()
        with sharding.use_mesh(self.mesh):
            sampled, logits, hidden_states, self.cache, self.features = _step(
                self.model.params, self.model.config, tokens, self.cache, self.features, batch, sp, steps, self.lora,
                impl=self.impl, lora_impl=self.lora_impl)
        self._last_dispatched = sampled.tokens
        self.stats["decode_tokens"] += len(decode)
        self.stats["prefill_tokens"] += sum(n for _, n in prefill)
        rows = [i if i < len(decode) else Rd + i - len(decode) for i, _ in samplers]
        own = [row_seqs[r] is seq for r, (_, seq) in zip(rows, samplers)]
        if not samplers:
            self._wait(sampled.tokens)
            return StepOutput(np.zeros(0, np.int32))
        new_tokens = self._read(sampled.tokens)[rows]
        logprobs = host_logprobs(self._read_tree(sampled.logprobs), rows, [s.sampling for _, s in samplers])
        others = [(r, seq) for r, (_, seq), o in zip(rows, samplers, own) if not o]
        if others:  # forked samples: more draws from their parent's row
            R = next_power_of_2(len(others))
            idx, steps = np.zeros(R, np.int32), np.zeros(R, np.int32)
            idx[: len(others)] = [r for r, _ in others]
            steps[: len(others)] = [len(s.generated) for _, s in others]
            with sharding.use_mesh(self.mesh):
                extra = self._read_tree(_sample_rows(logits, *self._put((idx, self.sampling_batch(
                    [s for _, s in others], R), steps))))
            forked = [i for i, o in enumerate(own) if not o]
            new_tokens[forked] = extra.tokens[: len(others)]
            drawn = host_logprobs(extra.logprobs, range(len(others)), [s.sampling for _, s in others])
            for i, lp in zip(forked, drawn):
                logprobs[i] = lp
        return StepOutput(new_tokens, hidden_states[np.asarray(rows, np.int32)] if hidden else None,
                          logprobs if sampled.logprobs is not None else None)

    def decode(self, seqs: list[Sequence], wanted: list[int], ahead: list[int], tokens=None) -> DecodeCall:
        """Dispatch one multi-step decode call without reading it back. Row i continues seqs[i]
        `ahead[i]` tokens past what the host has seen (tokens still in flight) and runs wanted[i]
        steps (0: the row only pads). `tokens` (on device, from `newest`) are the rows' inputs;
        None: each sequence's next uncomputed token. The pages must be reserved already."""
        k = next_power_of_2(max(wanted))
        R = next_power_of_2(len(seqs))
        M = self.pages_bucket(max(len(s.pages) for s in seqs))
        self.buckets.add(("decode", R, k, M))
        positions, valid, steps = (np.zeros(R, np.int32) for _ in range(3))
        tables, adapter_ids = np.full((R, M), self.pad_page, np.int32), np.full(R, -1, np.int32)
        for i, (s, w, a) in enumerate(zip(seqs, wanted, ahead)):
            positions[i], valid[i], steps[i], adapter_ids[i] = s.num_computed + a, w, len(s.generated) + a, s.lora_slot
            tables[i, : len(s.pages)] = s.pages
        if tokens is None:
            tokens = np.zeros(R, np.int32)
            tokens[: len(seqs)] = [s.tokens[s.num_computed] for s in seqs]
            host = self._put((tokens, positions, valid, tables, steps, self.sampling_batch(seqs, R), adapter_ids))
        else:  # the last call's newest tokens, already on the device
            host = (tokens, *self._put((positions, valid, tables, steps, self.sampling_batch(seqs, R), adapter_ids)))
        self._mark_dispatch()
        with sharding.use_mesh(self.mesh):
            new, self.cache = _multi_decode(self.model.params, self.model.config, host[0], host[1], host[2], host[3],
                                            self.cache, host[5], host[4], self.lora, host[6], impl=self.impl,
                                            num_steps=k, lora_impl=self.lora_impl)
        self.stats["decode_tokens"] += sum(wanted)
        self._last_dispatched = new.tokens
        return DecodeCall(new.tokens, list(seqs), list(wanted), new.logprobs)

    def newest(self, call: DecodeCall) -> jax.Array:
        """Each row's newest token of a dispatched call, left on device (the next call's input)."""
        last = np.zeros(call.tokens.shape[1], np.int32)
        last[: len(call.wanted)] = [max(w - 1, 0) for w in call.wanted]
        with sharding.use_mesh(self.mesh):
            return self._put(_newest(call.tokens, self._put(last)))  # replicated, as the next call was compiled

    def read(self, call: DecodeCall) -> tuple[np.ndarray, list | None]:
        """The call's tokens (k, R) on the host (blocks until computed), and when asked their
        log-probabilities: [j][i] the Logprob of row i's j-th token (None for a row that did not ask)."""
        tokens = self._read(call.tokens)
        if call.logprobs is None:
            return tokens, None
        lp, params = self._read_tree(call.logprobs), [s.sampling for s in call.seqs]
        return tokens, [host_logprobs(jax.tree.map(lambda x: x[j], lp), range(len(params)), params)
                        for j in range(tokens.shape[0])]

    def verify(self, seqs: list[Sequence], drafts, num_drafts: list[int], synthetic: float | None = None,
               parents=None) -> tuple[np.ndarray, np.ndarray, list | None]:
        """One target pass over each sequence's next token and its drafts (R, k) (on the host or
        device; rows past len(seqs) pad), writing their K/V from num_computed on, then the
        acceptance rule. Returns accepted (n,) and tokens (n, k + 1) on the host: row i emits
        tokens[i, :accepted[i] + 1]; and when asked their log-probabilities ([i][j] the Logprob of
        tokens[i, j]). parents (R, k): the drafts are a tree (tree.py), its accepted path's K/V
        already compacted into place. The pages must be reserved already."""
        n, page = len(seqs), self.page_size
        R, k = drafts.shape
        C = k + 1
        M = self.pages_bucket(max(len(s.pages) for s in seqs))
        self.buckets.add(("verify", R, k, M))
        positions, slots = np.zeros((R, C), np.int32), np.full((R, C), self.dropped_slot, np.int32)
        tables, start, lens = np.full((R, M), self.pad_page, np.int32), np.zeros(R, np.int32), np.zeros(R, np.int32)
        last, valid, adapter_ids = np.zeros(R, np.int32), np.zeros(R, np.int32), np.full(R, -1, np.int32)
        for i, (s, d) in enumerate(zip(seqs, num_drafts)):
            pos = s.num_computed + np.arange(d + 1)
            positions[i, : d + 1] = pos
            slots[i, : d + 1] = np.asarray(s.pages)[pos // page] * page + pos % page
            tables[i, : len(s.pages)] = s.pages
            start[i], lens[i], last[i], valid[i] = s.num_computed, d + 1, s.tokens[s.num_computed], d
            adapter_ids[i] = s.lora_slot
        batch = BatchDescriptor(
            positions=positions.reshape(-1), logits_at=np.arange(R * C, dtype=np.int32),
            slot_mapping=slots.reshape(-1), decode_block_tables=np.zeros((0, M), np.int32),
            decode_lens=np.zeros(0, np.int32), prefill_block_tables=tables, prefill_start=start, prefill_lens=lens,
            adapter_ids=np.repeat(adapter_ids, C))
        steps = np.zeros(R, np.int32)
        steps[:n] = [len(s.generated) for s in seqs]
        host = self._put((last, valid, batch, self.sampling_batch(seqs, R), steps))
        if self.mesh is not None:  # the drafter's arrays (host or one device) onto the mesh
            drafts, parents = self._put((drafts, parents))
        self._mark_dispatch()
        with sharding.use_mesh(self.mesh):
            accepted, out, self.cache, self.features = _verify(
                self.model.params, self.model.config, host[0], drafts, host[1], self.cache, self.features, host[2],
                host[3], host[4], self.lora, parents, impl=self.impl, synthetic=synthetic, lora_impl=self.lora_impl)
        self._last_dispatched = out.tokens
        accepted, tokens = self._read(accepted)[:n], self._read(out.tokens)[:n]
        self.stats["verify_tokens"] += sum(d + 1 for d in num_drafts)
        if out.logprobs is None:
            return accepted, tokens, None
        lp, params = self._read_tree(out.logprobs), [s.sampling for s in seqs]
        return accepted, tokens, [host_logprobs(jax.tree.map(lambda x: x[i], lp), range(C), [params[i]] * C)
                                  for i in range(n)]

    # Warm-up -----------------------------------------------------------------------------------

    def warmup(self, buckets: list[Bucket], synthetic: float | None = None, tree: bool = False) -> int:
        """Compile the program of every bucket ahead of time, without running anything; returns
        how many programs this traced. Verify passes are compiled for the synthetic rate, or draft
        trees. Programs for requests with logits processors or log-probabilities compile when first
        used. (Forked samples, n > 1, draw through a small extra program; a drafter's own programs
        compile when first used.)"""
        with sharding.use_mesh(self.mesh):
            return self._warmup(buckets, synthetic, tree)

    def _warmup(self, buckets: list[Bucket], synthetic: float | None, tree: bool) -> int:
        before = sum(TRACE_COUNTS.values())
        cfg, impl = self.model.config, self.impl
        params, cache, features, lora = jax.tree.map(_abstract, (self.model.params, self.cache, self.features,
                                                                 self.lora))
        put = None if self.mesh is None else sharding.replicated(self.mesh)  # as _put places host arrays
        i32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32, sharding=put)
        sp = lambda R: jax.tree.map(_abstract, self._put(self.sampling_batch([], R)))  # noqa: E731
        for kind, *shape in buckets:
            if kind == "verify":  # R rows of the next token and k drafts
                R, k, M = shape
                C = k + 1
                batch = BatchDescriptor(positions=i32((R * C,)), logits_at=i32((R * C,)), slot_mapping=i32((R * C,)),
                                        decode_block_tables=i32((0, M)), decode_lens=i32((0,)),
                                        prefill_block_tables=i32((R, M)), prefill_start=i32((R,)),
                                        prefill_lens=i32((R,)), adapter_ids=i32((R * C,)))
                _verify.lower(params, cfg, i32((R,)), i32((R, k)), i32((R,)), cache, features, batch, sp(R),
                              i32((R,)), lora, i32((R, k)) if tree else None, impl=impl, synthetic=synthetic,
                              lora_impl=self.lora_impl).compile()
                continue
            if kind == "decode":  # a k-step decode call of R rows, and the pick of its rows' newest tokens
                R, k, M = shape
                call = _multi_decode.lower(params, cfg, i32((R,)), i32((R,)), i32((R,)), i32((R, M)), cache, sp(R),
                                           i32((R,)), lora, i32((R,)), impl=impl, num_steps=k,
                                           lora_impl=self.lora_impl).compile()
                tokens = call.output_shardings[0].tokens
                _newest.lower(jax.ShapeDtypeStruct((k, R), jnp.int32, sharding=tokens if put else None),
                              i32((R,))).compile()
                continue
            Rd, Rp, C, M = shape
            N = Rd + Rp * C
            batch = BatchDescriptor(positions=i32((N,)), logits_at=i32((Rd + Rp,)), slot_mapping=i32((N,)),
                                    decode_block_tables=i32((Rd, M)), decode_lens=i32((Rd,)),
                                    prefill_block_tables=i32((Rp, M)), prefill_start=i32((Rp,)),
                                    prefill_lens=i32((Rp,)), adapter_ids=i32((N,)))
            _step.lower(params, cfg, i32((N,)), cache, features, batch, sp(Rd + Rp), i32((Rd + Rp,)), lora, impl=impl,
                        lora_impl=self.lora_impl).compile()
        return sum(TRACE_COUNTS.values()) - before

    # Device timing: the device is taken to be idle from the moment the host last found it done
    # (a blocking read returned) until the next dispatch, if nothing was queued in between.

    def _mark_dispatch(self) -> None:
        now = time.perf_counter()
        queued = self._last_dispatched is not None and not self._last_dispatched.is_ready()
        if not queued and self._idle_since is not None:
            self.stats["device_idle_s"] += now - self._idle_since
        self._idle_since = None

    def no_work(self) -> None:
        """The device is idle for want of requests from here on, not waiting on the host."""
        self._idle_since = None

    def _wait(self, x: jax.Array) -> jax.Array:
        """Block until x is computed; if that drained the device, it is idle from now on."""
        t0 = time.perf_counter()
        jax.block_until_ready(x)
        t1 = time.perf_counter()
        self.stats["device_s"] += t1 - t0
        if self._last_dispatched is None or self._last_dispatched.is_ready():
            self._idle_since = t1
        return x

    def _read(self, x: jax.Array) -> np.ndarray:
        return sharding.to_host(self._wait(x))

    def _read_tree(self, tree):
        """Every array of a pytree (a Sampled, TokenLogprobs, or None) on the host."""
        return jax.tree.map(self._read, tree)


def possible_buckets(*, max_batch: int, max_tokens_per_step: int, chunked_prefill: bool, decode_steps: int,
                     multi_step_decode: bool, max_seq_len: int, max_prompt_len: int, max_len: int, page_size: int,
                     num_pages: int, speculative_tokens: int = 0) -> list[Bucket]:
    """Every program shape the engine can run under these limits (n = 1 sampling): steps with
    prompt work (max_batch decode rows, up to max_batch prefill rows, chunks up to the token
    budget or, unchunked, a whole prompt, block tables up to the longest sequence's pages, but
    not narrower than its chunk needs), decode-only steps when decode does not run as calls, and
    k-step decode calls, or, with speculative_tokens = k, verify passes of k drafts. Sequences are at
    most max_len tokens (prompt and output) of the engine's max_seq_len, prompts at most max_prompt_len."""
    B = next_power_of_2(max_batch)
    min_pages = min(MIN_PAGES, math.ceil(max_seq_len / page_size))
    max_pages = min(math.ceil(min(max_len, max_seq_len) / page_size), num_pages)
    pages = sorted({next_power_of_2(m, min_pages) for m in range(1, max_pages + 1)})
    max_chunk = min(max_tokens_per_step, max_prompt_len) if chunked_prefill else max_prompt_len
    out: list[Bucket] = []
    chunks = sorted({max(C, MIN_CHUNK) for C in _powers_of_2(max_chunk)})
    for Rp, C in itertools.product(_powers_of_2(max_batch), chunks):
        if chunked_prefill and Rp // 2 >= max_tokens_per_step:
            continue  # more prompt rows than tokens in the budget
        shortest = C // 2 + 1 if C > MIN_CHUNK else 1  # the shortest chunk that buckets to C
        need = next_power_of_2(math.ceil(shortest / page_size), min_pages)
        out += [("step", B, Rp, C, M) for M in pages if M >= need]
    if speculative_tokens:
        out += [("verify", R, speculative_tokens, M) for R in _powers_of_2(max_batch) for M in pages]
    elif multi_step_decode:
        out += [("decode", R, k, M) for R in _powers_of_2(max_batch) for k in _powers_of_2(decode_steps)
                for M in pages]
    else:
        out += [("step", R, 0, 0, M) for R in _powers_of_2(max_batch) for M in pages]
    return out
