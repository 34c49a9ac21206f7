"""The serving engine: the request lifecycle over a paged KV cache.

  engine = ji.Engine(model, ji.EngineConfig(batching="continuous", page_size=16))
  outs = engine.generate(prompts, ji.SamplingParams(max_tokens=64, temperature=0.0))

Each `step()` follows one contract (jaxinfer/engine/step.py): the scheduler makes a plan (one
decode token per running sequence plus prompt chunks), the runner (jaxinfer/engine/runner.py)
executes it as one jitted program over the paged cache and returns a step output, and one update
(jaxinfer/engine/lifecycle.py) appends the sampled tokens and retires finished requests, returning
their pages. A plan with decode work only becomes a decode call of up to `decode_steps` steps
(jaxinfer/engine/pipeline.py) or, with speculative decoding, a verify pass of drafted tokens
(jaxinfer/engine/speculation.py); with `overlap`, the next decode call is dispatched before the last
one's tokens are read back. LoRA adapters (`add_adapter`; a request's `adapter=`) live in an
adapter registry (jaxinfer/lora/registry.py) that the scheduler asks for a device slot as it admits
a sequence.
Structured output (SamplingParams.structured; jaxinfer/structured): add_request compiles the
constraint (cached by its text; ValueError naming the field when it does not compile) and builds the
request's matcher on a thread pool; the scheduler admits the sequence once it is built, and the rows
of constrained sequences decode one step per call (the `grammar` processor, filled late): the
runner dispatches the forward pass, fills the grammar masks while the device computes it, then
draws; under overlap the next call's forward pass is dispatched before the last call's tokens are
read back, and its masks are filled once they are applied (`runner.draw`).
With EngineConfig(tp=N) (and ep=M for a mixture of experts) the model is placed on a mesh once, at
construction (jaxinfer.sharding), and the runner's programs run over it; the host side is unchanged.

The request lifecycle, for callers that serve requests as they come (the contract a server is
written against):
  add_request(prompt, sampling, adapter=)  queue a request; bad input raises ValueError
  step()          one iteration; returns a RequestOutput for every request that got new tokens or
                  finished in it: `finished` False (finish_reason None, tokens and text so far)
                  or True (the final output)
  stream(prompt)  a generator of one request's outputs, each time it has new tokens, the last one
                  finished; closing it early aborts the request
  abort(id)       end a request now ("aborted"); its pages come back at once
Scoring (lm-eval's loglikelihood verbs, jaxinfer/engine/scoring.py): score(contexts, continuations),
score_rolling(texts), over requests with prompt log-probabilities (SamplingParams.prompt_logprobs).
A request past its deadline (SamplingParams.timeout_s, or EngineConfig.request_timeout_s) ends
with "timeout" at the start of the next step, its tokens so far kept. A request whose logits turn
NaN or infinite ends with "error" (the sampler flags the row on the device, in the token array
read back anyway); its pages are zeroed before they are reused and the rest of the batch goes on.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Iterable, Iterator
from typing import Sequence as Seq

import jax
import jax.numpy as jnp

from jaxinfer import sharding, structured
from jaxinfer.engine import scoring
from jaxinfer.engine.batch import Layout
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.kv_manager import PageAllocator
from jaxinfer.engine.lifecycle import Request, RequestTable, SequenceEvents
from jaxinfer.engine.metrics import EngineMeter
from jaxinfer.engine.pipeline import DecodeCalls
from jaxinfer.engine.requests import (
    RequestOutput,
    StopRules,
    check_request,
    prepare_adapters,
    prepare_sampling,
)
from jaxinfer.engine.runner import ModelRunner
from jaxinfer.engine.scheduler import Scheduler, Sequence
from jaxinfer.engine.speculation import Speculation
from jaxinfer.engine.step import StepOutput, StepPlan
from jaxinfer.lora import AdapterRegistry, LoraAdapter
from jaxinfer.models import decoder as model_lib
from jaxinfer.models.act_formats import W8A8Weight
from jaxinfer.sampling.params import SamplingParams
from jaxinfer.sampling.processors import Vocab
from jaxinfer.speculative import load_drafter


def layer_loop_for(config: EngineConfig, model) -> str:
    """EngineConfig.layer_loop resolved: "auto" is "unroll" on the CPU for a half-precision or W8A8
    model at tp = ep = 1, where XLA's CPU backend converts a scanned stack of bfloat16 or int8
    weights whole on every step (benchmarks/results/cpu_dots.md, cpu_int8.md), else "scan"."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "family") and not cfg.family.uniform(cfg):  # layers that differ
        if config.layer_loop == "scan":
            raise ValueError(f"layer_loop='scan': {cfg.model_type}'s layers differ (dense and MoE layers), so they "
                             "run unrolled: use layer_loop='auto' or 'unroll'")
        return "unroll"
    if config.layer_loop != "auto":
        return config.layer_loop
    if jax.default_backend() != "cpu" or config.tp > 1 or config.ep > 1:
        return "scan"
    params = getattr(model, "params", None)  # (a mock runner's model has none)
    layers = params.get("layers", {}) if isinstance(params, dict) else {}
    half = bool(layers) and jnp.dtype(model.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    w8a8 = any(isinstance(x, W8A8Weight) for x in jax.tree_util.tree_leaves(
        layers, is_leaf=lambda x: isinstance(x, W8A8Weight)))
    return "unroll" if half or w8a8 else "scan"


class Engine:
    def __init__(self, model, config: EngineConfig | None = None, *, runner=ModelRunner, detokenize: bool = True):
        """`runner(model, num_pages, page_size, max_seq_len, max_batch, impl, features, kv_dtype, lora)`
        builds the model runner (jaxinfer.engine.mock_runner.MockRunner runs the engine with no model).
        detokenize False: outputs carry token ids, their text None (an engine core whose API server
        decodes them, jaxinfer/serving/core.py); stop strings are still checked."""
        config = config or EngineConfig()
        config = dataclasses.replace(config, layer_loop=layer_loop_for(config, model))
        self.model, self.config = model, config
        self.max_seq_len = config.seq_len(model.config)
        placed = sharding.place_model(model, config.tp, config.ep)  # the model as the device runs it
        if config.layer_loop == "unroll":  # one array per layer weight, the layers unrolled in the step
            placed = dataclasses.replace(placed, params=model_lib.unstack_layers(placed.params, placed.config))
        num_pages, page_size = config.kv_pages(placed, self.max_seq_len)
        contiguous = config.kv_layout == "contiguous"
        self.allocator = PageAllocator(num_pages, page_size, config.prefix_cache and not contiguous)
        impl = config.impl()
        self.drafter = (None if config.speculative is None else
                        load_drafter(config.speculative, placed, num_pages, page_size, self.max_seq_len, impl))
        self.runner = runner(placed, num_pages, page_size, self.max_seq_len, config.max_batch, impl,
                             features=bool(config.speculative and config.speculative.spec.features),
                             kv_dtype=config.kv_dtype, lora=config.lora_slots(),
                             feature_layers=getattr(self.drafter, "feature_layers", ()))
        self.adapters = AdapterRegistry(sharding.logical_config(placed), config.max_adapters, config.max_lora_rank)
        self.scheduler = Scheduler(self.allocator, policy=config.batching, max_batch=config.max_batch,
                                   max_tokens_per_step=config.max_tokens_per_step,
                                   chunked_prefill=config.chunked_prefill,
                                   adapters=self.adapters if config.max_adapters else None)
        self.rules = StopRules(model, text=detokenize)  # detokenize False: outputs' text None (an engine core's)
        # Structured output: constraints compiled (cached by text) and matchers built off the step loop.
        self.grammars = structured.for_tokenizer(model.tokenizer, model.config.vocab_size, Vocab.of(model).eos_ids,
                                                 config.structured_backend)
        self.requests = RequestTable(self.rules)  # by id: sequences, deadlines, outputs and streams
        self.events = SequenceEvents(self.requests, self.scheduler, self.runner)
        self._next_id = 0
        self.meter = EngineMeter(self.allocator)  # steps, preemptions, pages and KV slots in use per step
        self.last_run: dict[str, float] = {}  # wall time, tokens and throughput of the last generate()
        # How a plan with decode work only runs: verify passes, multi-step decode calls, or a plain step.
        self.speculator = None if self.drafter is None else Speculation(config.speculative, self.drafter, self.scheduler)
        self.calls = (DecodeCalls(self.scheduler, config.decode_steps)
                      if self.drafter is None and (config.decode_steps > 1 or config.overlap) else None)
        self.pending = None  # a decode call dispatched and not yet read back (overlap)

    @property
    def stats(self) -> collections.Counter:
        """Counters so far: the engine's and the runner's (device_s, device_idle_s, tokens run, ...)."""
        merged = collections.Counter(self.meter.counts, lookahead_calls=self.calls.lookahead_calls if self.calls else 0)
        merged.update(self.runner.stats)
        return merged

    @property
    def pages_in_use(self) -> list[int]:
        """Pages in use after each step so far."""
        return self.meter.pages_in_use

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
                    adapter: str | None = None, prompt_logprobs_from: int = 1) -> int:
        """Queue a request (under an added LoRA adapter, or the base model) and return its id. Bad
        input raises ValueError; the engine is unchanged. With sampling.prompt_logprobs, the prompt
        tokens from position `prompt_logprobs_from` on get their log-probabilities (the default, 1:
        every token but the first); the pages of the prefix cache that hold tokens before the one
        preceding it are shared (a request that asks for the whole prompt's computes it all)."""
        sampling = SamplingParams() if sampling is None else sampling
        self.adapters.check(adapter)
        ids = check_request(self.model, prompt, sampling, self.max_seq_len, self.allocator.num_pages,
                            self.allocator.page_size, speculative=self.config.speculative is not None)
        if prompt_logprobs_from != 1 and (sampling.prompt_logprobs is None or isinstance(prompt_logprobs_from, bool)
                                          or not isinstance(prompt_logprobs_from, int)
                                          or not 1 <= prompt_logprobs_from <= len(ids)):
            raise ValueError(f"prompt_logprobs_from must be an integer in [1, {len(ids)}] (the prompt's length) and "
                             f"needs sampling.prompt_logprobs, got {prompt_logprobs_from!r}")
        compiling = self._start_grammar(sampling)
        rid, self._next_id = self._next_id, self._next_id + 1
        seed = sampling.seed if sampling.seed is not None else (rid if seed is None else seed)
        now = time.perf_counter()
        # A sequence stops at max_tokens or at the end of the context (no position left for its next token).
        stop = self.rules.checker(sampling, self.max_seq_len + 1 - len(ids))
        seq = Sequence(rid, 0, list(ids), len(ids), sampling, seed, now, stop=stop, adapter=adapter,
                       cache_salt=self.adapters.salt.get(adapter, 0), prompt_logprobs_from=prompt_logprobs_from,
                       prompt_logprobs=None if sampling.prompt_logprobs is None else [None] * len(ids),
                       compiling=compiling)
        timeout = sampling.timeout_s if sampling.timeout_s is not None else self.config.request_timeout_s
        self.requests.add(Request(rid, list(ids), sampling, [seq]), None if timeout is None else now + timeout)
        self.scheduler.add(seq)
        return rid

    def _start_grammar(self, sampling: SamplingParams) -> concurrent.futures.Future | None:
        """The future of a structured request's matcher (built on the grammar pool), or None;
        ValueError naming the field for a constraint that does not compile."""
        if sampling.structured is None:
            return None
        return self.grammars.start(sampling.structured)

    def abort(self, request_id: int) -> RequestOutput:
        """Stop a request now: its pages come back, its output (finish_reason "aborted", the tokens
        so far) is returned."""
        if request_id not in self.requests:
            raise ValueError(f"request_id={request_id} is not a running or waiting request")
        req = self.requests[request_id]
        self.events.end(req, "aborted")
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

    def add_all(self, requests: Iterable[tuple[str, dict]]) -> list[int]:
        """Add every (label, add_request's keyword arguments) or none: a ValueError aborts the ones
        already added and is raised again with the label of the request it concerns."""
        ids: list[int] = []
        for label, kwargs in requests:
            try:
                ids.append(self.add_request(**kwargs))
            except ValueError as e:
                for rid in ids:
                    self.abort(rid)
                raise ValueError(f"{label}: {e}") from None
        return ids

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def generate(self, prompts: Seq[str | Seq[int]], sampling: SamplingParams | Seq[SamplingParams] | None = None,
                 *, adapters: Seq[str | None] | None = None) -> list[RequestOutput]:
        """Serve prompts to completion, prompt i under adapters[i] (None: the base model); outputs in
        prompt order. Bad input (a prompt empty, off the vocabulary or past the context, max_tokens
        past it, an unknown adapter) raises ValueError naming prompts[i] before any prompt is served,
        as add_request does; the engine is unchanged."""
        if isinstance(prompts, str) or not len(prompts):
            raise ValueError("prompts must be a non-empty list of strings or token-id lists")
        params, adapters = prepare_sampling(sampling, len(prompts)), prepare_adapters(adapters, len(prompts))
        ids = self.add_all((f"prompts[{i}]", {"prompt": p, "sampling": sp, "seed": i, "adapter": adapter})
                           for i, (p, sp, adapter) in enumerate(zip(prompts, params, adapters)))
        # The prompts' grammar matchers first (milliseconds): every prompt is admitted as it would be
        # without structured output, so a run's steps (and the programs they need) do not depend on
        # how fast the thread pool built them.
        concurrent.futures.wait([s.compiling for s in self.scheduler.waiting if s.compiling is not None])
        done: dict[int, RequestOutput] = {}
        start = time.perf_counter()
        while self.has_unfinished():
            done.update((o.request_id, o) for o in self.requests.outputs(self._advance(), partial=False) if o.finished)
        wall = time.perf_counter() - start
        outs = [done.pop(rid) for rid in ids]
        generated = sum(len(s.token_ids) for o in outs for s in (o.samples or [o]))
        self.last_run = {"wall_s": wall, "generated_tokens": generated,
                         "throughput_tok_s": generated / wall if wall else 0.0}
        return outs

    def score(self, contexts: Seq[str | Seq[int]], continuations: Seq[str | Seq[int]],
              adapter: str | None = None) -> list[scoring.Score]:
        """Per (context, continuation) pair: Score(logprob, greedy), the sum of the continuation
        tokens' log-probabilities and whether each is the most likely one (lm-eval's loglikelihood;
        jaxinfer/engine/scoring.py), under an added adapter or the base model. Pairs that share a
        context share its pages (the prefix cache)."""
        return scoring.score(self, contexts, continuations, adapter)

    def score_rolling(self, texts: Seq[str | Seq[int]], max_length: int | None = None,
                      adapter: str | None = None) -> list[float]:
        """Per text: the sum of every token's log-probability, over lm-eval's rolling windows of
        max_length tokens (loglikelihood_rolling; default max_seq_len - 1), under an adapter or not."""
        return scoring.score_rolling(self, texts, max_length, adapter)

    def warmup(self, max_prompt_len: int | None = None, max_len: int | None = None) -> int:
        """Compile every program this config can run, for prompts up to max_prompt_len tokens and
        sequences up to max_len (prompt and output; max_len defaults to max_seq_len, max_prompt_len to
        max_len); returns how many programs were compiled now. Lengths past max_seq_len raise
        ValueError. n > 1 sampling may need sampler shapes beyond these."""
        a, spec = self.allocator, self.config.speculative
        max_len = self.max_seq_len if max_len is None else max_len
        max_prompt_len = max_len if max_prompt_len is None else max_prompt_len
        if not 1 <= max_len <= self.max_seq_len:
            raise ValueError(f"warmup: max_len={max_len} is outside [1, {self.max_seq_len}] (the engine's max_seq_len)")
        if not 1 <= max_prompt_len <= max_len:
            raise ValueError(f"warmup: max_prompt_len={max_prompt_len} is outside [1, max_len={max_len}]")
        layout = Layout(a.num_pages, a.page_size, self.max_seq_len, self.config.max_batch, Vocab.of(self.model))
        buckets = self.config.buckets(layout, max_prompt_len, max_len)
        return self.runner.warmup(buckets, **(spec.verify_programs() if spec else {}))

    def metrics(self) -> dict[str, float]:
        """Run-level figures so far: step and token counts, preemptions, host/device time, KV use
        (jaxinfer/engine/metrics.py), speculation's and the adapters' figures."""
        return {**self.meter.metrics(self.stats, len(self.buckets)),
                **(self.speculator.metrics() if self.speculator else {}),
                **self.adapters.metrics()}  # lora_loads, lora_evictions, lora_swap_s, adapters held

    def kv_waste(self) -> float:
        """Share of reserved KV slots that held no token, averaged over the steps so far."""
        return self.metrics()["kv_waste"]

    # One iteration -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return an output for every request that got new tokens or
        finished in it (finished False: the tokens and text so far), in request order."""
        return self.requests.outputs(self._advance(), partial=True)

    def _advance(self) -> list[Sequence]:
        """One iteration: read back a decode call in flight (its successor dispatched first when it
        is sure to be needed), expire requests past their deadline, then plan, execute and apply a
        step; returns the sequences that finished (the requests that got tokens are in requests.touched)."""
        start, device_before = time.perf_counter(), self.runner.stats["device_s"]
        finished = []
        if self.pending is not None:
            pending, self.pending = self.pending, None
            successor = self.calls.look_ahead(pending.plan) if self.config.overlap else None
            if successor is not None:
                successor.inputs = self.runner.newest(pending)
                self.pending = self.runner.dispatch(successor)  # rows filled late: the forward pass only
            finished += self._update(pending.plan, self.runner.collect(pending))
            if self.pending is not None:
                self.runner.draw(self.pending)  # the successor's late fills see the tokens just applied
        finished += self.events.expire()
        if self.pending is None and self.scheduler.has_work():
            plan = self.scheduler.schedule()
            self.meter.scheduled(len(plan.preempted), len(self.scheduler.running))
            finished += plan.finished
            self._load_adapters()
            if plan.copies:
                self.runner.copy_pages(plan.copies)
                if self.drafter:
                    self.drafter.copy_pages(plan.copies)
            if not plan.empty:
                finished += self._run(plan)
            elif not self.scheduler.running:
                self._wait_for_grammars()
        if not self.scheduler.has_work():
            self.runner.no_work()
        device_s = self.runner.stats["device_s"] - device_before  # blocking reads
        self.meter.stepped(sum(s.num_computed for s in self.scheduler.running),
                           time.perf_counter() - start - device_s)
        return finished

    def _wait_for_grammars(self, timeout_s: float = 0.05) -> None:
        """Nothing ran: wait (briefly) for a waiting sequence's grammar matcher rather than spin."""
        compiling = [s.compiling for s in self.scheduler.waiting if s.compiling is not None]
        if compiling:
            concurrent.futures.wait(compiling, timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)

    def _load_adapters(self) -> None:
        """Write the adapters the scheduler gave slots to into those slots, before the step uses them."""
        loads = self.adapters.take_loads()
        if loads:
            start = time.perf_counter()
            for slot, adapter in loads:
                self.runner.load_adapter(slot, adapter)
            self.adapters.loaded(time.perf_counter() - start)

    def _run(self, plan: StepPlan) -> list[Sequence]:
        """Execute a plan and apply its output (a decode call under overlap is left in flight)."""
        if plan.decode and not plan.prefill:
            if self.speculator is not None:
                plan = self.speculator.extend(plan, self.runner.features)
            elif self.calls is not None:
                plan = self.calls.extend(plan)
        pending = self.runner.dispatch(plan)
        if plan.kind == "decode" and self.config.overlap:
            self.pending = pending
            return []
        return self._update(plan, self.runner.collect(pending))

    def _update(self, plan: StepPlan, output: StepOutput) -> list[Sequence]:
        finished = self.events.apply(output)
        if plan.kind == "verify":
            self.speculator.applied(plan, output)
        return finished
