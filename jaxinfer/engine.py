"""The serving engine: the request lifecycle over a paged KV cache.

  engine = ji.Engine(model, ji.EngineConfig(batching="continuous", page_size=16))
  outs = engine.generate(prompts, ji.SamplingParams(max_tokens=64, temperature=0.0))

Each `step()` asks the scheduler for a mixed batch (one decode token per running sequence plus
prompt chunks), has the runner (jaxinfer/runner.py) run it as one jitted forward over the
paged cache, appends the sampled tokens, and retires finished requests, returning their pages.
A step with decode work only becomes a decode call of up to `decode_steps` steps
(jaxinfer/pipeline.py); with `overlap`, the next call is dispatched before the last one's tokens
are read back. LoRA adapters (`add_adapter`; a request's `adapter=`) live in an adapter registry
(jaxinfer/lora/registry.py) that the scheduler asks for a device slot as it admits a sequence.
With EngineConfig(tp=N) the model is placed on a tensor-parallel mesh once, at construction
(jaxinfer.sharding), and the runner's programs run over it; the host side is unchanged.

The request lifecycle, for callers that serve requests as they come (the contract a server is
written against):
  add_request(prompt, sampling, adapter=)  queue a request; bad input raises ValueError
  step()          one iteration; returns a RequestOutput for every request that got new tokens or
                  finished in it: `finished` False (finish_reason None, tokens and text so far)
                  or True (the final output)
  stream(prompt)  a generator of one request's outputs, each time it has new tokens, the last one
                  finished; closing it early aborts the request
  abort(id)       end a request now ("aborted"); its pages come back at once
A request past its deadline (SamplingParams.timeout_s, or EngineConfig.request_timeout_s) ends
with "timeout" at the start of the next step, its tokens so far kept. A request whose logits turn
NaN or infinite ends with "error" (the sampler flags the row on the device, in the token array
read back anyway); its pages are zeroed before they are reused and the rest of the batch goes on.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Sequence as Seq

import numpy as np

from jaxinfer import model as model_lib
from jaxinfer import sharding
from jaxinfer.engine_config import EngineConfig
from jaxinfer.kv_cache import PageAllocator
from jaxinfer.lifecycle import Request, RequestTable, sample_seed
from jaxinfer.lora import AdapterRegistry, LoraAdapter
from jaxinfer.requests import RequestOutput, StopRules, prepare_adapters, prepare_prompt, prepare_sampling
from jaxinfer.pipeline import DecodePipeline
from jaxinfer.runner import ModelRunner, possible_buckets
from jaxinfer.sampling import NONFINITE, SamplingParams
from jaxinfer.scheduler import Scheduler, Sequence, Status
from jaxinfer.speculative import load_drafter
from jaxinfer.speculative.decoder import SpeculativeDecoder


log = logging.getLogger("jaxinfer")


class Engine:
    def __init__(self, model, config: EngineConfig | None = None, *, runner=ModelRunner):
        """`runner(model, num_pages, page_size, max_seq_len, max_batch, impl, features, kv_dtype, lora)`
        builds the model runner (jaxinfer.mock_runner.MockRunner runs the engine with no model)."""
        self.model, self.config = model, config = model, config or EngineConfig()
        self.max_seq_len = config.seq_len(model.config)
        placed = sharding.place_model(model, config.tp)  # the model as the device runs it
        num_pages, page_size = config.kv_pages(placed, self.max_seq_len)
        contiguous = config.kv_layout == "contiguous"
        self.allocator = PageAllocator(num_pages, page_size, config.prefix_cache and not contiguous)
        impl = model_lib.Impl(config.attention, config.matmul)
        self.drafter = (None if config.speculative is None else
                        load_drafter(config.speculative, placed, num_pages, page_size, self.max_seq_len, impl))
        self.runner = runner(placed, num_pages, page_size, self.max_seq_len, config.max_batch, impl,
                             features=bool(self.drafter and self.drafter.features), kv_dtype=config.kv_dtype,
                             lora=config.lora_slots())
        self.adapters = AdapterRegistry(sharding.logical_config(placed), config.max_adapters, config.max_lora_rank,
                                        self.runner)
        self.scheduler = Scheduler(self.allocator, policy=config.batching, max_batch=config.max_batch,
                                   max_tokens_per_step=config.max_tokens_per_step,
                                   chunked_prefill=config.chunked_prefill,
                                   adapters=self.adapters if config.max_adapters else None)
        self.rules = StopRules(model)
        self.requests = RequestTable(self.rules)  # by id: sequences, deadlines, outputs and streams
        self._next_id = 0
        self._counts: collections.Counter = collections.Counter()  # steps, preemptions, peak_running, host_s
        self.last_run: dict[str, float] = {}  # wall time, tokens and throughput of the last generate()
        self.pages_in_use: list[int] = []  # after each step
        self.kv_usage: list[tuple[int, int]] = []  # after each step: (slots reserved, tokens held)
        self.pipeline = DecodePipeline(self.scheduler, self.runner, config.decode_steps, config.overlap)
        self.speculator = (None if self.drafter is None else
                           SpeculativeDecoder(config.speculative, self.drafter, self.scheduler, self.runner))

    @property
    def stats(self) -> collections.Counter:
        """Counters so far: the engine's and the runner's (device_s, device_idle_s, tokens run, ...)."""
        merged = collections.Counter(self._counts, lookahead_calls=self.pipeline.lookahead_calls)
        merged.update(self.runner.stats)
        return merged

    @property
    def buckets(self) -> set:
        return self.runner.buckets

    # Requests ----------------------------------------------------------------------------------

    def add_adapter(self, name: str, adapter: LoraAdapter | str) -> None:
        """Add a LoRA adapter (a PEFT directory or a loaded LoraAdapter) that requests can name; it
        takes a device slot when a request needs it. ValueError if it does (or could) not fit."""
        self.adapters.add(name, adapter)

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter; refused (ValueError) while waiting or running requests use it."""
        users = sum(s.adapter == name for s in [*self.scheduler.waiting, *self.scheduler.running])
        self.adapters.remove(name, users=users)

    def add_request(self, prompt: str | Seq[int], sampling: SamplingParams | None = None, seed: int | None = None,
                    adapter: str | None = None) -> int:
        """Queue a request (under an added LoRA adapter, or the base model) and return its id. Bad
        input raises ValueError; the engine is unchanged."""
        sampling = SamplingParams() if sampling is None else sampling
        self.adapters.check(adapter)
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling is {type(sampling).__name__}, not SamplingParams")
        ids = prepare_prompt(self.model, prompt)
        capacity = self.allocator.num_pages * self.allocator.page_size
        if len(ids) > self.max_seq_len:
            raise ValueError(f"prompt has {len(ids)} tokens, over the engine's max_seq_len={self.max_seq_len}")
        if len(ids) > capacity:
            raise ValueError(f"prompt has {len(ids)} tokens; the KV cache holds {capacity} "
                             f"({self.allocator.num_pages} pages of {self.allocator.page_size}), it can never run")
        if sampling.max_tokens > self.max_seq_len:
            raise ValueError(f"max_tokens={sampling.max_tokens} is over the engine's max_seq_len={self.max_seq_len}")
        rid, self._next_id = self._next_id, self._next_id + 1
        seed = sampling.seed if sampling.seed is not None else (rid if seed is None else seed)
        now = time.perf_counter()
        # A sequence stops at max_tokens or at the end of the context (no position left for its next token).
        stop = self.rules.checker(sampling, self.max_seq_len + 1 - len(ids))
        seq = Sequence(rid, 0, list(ids), len(ids), sampling, seed, now, stop=stop, adapter=adapter,
                       cache_salt=self.adapters.salt.get(adapter, 0))
        timeout = sampling.timeout_s if sampling.timeout_s is not None else self.config.request_timeout_s
        self.requests.add(Request(rid, list(ids), sampling, [seq]), None if timeout is None else now + timeout)
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: int) -> RequestOutput:
        """Stop a request now: its pages come back, its output (finish_reason "aborted", the tokens
        so far) is returned."""
        if request_id not in self.requests:
            raise ValueError(f"request_id={request_id} is not a running or waiting request")
        req = self.requests[request_id]
        self._end(req, "aborted")
        (out,) = self.requests.emit(self.requests.collect(req.sequences))
        return out

    def stream(self, prompt: str | Seq[int], sampling: SamplingParams | None = None,
               adapter: str | None = None) -> Iterator[RequestOutput]:
        """Add a request and yield its output each time it has new tokens (finished False, the
        tokens and text so far), the last one finished, driving the engine with step() (other
        requests advance too). Closing the generator early aborts the request. Bad input raises
        ValueError at the first next()."""
        rid = self.add_request(prompt, sampling, adapter=adapter)
        queue = self.requests.streams[rid] = collections.deque()
        try:
            while True:
                while not queue and rid in self.requests and self.has_unfinished():
                    self.step()
                if not queue:
                    return
                out = queue.popleft()
                yield out
                if out.finished:
                    return
        finally:
            del self.requests.streams[rid]
            if rid in self.requests:
                self.abort(rid)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def generate(self, prompts: Seq[str | Seq[int]], sampling: SamplingParams | Seq[SamplingParams] | None = None,
                 *, adapters: Seq[str | None] | None = None, raise_on_error: bool = False) -> list[RequestOutput]:
        """Serve prompts to completion, prompt i under adapters[i] (None: the base model); outputs in
        prompt order. A bad prompt (or adapter name) gets an output with finish_reason "error" and its
        message (logged as a warning); the others are served as if it were not there. With
        raise_on_error, a bad prompt raises instead, before any is served."""
        if isinstance(prompts, str) or not len(prompts):
            raise ValueError("prompts must be a non-empty list of strings or token-id lists")
        params, adapters = prepare_sampling(sampling, len(prompts)), prepare_adapters(adapters, len(prompts))
        ids: list[int | RequestOutput] = []
        for i, (p, sp, adapter) in enumerate(zip(prompts, params, adapters)):
            try:
                ids.append(self.add_request(p, sp, seed=i, adapter=adapter))
            except ValueError as e:
                if raise_on_error:
                    for rid in ids:
                        self.abort(rid)
                    raise ValueError(f"prompts[{i}]: {e}") from None
                prompt_ids = list(p) if isinstance(p, (list, tuple)) else []
                ids.append(RequestOutput(prompt_ids, [], None, "error", {}, error=f"prompts[{i}]: {e}"))
        errors = [x.error for x in ids if isinstance(x, RequestOutput)]
        if errors:
            log.warning("%d of %d prompts were refused; the first: %s", len(errors), len(ids), errors[0])
        done: dict[int, RequestOutput] = {}
        start = time.perf_counter()
        while self.has_unfinished():
            done.update((o.request_id, o) for o in self.requests.outputs(self._advance(), partial=False) if o.finished)
        wall = time.perf_counter() - start
        outs = [x if isinstance(x, RequestOutput) else done.pop(x) for x in ids]
        generated = sum(len(s.token_ids) for o in outs for s in (o.samples or [o]))
        self.last_run = {"wall_s": wall, "generated_tokens": generated,
                         "throughput_tok_s": generated / wall if wall else 0.0}
        return outs

    def warmup(self, max_prompt_len: int | None = None, max_len: int | None = None) -> int:
        """Compile every program this config can run, for prompts up to max_prompt_len tokens and
        sequences up to max_len (prompt and output; both default to max_seq_len); returns how many
        programs were compiled now. n > 1 sampling may need sampler shapes beyond these."""
        c, a, spec = self.config, self.allocator, self.config.speculative
        return self.runner.warmup(possible_buckets(
            max_batch=c.max_batch, max_tokens_per_step=c.max_tokens_per_step, chunked_prefill=c.chunked_prefill,
            decode_steps=c.decode_steps, multi_step_decode=c.decode_steps > 1 or c.overlap,
            max_seq_len=self.max_seq_len, max_prompt_len=min(max_prompt_len or self.max_seq_len, self.max_seq_len),
            max_len=max_len or self.max_seq_len, page_size=a.page_size, num_pages=a.num_pages,
            speculative_tokens=spec.num_tokens if spec else 0),
            draft_probs=bool(spec) and spec.method in ("draft", "medusa", "eagle"),
            synthetic=spec.accept if spec else None)

    def metrics(self) -> dict[str, float]:
        """Run-level figures so far: step and token counts, preemptions, host/device time, KV use."""
        pages = self.pages_in_use or [0]
        reserved = sum(r for r, _ in self.kv_usage)
        held = sum(min(r, h) for r, h in self.kv_usage)
        return {
            **{k: float(v) for k, v in self.stats.items()},
            "pages_in_use_mean": float(np.mean(pages)),
            "pages_in_use_max": float(max(pages)),
            "num_pages": float(self.allocator.num_pages),
            "kv_waste": 1.0 - held / reserved if reserved else 0.0,  # reserved KV slots that held no token
            "prefix_cache_hit_rate": self.allocator.hits / self.allocator.lookups if self.allocator.lookups else 0.0,
            "compiled_programs": float(len(self.buckets)),
            **(self.speculator.metrics() if self.speculator else {}),
            **self.adapters.metrics(),  # lora_loads, lora_evictions, lora_swap_s, adapters held
        }

    def kv_waste(self) -> float:
        """Share of reserved KV slots that held no token, averaged over the steps so far."""
        return self.metrics()["kv_waste"]

    # One iteration -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return an output for every request that got new tokens or
        finished in it (finished False: the tokens and text so far), in request order."""
        return self.requests.outputs(self._advance(), partial=True)

    def _advance(self) -> list[Sequence]:
        """One iteration: expire requests past their deadline, run the scheduled batch; returns
        the sequences that finished (the requests that got tokens are in requests.touched)."""
        start, device_before = time.perf_counter(), self.runner.stats["device_s"]
        finished = self.pipeline.collect(self._append) if self.pipeline.in_flight else []
        finished += self._expire()
        if self.pipeline.in_flight is None and self.scheduler.has_work():
            plan = self.scheduler.schedule()
            self._counts["preemptions"] += len(plan.preempted)
            self._counts["peak_running"] = max(self._counts["peak_running"], len(self.scheduler.running))
            finished += plan.finished
            if plan.copies:
                self.runner.copy_pages(plan.copies)
                if self.drafter:
                    self.drafter.copy_pages(plan.copies)
            if plan.decode and not plan.prefill and self.speculator:
                finished += self.speculator.step(plan.decode, self._append)
            elif plan.decode and not plan.prefill and (self.config.decode_steps > 1 or self.config.overlap):
                finished += self.pipeline.start(plan.decode, self._append)
            elif not plan.empty:
                finished += self._run(plan)
        if not self.scheduler.has_work():
            self.runner.no_work()
        self.pages_in_use.append(self.allocator.num_used)
        live = sum(s.num_computed for s in self.scheduler.running)
        self.kv_usage.append((self.allocator.num_used * self.allocator.page_size, live))
        self._counts["steps"] += 1
        # host_s: the step's time outside blocking reads (scheduling, arrays, bookkeeping).
        self._counts["host_s"] += time.perf_counter() - start - (self.runner.stats["device_s"] - device_before)
        return finished

    def _expire(self) -> list[Sequence]:
        """End the requests whose deadline has passed ("timeout"); returns their sequences."""
        ended = self.requests.expired(time.perf_counter())
        for req in ended:
            self._end(req, "timeout")
        return [req.sequences[0] for req in ended]

    def _end(self, req: Request, reason: str) -> None:
        """Finish every unfinished sequence of a request now; its pages come back."""
        now = time.perf_counter()
        for seq in req.sequences:
            if seq.status is not Status.FINISHED:
                seq.finish_time = now
                self.scheduler.finish(seq, reason)

    def _run(self, plan) -> list[Sequence]:
        """One mixed step; sequences that finish their input sample a token (n > 1: all samples)."""
        samplers = [(i, s) for i, s in enumerate(plan.decode)]
        for j, (seq, n) in enumerate(plan.prefill):
            if seq.num_computed + n == len(seq.tokens):
                samplers.append((len(plan.decode) + j, seq))
                if not seq.generated and seq.sample_index == 0 and seq.sampling.n > 1:
                    samplers += [(len(plan.decode) + j, child) for child in self._fork(seq, n)]
        out = self.runner.step(plan.decode, plan.prefill, samplers)
        for seq in plan.decode:
            self.scheduler.advance(seq, 1)
        for seq, n in plan.prefill:
            self.scheduler.advance(seq, n)
        finished = []
        for (_, seq), tok in zip(samplers, out.tokens.tolist()):
            if self._append(seq, tok):
                finished.append(seq)
        return finished

    def _append(self, seq: Sequence, token: int) -> bool:
        """Append a sampled token to a running sequence; finish it if it stops (or fail it if the
        token is NONFINITE). True if it finished."""
        now = time.perf_counter()
        self.requests.touched.add(seq.request_id)
        if token == NONFINITE:
            seq.finish_time = now
            self._fail(seq, f"non-finite logits (NaN or Inf) at generated token {len(seq.generated)} "
                            f"(the request's step {len(seq.generated)})")
            return True
        seq.tokens.append(token)
        seq.first_token_time = seq.first_token_time or now
        reason = seq.stop(seq.generated)
        if reason is not None:
            seq.finish_time = now
            self.scheduler.finish(seq, reason)
        return reason is not None

    def _fail(self, seq: Sequence, error: str) -> None:
        """Finish a sequence with "error": the pages it alone holds leave the prefix cache and are
        zeroed on the device (they may hold NaN), then come back."""
        log.warning("request %d failed: %s", seq.request_id, error)
        own = [p for p in seq.pages if self.allocator.refcount[p] == 1]
        for p in own:
            self.allocator.unregister(p)
        if own:
            self.runner.clear_pages(own)
        seq.error = error
        self.scheduler.finish(seq, "error")

    def _fork(self, parent: Sequence, n: int) -> list[Sequence]:
        """The other n - 1 samples of a request, sharing the parent's prompt pages once its last
        prompt chunk (n tokens, computed in this step) is in them."""
        req = self.requests[parent.request_id]
        children = [dataclasses.replace(parent, sample_index=i, tokens=list(parent.tokens), pages=[],
                                        num_computed=parent.num_computed + n, hashes=list(parent.hashes),
                                        seed=sample_seed(parent.seed, i),
                                        stop=self.rules.checker(parent.sampling, parent.stop.room))
                    for i in range(1, parent.sampling.n)]
        self.scheduler.fork(parent, children)
        req.sequences += children
        return children
