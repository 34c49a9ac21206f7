"""The serving engine: requests in, tokens out, over a paged KV cache.

  engine = ji.Engine(model, ji.EngineConfig(batching="continuous", page_size=16))
  outs = engine.generate(prompts, ji.SamplingParams(max_tokens=64, temperature=0.0))

Each `step()` asks the scheduler for a mixed batch (one decode token per running sequence plus
prompt chunks), lays it out flat for one jitted forward over the paged cache (donated), samples
the rows that finished their input, and retires finished requests, returning their pages. All
shapes are bucketed to powers of two (decode rows, prefill rows, chunk length, pages per
sequence), so a long run compiles a handful of programs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from typing import Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import model as model_lib
from jaxinfer.generation import (
    RequestOutput, completion_text, next_power_of_2, prepare_prompt, prepare_sampling, stop_reason,
)
from jaxinfer.kv_cache import BatchDescriptor, PageAllocator, PagedKVCache, copy_pages
from jaxinfer.sampling import SamplingBatch, SamplingParams, sample
from jaxinfer.scheduler import Scheduler, Sequence, Status

# How many times each jitted function was traced (= compiled); tests assert on it.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    batching: str = "continuous"  # "continuous": refill slots every step; "static": wait for the batch to drain
    kv_layout: str = "paged"  # "paged": pages on demand; "contiguous": max_seq_len reserved per request up front
    page_size: int = 16  # tokens per KV page (paged layout)
    num_pages: int | None = None  # KV budget in pages (paged) or request slots (contiguous)
    kv_budget_tokens: int | None = None  # KV budget in tokens, when num_pages is not given
    max_batch: int = 8  # sequences running at once
    max_tokens_per_step: int = 256  # token budget of one step (decode tokens + prompt chunks)
    chunked_prefill: bool = True  # split prompts across steps to fit the budget
    prefix_cache: bool = True  # reuse full KV pages of identical prompt prefixes
    max_seq_len: int | None = None  # None: the model's context length
    attention: str = "xla"  # "xla" | "pallas"
    matmul: str = "xla"  # how quantised weights are multiplied: "xla" (dequantise) | "pallas" (kernel)
    decode_steps: int = 1  # decode steps per host round trip when a step has no prompt work
    overlap: bool = True  # dispatch the next decode call before reading the last one's tokens back

    def __post_init__(self):
        if self.batching not in ("continuous", "static"):
            raise ValueError(f"batching={self.batching!r} is not one of 'continuous', 'static'")
        if self.matmul not in ("xla", "pallas"):
            raise ValueError(f"matmul={self.matmul!r} is not one of 'xla', 'pallas'")
        if self.attention not in ("xla", "pallas"):
            raise ValueError(f"attention={self.attention!r} is not one of 'xla', 'pallas'")
        if self.kv_layout not in ("paged", "contiguous"):
            raise ValueError(f"kv_layout={self.kv_layout!r} is not one of 'paged', 'contiguous'")
        if self.kv_budget_tokens is not None and self.kv_budget_tokens < 1:
            raise ValueError(f"kv_budget_tokens={self.kv_budget_tokens} must be >= 1")
        for name in ("page_size", "max_batch", "max_tokens_per_step", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages={self.num_pages} must be >= 1")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len={self.max_seq_len} must be >= 2")


@dataclasses.dataclass(eq=False)
class _Request:
    request_id: int
    prompt: list[int]
    sampling: SamplingParams
    seed: int
    arrival: float
    sequences: list[Sequence]


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl", "matmul_impl"), donate_argnames=("cache",))
def _step(params, cfg, tokens, positions, cache, batch, logits_at, *, attn_impl, matmul_impl):
    """tokens, positions (N,); logits_at (R,) -> logits (R, V), hidden (R, D), cache."""
    TRACE_COUNTS["step"] += 1
    out = model_lib.forward(params, cfg, tokens[None], positions[None], cache, logits_at[None], batch,
                            attn_impl=attn_impl, matmul_impl=matmul_impl)
    return out.logits[0], out.hidden[0], out.cache


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl", "matmul_impl", "num_steps"),
                   donate_argnames=("cache",))
def _multi_decode(params, cfg, tokens, positions, valid, block_tables, cache, sp, steps, *, attn_impl, matmul_impl,
                  num_steps):
    """num_steps decode steps in one program, each sampled token fed to the next step.
    tokens, positions, valid, steps (R,); a row writes K/V only in its first valid[r] steps.
    Returns tokens (num_steps, R) and the cache."""
    TRACE_COUNTS["multi_decode"] += 1
    R = tokens.shape[0]
    page = cache.page_size
    dropped = cache.num_pages * page
    empty = jnp.zeros((0, block_tables.shape[1]), jnp.int32)

    def one(carry, j):
        tokens, cache = carry
        pos = positions + j
        live = j < valid
        slots = jnp.take_along_axis(block_tables, (pos // page)[:, None], axis=1)[:, 0] * page + pos % page
        batch = BatchDescriptor(
            slot_mapping=jnp.where(live, slots, dropped), decode_block_tables=block_tables,
            decode_lens=jnp.where(live, pos + 1, 0), prefill_block_tables=empty,
            prefill_start=jnp.zeros((0,), jnp.int32), prefill_lens=jnp.zeros((0,), jnp.int32),
        )
        out = model_lib.forward(params, cfg, tokens[None], pos[None], cache, jnp.arange(R)[None], batch,
                                attn_impl=attn_impl, matmul_impl=matmul_impl)
        new = sample(out.logits[0], sp, steps + j)
        return (new, out.cache), new

    (_, cache), new_tokens = jax.lax.scan(one, (tokens, cache), jnp.arange(num_steps))
    return new_tokens, cache


@dataclasses.dataclass
class _DecodeCall:
    tokens: jax.Array  # (k, R) sampled tokens, on device until read
    seqs: list[Sequence]  # row i's sequence
    wanted: list[int]  # steps row i runs (later steps of the row are padding)


@jax.jit
def _newest(tokens, last):
    """tokens (k, R), last (R,) -> tokens[last[r], r]: each row's newest sampled token."""
    return jnp.take_along_axis(tokens, last[None], axis=0)[0]


@jax.jit
def _sample_rows(logits, rows, sp, steps):
    TRACE_COUNTS["sample"] += 1
    return sample(logits[rows], sp, steps)


def _sample_seed(seed: int, index: int) -> int:
    """Seed of a request's index-th sample; sample 0 uses the request's own seed."""
    return seed if index == 0 else hash((seed, index)) & 0x7FFFFFFF


class Engine:
    def __init__(self, model, config: EngineConfig | None = None):
        config = config or EngineConfig()
        self.model = model
        self.config = config
        cfg = model.config
        self.max_seq_len = min(config.max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if config.kv_layout == "contiguous":
            # One "page" per request, max_seq_len long, taken at admission: the reservation that
            # serving systems made before PagedAttention. No prefix sharing.
            page_size, prefix_cache = self.max_seq_len, False
        else:
            page_size, prefix_cache = config.page_size, config.prefix_cache
        if config.num_pages is not None:
            num_pages = config.num_pages
        elif config.kv_budget_tokens is not None:
            num_pages = config.kv_budget_tokens // page_size
            if num_pages < 1:
                raise ValueError(
                    f"kv_budget_tokens={config.kv_budget_tokens} is too small for even one request "
                    f"(one {config.kv_layout} allocation is {page_size} tokens)"
                )
        else:
            num_pages = config.max_batch * math.ceil(self.max_seq_len / page_size)
        self.allocator = PageAllocator(num_pages, page_size, prefix_cache)
        self.scheduler = Scheduler(
            self.allocator, policy=config.batching, max_batch=config.max_batch,
            max_tokens_per_step=config.max_tokens_per_step, chunked_prefill=config.chunked_prefill,
        )
        self.cache = PagedKVCache.zeros(cfg, num_pages, page_size, model.dtype)
        self._requests: dict[int, _Request] = {}
        self._next_id = 0
        self.stats: collections.Counter = collections.Counter()  # steps, tokens, preemptions, host_s, device_s, ...
        self._device_s = 0.0
        self.last_run: dict[str, float] = {}  # wall time, tokens and throughput of the last generate()
        self.pages_in_use: list[int] = []  # after each step
        self.kv_usage: list[tuple[int, int]] = []  # after each step: (slots reserved, tokens held)
        self.buckets: set[tuple[int, int, int, int]] = set()  # (decode rows, prefill rows, chunk, pages) shapes run
        self._in_flight: _DecodeCall | None = None  # a decode call dispatched and not yet read back (overlap)
        self._last_dispatched: jax.Array | None = None
        self._idle_since: float | None = None

    # Requests ----------------------------------------------------------------------------------

    def add_request(self, prompt: str | Seq[int], sampling: SamplingParams | None = None, seed: int | None = None) -> int:
        """Queue a request and return its id. Bad input raises ValueError; the engine is unchanged."""
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling is {type(sampling).__name__}, not SamplingParams")
        ids = prepare_prompt(self.model, prompt)
        capacity = self.allocator.num_pages * self.allocator.page_size
        if len(ids) > self.max_seq_len:
            raise ValueError(f"prompt has {len(ids)} tokens, over the engine's max_seq_len={self.max_seq_len}")
        if len(ids) > capacity:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the KV cache holds {capacity} "
                f"({self.allocator.num_pages} pages of {self.allocator.page_size}), it can never run"
            )
        rid = self._next_id
        self._next_id += 1
        seed = sampling.seed if sampling.seed is not None else (rid if seed is None else seed)
        now = time.perf_counter()
        seq = Sequence(rid, 0, list(ids), len(ids), sampling, seed, now)
        self._requests[rid] = _Request(rid, list(ids), sampling, seed, now, [seq])
        self.scheduler.add(seq)
        return rid

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def generate(
        self,
        prompts: Seq[str | Seq[int]],
        sampling: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Serve prompts to completion; outputs in prompt order. A bad prompt gets an output with
        finish_reason "error" and its message; the others are served as if it were not there."""
        if isinstance(prompts, str) or not len(prompts):
            raise ValueError("prompts must be a non-empty list of strings or token-id lists")
        params = prepare_sampling(sampling, len(prompts))
        ids: list[int | RequestOutput] = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            try:
                ids.append(self.add_request(p, sp, seed=i))
            except ValueError as e:
                prompt_ids = list(p) if not isinstance(p, str) else []
                ids.append(RequestOutput(prompt_ids, [], None, "error", {}, error=f"prompts[{i}]: {e}"))
        done: dict[int, RequestOutput] = {}
        start = time.perf_counter()
        while self.has_unfinished():
            for out in self.step():
                done[out.request_id] = out
        wall = time.perf_counter() - start
        outs = [x if isinstance(x, RequestOutput) else done.pop(x) for x in ids]
        generated = sum(len(s.token_ids) for o in outs for s in (o.samples or [o]))
        self.last_run = {"wall_s": wall, "generated_tokens": generated,
                         "throughput_tok_s": generated / wall if wall else 0.0}
        return outs

    def metrics(self) -> dict[str, float]:
        """Run-level figures so far: step and token counts, preemptions, host/device time, KV use."""
        pages = self.pages_in_use or [0]
        return {
            **{k: float(v) for k, v in self.stats.items()},
            "pages_in_use_mean": float(np.mean(pages)),
            "pages_in_use_max": float(max(pages)),
            "num_pages": float(self.allocator.num_pages),
            "kv_waste": self.kv_waste(),
            "prefix_cache_hit_rate": self.allocator.hits / self.allocator.lookups if self.allocator.lookups else 0.0,
            "compiled_programs": float(len(self.buckets)),
        }

    # One iteration -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return the requests that finished in it."""
        start = time.perf_counter()
        self._device_s = 0.0
        if self._in_flight is not None:
            call = self._in_flight
            self._in_flight = self._look_ahead(call)
            finished = self._finish_decode(call)
            if self._in_flight is not None or not self.scheduler.has_work():
                return self._end_step(start, finished)
        else:
            finished = []
        plan = self.scheduler.schedule()
        self.stats["preemptions"] += len(plan.preempted)
        self.stats["peak_running"] = max(self.stats["peak_running"], len(self.scheduler.running))
        finished += plan.finished
        if plan.copies:
            src, dst = zip(*plan.copies)
            self.cache = copy_pages(self.cache, jnp.asarray(src, jnp.int32), jnp.asarray(dst, jnp.int32))
            self.stats["copied_pages"] += len(plan.copies)
        if plan.decode and not plan.prefill and (self.config.decode_steps > 1 or self.config.overlap):
            finished += self._run_multi_decode(plan.decode)
        elif not plan.empty:
            finished += self._run(plan)
        return self._end_step(start, finished)

    def _end_step(self, start: float, finished: list[Sequence]) -> list[RequestOutput]:
        if not self.scheduler.has_work():
            self._idle_since = None  # idle for want of requests from here on, not waiting on the host
        self.pages_in_use.append(self.allocator.num_used)
        live = sum(s.num_computed for s in self.scheduler.running)
        self.kv_usage.append((self.allocator.num_used * self.allocator.page_size, live))
        self.stats["steps"] += 1
        outs = self._collect(finished)
        # device_s: the host blocked on results; host_s: the rest of the step (scheduling, arrays, bookkeeping).
        self.stats["device_s"] += self._device_s
        self.stats["host_s"] += time.perf_counter() - start - self._device_s
        return outs

    def _run(self, plan) -> list[Sequence]:
        cfg, page = self.model.config, self.allocator.page_size
        decode, prefill = plan.decode, plan.prefill
        Rd = next_power_of_2(len(decode)) if decode else 0
        Rp = next_power_of_2(len(prefill)) if prefill else 0
        C = next_power_of_2(max(n for _, n in prefill), 16) if prefill else 0
        scheduled = decode + [s for s, _ in prefill]
        M = next_power_of_2(max(len(s.pages) for s in scheduled), min(4, math.ceil(self.max_seq_len / page)))
        N = Rd + Rp * C
        self.buckets.add((Rd, Rp, C, M))
        dropped = self.allocator.num_pages * page  # slot index past the cache: not written

        tokens = np.zeros(N, np.int32)
        positions = np.zeros(N, np.int32)
        slots = np.full(N, dropped, np.int32)
        d_tables, d_lens = np.zeros((Rd, M), np.int32), np.zeros(Rd, np.int32)
        p_tables, p_start, p_lens = np.zeros((Rp, M), np.int32), np.zeros(Rp, np.int32), np.zeros(Rp, np.int32)
        logits_at = np.zeros(Rd + Rp, np.int32)

        def place(seq, offset, n):
            pos = np.arange(seq.num_computed, seq.num_computed + n)
            tokens[offset : offset + n] = seq.tokens[seq.num_computed : seq.num_computed + n]
            positions[offset : offset + n] = pos
            slots[offset : offset + n] = np.asarray(seq.pages)[pos // page] * page + pos % page

        for i, seq in enumerate(decode):
            place(seq, i, 1)
            d_tables[i, : len(seq.pages)] = seq.pages
            d_lens[i] = seq.num_computed + 1
            logits_at[i] = i
        for j, (seq, n) in enumerate(prefill):
            offset = Rd + j * C
            place(seq, offset, n)
            p_tables[j, : len(seq.pages)] = seq.pages
            p_start[j], p_lens[j] = seq.num_computed, n
            logits_at[Rd + j] = offset + n - 1

        batch = BatchDescriptor(
            slot_mapping=jnp.asarray(slots), decode_block_tables=jnp.asarray(d_tables),
            decode_lens=jnp.asarray(d_lens), prefill_block_tables=jnp.asarray(p_tables),
            prefill_start=jnp.asarray(p_start), prefill_lens=jnp.asarray(p_lens),
        )
        self._mark_dispatch()
        logits, _, self.cache = _step(
            self.model.params, cfg, jnp.asarray(tokens), jnp.asarray(positions), self.cache, batch,
            jnp.asarray(logits_at), attn_impl=self.config.attention, matmul_impl=self.config.matmul,
        )
        self.stats["decode_tokens"] += len(decode)
        self.stats["prefill_tokens"] += sum(n for _, n in prefill)

        # Advance the sequences; collect the ones that sample a token now (row -> sequence).
        samplers: list[tuple[int, Sequence]] = [(i, s) for i, s in enumerate(decode)]
        for seq in decode:
            seq.num_computed += 1
        for j, (seq, n) in enumerate(prefill):
            seq.num_computed += n
            if seq.num_computed == len(seq.tokens):
                samplers.append((Rd + j, seq))
                if not seq.generated and seq.sample_index == 0 and seq.sampling.n > 1:
                    samplers += [(Rd + j, child) for child in self._fork(seq)]
        for seq in scheduled:
            self.scheduler.register_full_pages(seq)
        if not samplers:
            self._last_dispatched = logits
            self._wait(logits)
            return []

        R = next_power_of_2(len(samplers))
        rows = np.zeros(R, np.int32)
        rows[: len(samplers)] = [r for r, _ in samplers]
        seqs = [s for _, s in samplers]
        pad = [SamplingParams(temperature=0.0)] * (R - len(seqs))
        sp = SamplingBatch.from_params([s.sampling for s in seqs] + pad, [s.seed for s in seqs] + [0] * len(pad))
        steps = np.zeros(R, np.int32)
        steps[: len(seqs)] = [len(s.generated) for s in seqs]
        self._last_dispatched = _sample_rows(logits, jnp.asarray(rows), sp, jnp.asarray(steps))
        new_tokens = self._read(self._last_dispatched)

        now = time.perf_counter()
        finished = []
        for seq, tok in zip(seqs, new_tokens[: len(seqs)].tolist()):
            seq.tokens.append(tok)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._stop_reason(seq)
            if reason is not None:
                seq.finish_time = now
                self.scheduler.finish(seq, reason)
                finished.append(seq)
        return finished

    def _run_multi_decode(self, decode: list[Sequence]) -> list[Sequence]:
        """Several decode steps in one device call: pages for them are taken from free pages only
        (no preemption), tokens past a stop are dropped, so outputs equal single-step decoding.
        With overlap on, the call is left in flight and read back by the next step()."""
        ahead = [0] * len(decode)
        wanted = self._wanted(decode, ahead)
        if sum(self.scheduler.pages_for(s, a + w) for s, w, a in zip(decode, wanted, ahead)) > self.allocator.num_free:
            wanted = [1] * len(decode)  # the scheduler reserved one token each
        tokens = np.array([s.tokens[s.num_computed] for s in decode], np.int32)
        call = self._dispatch_decode(decode, wanted, ahead, tokens)
        if self.config.overlap:
            self._in_flight = call
            return []
        return self._finish_decode(call)

    def _wanted(self, seqs: list[Sequence], ahead: list[int]) -> list[int]:
        """Decode steps each sequence can still take in one call, `ahead` tokens past the host's view."""
        return [max(0, min(self.config.decode_steps, s.sampling.max_tokens - len(s.generated) - a,
                           self.max_seq_len + 1 - len(s.tokens) - a)) for s, a in zip(seqs, ahead)]

    def _dispatch_decode(self, decode, wanted, ahead, tokens) -> _DecodeCall:
        """Dispatch one multi-step decode call without reading it back. Row i continues sequence
        decode[i] `ahead[i]` tokens past what the host has seen (tokens still in flight); it runs
        wanted[i] steps (0: the row only pads); `tokens` (host or device) are the rows' inputs."""
        page = self.allocator.page_size
        for s, w, a in zip(decode, wanted, ahead):
            s.pages += self.allocator.allocate(self.scheduler.pages_for(s, a + w))
        k = next_power_of_2(max(wanted))
        R = next_power_of_2(len(decode))
        M = next_power_of_2(max(len(s.pages) for s in decode), min(4, math.ceil(self.max_seq_len / page)))
        self.buckets.add((R, -k, 0, M))
        positions, valid, steps = (np.zeros(R, np.int32) for _ in range(3))
        tables = np.zeros((R, M), np.int32)
        for i, (s, w, a) in enumerate(zip(decode, wanted, ahead)):
            positions[i], valid[i], steps[i] = s.num_computed + a, w, len(s.generated) + a
            tables[i, : len(s.pages)] = s.pages
        if isinstance(tokens, np.ndarray):
            tokens = np.pad(tokens, (0, R - len(tokens)))
        pad = [SamplingParams(temperature=0.0)] * (R - len(decode))
        sp = SamplingBatch.from_params([s.sampling for s in decode] + pad, [s.seed for s in decode] + [0] * len(pad))
        self._mark_dispatch()
        new_tokens, self.cache = _multi_decode(
            self.model.params, self.model.config, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid),
            jnp.asarray(tables), self.cache, sp, jnp.asarray(steps), attn_impl=self.config.attention,
            matmul_impl=self.config.matmul, num_steps=k,
        )
        self.stats["decode_tokens"] += sum(wanted)
        self._last_dispatched = new_tokens
        return _DecodeCall(new_tokens, list(decode), list(wanted))

    def _look_ahead(self, call: _DecodeCall) -> _DecodeCall | None:
        """Dispatch the decode call after `call` before reading `call` back, when the next step is
        sure to be a decode step of the same sequences: nothing waits that a free slot would admit,
        and free pages cover every row. Rows whose sequence stops inside `call` are wasted work,
        dropped when read; a sequence that may have stopped only gives its slot one call later."""
        sched = self.scheduler
        if sched.waiting and len(sched.running) < sched.max_batch and sched.policy == "continuous":
            return None
        if {id(s) for s in sched.running} != {id(s) for s in call.seqs}:
            return None
        ahead = call.wanted
        wanted = self._wanted(call.seqs, ahead)
        needed = sum(self.scheduler.pages_for(s, a + w) for s, w, a in zip(call.seqs, wanted, ahead))
        if not any(wanted) or needed > self.allocator.num_free:
            return None
        last = np.zeros(call.tokens.shape[1], np.int32)
        last[: len(ahead)] = [max(a - 1, 0) for a in ahead]
        tokens = _newest(call.tokens, last)  # each row's newest token, still on device
        self.stats["lookahead_calls"] += 1
        return self._dispatch_decode(call.seqs, wanted, ahead, tokens)

    def _finish_decode(self, call: _DecodeCall) -> list[Sequence]:
        """Read a decode call back and advance its sequences (skipping those already finished)."""
        new_tokens = self._read(call.tokens)  # (k, R)
        now = time.perf_counter()
        finished = []
        for i, (s, w) in enumerate(zip(call.seqs, call.wanted)):
            if s.status is not Status.RUNNING:
                continue
            for j in range(w):
                s.num_computed += 1
                s.tokens.append(int(new_tokens[j, i]))
                reason = self._stop_reason(s)
                if reason is not None:
                    s.finish_time = now
                    self.scheduler.finish(s, reason)
                    finished.append(s)
                    break
            if s.status is Status.RUNNING:
                self.scheduler.register_full_pages(s)
        return finished

    # Device timing: the device is taken to be idle from the moment the host last found it done
    # (a blocking read returned) until the next dispatch, if nothing was queued in between.

    def _mark_dispatch(self) -> None:
        now = time.perf_counter()
        queued = self._last_dispatched is not None and not self._last_dispatched.is_ready()
        if not queued and self._idle_since is not None:
            self.stats["device_idle_s"] += now - self._idle_since
        self._idle_since = None

    def _wait(self, x: jax.Array) -> jax.Array:
        """Block until x is computed; if that drained the device, it is idle from now on."""
        t0 = time.perf_counter()
        jax.block_until_ready(x)
        t1 = time.perf_counter()
        self._device_s += t1 - t0
        if self._last_dispatched is None or self._last_dispatched.is_ready():
            self._idle_since = t1
        return x

    def _read(self, x: jax.Array) -> np.ndarray:
        return np.asarray(self._wait(x))

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The other n - 1 samples of a request share the parent's prompt pages (copy-on-write)."""
        children = []
        for index in range(1, parent.sampling.n):
            child = dataclasses.replace(
                parent, sample_index=index, tokens=list(parent.tokens), pages=list(parent.pages),
                hashes=list(parent.hashes), seed=_sample_seed(parent.seed, index),
            )
            for p in child.pages:
                self.allocator.incref(p)
            self.scheduler.running.append(child)
            self._requests[parent.request_id].sequences.append(child)
            children.append(child)
        return children

    def _stop_reason(self, seq: Sequence) -> str | None:
        # Like the baseline: max_tokens, or the model's context (no position left for the next token).
        budget = min(seq.sampling.max_tokens, self.max_seq_len + 1 - seq.prompt_len)
        return stop_reason(self.model, seq.sampling, seq.generated, budget)

    def kv_waste(self) -> float:
        """Share of reserved KV slots that held no token, averaged over the steps so far."""
        reserved = sum(r for r, _ in self.kv_usage)
        held = sum(min(r, h) for r, h in self.kv_usage)
        return 1.0 - held / reserved if reserved else 0.0

    # Outputs -----------------------------------------------------------------------------------

    def _collect(self, finished: list[Sequence]) -> list[RequestOutput]:
        outs = []
        for rid in dict.fromkeys(s.request_id for s in finished):
            req = self._requests[rid]
            if any(s.status is not Status.FINISHED for s in req.sequences) or len(req.sequences) < req.sampling.n:
                continue
            del self._requests[rid]
            samples = [self._output(req, s) for s in sorted(req.sequences, key=lambda s: s.sample_index)]
            first = samples[0]
            if len(samples) > 1:
                first.samples = samples
            outs.append(first)
        return outs

    def _output(self, req: _Request, seq: Sequence) -> RequestOutput:
        text = completion_text(self.model, seq.sampling, seq.generated)
        k = len(seq.generated)
        first = seq.first_token_time or seq.finish_time or req.arrival
        end = seq.finish_time or first
        metrics = {
            "ttft_s": first - req.arrival,
            "latency_s": end - req.arrival,
            "tpot_s": (end - first) / (k - 1) if k > 1 else 0.0,
            "prompt_tokens": float(len(req.prompt)),
            "generated_tokens": float(k),
            "cached_tokens": float(seq.num_cached_tokens),
            "preemptions": float(seq.num_preemptions),
        }
        return RequestOutput(req.prompt, seq.generated, text, seq.finish_reason, metrics, request_id=req.request_id)
