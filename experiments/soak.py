"""Soak: many randomised requests through one engine with a tight KV budget, and the invariants a
long-running server must keep, checked as it runs.

  python -m jaxinfer.experiments.soak --requests=10000 --seed=0
  python -m jaxinfer.experiments.soak --requests=2000 --num_adapters=4 --max_adapters=2 --spec=ngram --kv_dtype=int8
  python -m jaxinfer.experiments.soak --runner=mock --requests=10000    # no model: the scheduler and engine alone

The workload (from --seed): requests arrive a few per step while at most 2 x max_batch are in the
engine, with random prompt and output lengths (held-out text, some behind a shared prefix, some as
strings), sampling parameters (greedy, temperature, top-k, top-p, min-p, seeds), stop strings and
stop tokens, n > 1, random PEFT LoRA adapters (--num_adapters), aborts after a random number of
steps and deadlines (SamplingParams.timeout_s) counted in engine steps (--deadline_steps: the
median time between the engine's steps so far, on the clock its deadlines use, so how many steps a
deadline lasts does not depend on the machine's speed); a share (--bad_rate) is bad input of one of
several kinds (BAD_KINDS). Checked while it runs (each failure is a violation):
  - no exception escapes the engine; each bad request is refused with a ValueError that says
    what is wrong (its kind's words), leaving the engine's pages and queue as they were;
  - after every step: the page allocator's invariants, refcounts equal to the running sequences'
    pages, adapter slot counts equal to the running sequences on them;
  - step() outputs: a request's tokens grow by prefix, only its last output is finished, and it
    gets exactly one; a finished output keeps max_tokens, shows no stop string, and ends for a
    reason the request allows ("aborted" only when aborted, "timeout" only with a deadline);
  - at the end: no page in use, as many free pages as at the start, no adapter slot held;
  - every greedy request, served again alone on a fresh engine of the same configuration, gives
    the same tokens (an aborted or timed-out one, a prefix of them). On the model runner a
    divergence where the alone run's top two logits are within --tie_tol is counted as a near tie,
    not a violation: greedy decoding is exact only up to float summation order, which batch shapes
    change; the mock runner's outputs are exact;
  - the engine never goes 50 x max_seq_len steps without an output (a request that never ends),
    no request reaches the engine's --request_timeout_s, and, when --max_wall_s is set, the run
    ends within it (off by default: a wall-clock cap depends on the machine's speed).
Prints a summary table; exit status 1 on any violation (listed), 2 on bad flags.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import tempfile
import time
import traceback

import numpy as np
from absl import flags

import jaxinfer as ji
from jaxinfer import lora
from jaxinfer.engine.mock_runner import MockRunner
from jaxinfer.engine.runner import ModelRunner

from . import common
from ._soak_workload import BAD_KINDS, Request, Workload  # noqa: F401  (BAD_KINDS: soak.BAD_KINDS)

FLAGS = flags.FLAGS
flags.DEFINE_integer("requests", 1000, "Requests in the soak, bad ones included.")
flags.DEFINE_enum("runner", "model", ["model", "mock"], "model: --model's weights; mock: jaxinfer.engine.mock_runner with "
                  "--model's config and tokenizer (no model: the scheduler and engine alone, exact outputs).")
flags.DEFINE_integer("num_adapters", 0, "Random PEFT LoRA adapters (rank 4) that requests draw from; --max_adapters "
                     "device slots (0: half as many, at least 1).")
flags.DEFINE_float("bad_rate", 0.05, "Share of requests that are bad input.")
flags.DEFINE_float("abort_rate", 0.05, "Share of good requests aborted after a random number of steps.")
flags.DEFINE_float("deadline_rate", 0.05, "Share of good requests with a deadline (timeout_s).")
flags.DEFINE_float("deadline_steps", 8.0, "A deadline lasts this many engine steps times a random factor in "
                   "[0.05, 2]: the median time between the engine's last 100 steps when the request arrives, "
                   "times that (a request arriving before the engine has taken two steps has none).")
flags.DEFINE_integer("max_prompt_len", 48, "Longest prompt, in tokens.")
flags.DEFINE_integer("max_output_len", 24, "Largest max_tokens of a request.")
flags.DEFINE_integer("check_alone", -1, "Greedy requests served again alone and compared (-1: all of them).")
flags.DEFINE_float("tie_tol", 1e-3, "Model runner: a greedy divergence where the alone run's top two logits are "
                   "closer than this is a near tie, not a violation.")
flags.DEFINE_float("max_wall_s", 0.0, "A soak that runs longer than this (serving and checks) is a violation (0: "
                   "no cap; the stall check catches an engine that stops making progress).")
flags.DEFINE_float("request_timeout_s", 600.0, "The engine's default deadline: a request without its own deadline "
                   "that reaches it is a violation (a request that never ends).")
flags.DEFINE_bool("compile_first", True, "Compile every program the configuration can run before the soak (its time is "
                  "reported as compile time); off, programs compile as first needed, inside the run time.")
# --max_lora_rank is not one of them: the soak's adapters are rank 4.
for _name in ("model", "seed", "out", *(f for f in common.ENGINE_FLAGS if f != "max_lora_rank"), *common.SPEC_FLAGS):
    flags.declare_key_flag(_name)

FINISH_REASONS = ("stop", "length", "context", "aborted", "timeout", "error")


class Soak:
    """One soak run: the workload, the engine, the checks; `violations` lists what went wrong."""

    def __init__(self, model, config: ji.EngineConfig, runner: str, adapters: dict[str, str], rng):
        self.model, self.config, self.runner, self.adapter_paths, self.rng = model, config, runner, adapters, rng
        self.violations: list[str] = []
        self.counts: collections.Counter = collections.Counter()
        self.step_starts: list[float] = []  # time.perf_counter() as each engine step began
        self.engine = self.new_engine()
        self.max_seq_len = self.engine.max_seq_len
        self.load = Workload(model, rng, sorted(adapters), self.max_seq_len)

    def new_engine(self) -> ji.Engine:
        runner = MockRunner if self.runner == "mock" else ModelRunner
        engine = ji.Engine(self.model, self.config, runner=runner)
        for name, path in self.adapter_paths.items():
            engine.add_adapter(name, path)
        return engine

    def violation(self, message: str) -> None:
        self.violations.append(message)

    # Serving --------------------------------------------------------------------------------------

    def submit(self, req: Request, step: int, finished_ids: list[int]) -> None:
        """Add a good request; try a bad one and check how it is refused."""
        engine = self.engine
        if req.kind == "good":
            step_s = self.step_seconds()
            if req.deadline_steps is not None and step_s is not None:
                req.sampling = dataclasses.replace(req.sampling, timeout_s=req.deadline_steps * step_s)
            req.request_id = engine.add_request(req.prompt, req.sampling, adapter=req.adapter)
            req.added_step = step
            return
        self.counts[f"bad/{req.kind}"] += 1
        before = (engine.allocator.num_used, len(engine.scheduler.waiting), len(engine.scheduler.running))
        try:
            if req.kind == "abort_unknown":
                engine.abort(10**9 + req.index)
            elif req.kind == "abort_finished":
                engine.abort(finished_ids[int(self.rng.integers(len(finished_ids)))] if finished_ids else -1)
            else:
                sampling = ji.SamplingParams(**req.sampling) if req.kind == "bad_sampling" else req.sampling
                engine.add_request(req.prompt, sampling, adapter=req.adapter)
            self.violation(f"request {req.index} ({req.kind}: {req.prompt!r:.40}) was accepted")
        except ValueError as e:
            if req.expect not in str(e):
                self.violation(f"request {req.index} ({req.kind}) refused with {str(e)!r}, which does not say "
                               f"{req.expect!r}")
        after = (engine.allocator.num_used, len(engine.scheduler.waiting), len(engine.scheduler.running))
        if after != before:
            self.violation(f"request {req.index} ({req.kind}) changed the engine: (used pages, waiting, running) "
                           f"{before} -> {after}")

    def step_seconds(self) -> float | None:
        """The median time between the engine's last 100 steps (None before two steps): what a
        deadline of one step lasts on the clock the engine judges deadlines by."""
        starts = self.step_starts[-101:]
        return float(np.median(np.diff(starts))) if len(starts) > 1 else None

    def serve(self, workload: list[Request], deadline: float | None) -> bool:
        """Run the workload through the engine; False if it was cut short (a crash, a stall or the wall time)."""
        engine, rng = self.engine, self.rng
        pending = collections.deque(workload)
        live: dict[int, Request] = {}
        finished_ids: list[int] = []
        limit = 2 * self.config.max_batch
        stall = 50 * self.max_seq_len  # steps in a row without an output: the engine is stuck
        step = quiet = 0
        while pending or engine.has_unfinished():
            if deadline is not None and time.perf_counter() > deadline:
                self.violation(f"the soak ran past --max_wall_s={FLAGS.max_wall_s} at step {step} "
                               f"({len(pending)} requests not yet added)")
                return False
            arrivals = 1 if not engine.has_unfinished() else int(rng.integers(0, 4))
            while pending and arrivals and len(live) < limit:
                req = pending.popleft()
                self.submit(req, step, finished_ids)
                if req.request_id is not None:
                    live[req.request_id] = req
                    arrivals -= 1
            for req in [r for r in live.values() if r.abort_after is not None and step - r.added_step >= r.abort_after]:
                req.outputs.append(engine.abort(req.request_id))
                req.aborted = True
                self.finish(req, live, finished_ids)
            self.step_starts.append(time.perf_counter())
            outs = engine.step()
            quiet = 0 if outs else quiet + 1
            if quiet > stall:
                self.violation(f"no output for {stall} steps (step {step}): {len(live)} requests stuck")
                return False
            for out in outs:
                req = live.get(out.request_id)
                if req is None:
                    self.violation(f"step {step} returned an output for request {out.request_id}, not running")
                    continue
                req.outputs.append(out)
                if out.finished:
                    self.finish(req, live, finished_ids)
            if not self.check_pages(step):
                return False
            if live and not engine.has_unfinished():
                self.violation(f"requests {sorted(live)[:10]} never got a finished output (the engine is idle)")
                live.clear()
            step += 1
        self.counts["steps"] = step
        return True

    def finish(self, req: Request, live: dict, finished_ids: list[int]) -> None:
        del live[req.request_id]
        finished_ids.append(req.request_id)
        self.check_outputs(req)

    # Checks ---------------------------------------------------------------------------------------

    def check_pages(self, step: int) -> bool:
        """The allocator's and the adapter slots' accounting after a step; False (a violation) if off."""
        engine = self.engine
        running = engine.scheduler.running
        try:
            engine.allocator.check_invariants(owners={id(s): s.pages for s in running})
            if self.adapter_paths:
                engine.adapters.check_invariants(running)
        except AssertionError as e:
            self.violation(f"page or slot accounting after step {step}: {e}")
            return False
        return True

    def check_outputs(self, req: Request) -> None:
        """A finished request's outputs: growing by prefix, one finished (last), within its limits."""
        outs, sp = req.outputs, req.sampling
        name = f"request {req.index} (id {req.request_id})"
        if [o.finished for o in outs] != [False] * (len(outs) - 1) + [True]:
            self.violation(f"{name}: finished flags {[o.finished for o in outs]}, not one finished output at the end")
        for a, b in zip(outs, outs[1:]):
            for x, y in zip(a.samples or [a], b.samples or [b]):
                if y.token_ids[: len(x.token_ids)] != x.token_ids:
                    self.violation(f"{name}: streamed tokens taken back ({x.token_ids} then {y.token_ids})")
                if x.text is not None and y.text is not None and not y.text.startswith(x.text):
                    self.violation(f"{name}: streamed text taken back ({x.text!r} then {y.text!r})")
        final = outs[-1]
        allowed = {"stop", "length", "context"} | ({"aborted"} if req.aborted else set()) | (
            {"timeout"} if sp.timeout_s is not None else set())
        samples = final.samples or [final]
        if not ((len(samples) == sp.n) or (final.finish_reason in ("aborted", "timeout") and not final.token_ids)):
            self.violation(f"{name}: {len(samples)} samples for n={sp.n}")
        for s in samples:
            self.counts[f"finish/{s.finish_reason}"] += 1
            self.counts["generated_tokens"] += len(s.token_ids)
            if s.finish_reason not in allowed:
                detail = f" ({s.error})" if s.error else ""
                self.violation(f"{name}: finish_reason {s.finish_reason!r}{detail}, not one of {sorted(allowed)}")
            if len(s.token_ids) > sp.max_tokens:
                self.violation(f"{name}: {len(s.token_ids)} tokens for max_tokens={sp.max_tokens}")
            if s.text is not None and any(stop in s.text for stop in sp.stop):
                self.violation(f"{name}: its text {s.text!r} holds a stop string of {sp.stop}")

    def check_alone(self, workload: list[Request], limit: int, deadline: float | None) -> None:
        """Serve greedy requests again, each alone on a fresh engine, and compare tokens."""
        chosen = [r for r in workload if r.kind == "good" and r.sampling.greedy and r.outputs and r.outputs[-1].finished]
        chosen = chosen if limit < 0 else chosen[:limit]
        reference = self.new_engine()
        for req in chosen:
            if deadline is not None and time.perf_counter() > deadline:
                self.violation(f"the checks ran past --max_wall_s={FLAGS.max_wall_s}")
                return
            sp = dataclasses.replace(req.sampling, timeout_s=None)
            (alone,) = reference.generate([req.prompt], sp, adapters=[req.adapter])
            self.counts["checked_alone"] += 1
            final = req.outputs[-1]
            for got, want in zip(final.samples or [final], alone.samples or [alone]):
                cut = got.finish_reason in ("aborted", "timeout")
                expected = want.token_ids[: len(got.token_ids)] if cut else want.token_ids
                if got.token_ids == expected and (cut or got.finish_reason == want.finish_reason):
                    continue
                j = next((j for j, (a, b) in enumerate(zip(got.token_ids, expected)) if a != b),
                         min(len(got.token_ids), len(expected)))
                gap = self.logit_gap(reference, req, alone.prompt_token_ids, want.token_ids[:j])
                if gap is not None and gap < FLAGS.tie_tol:
                    self.counts["near_ties"] += 1
                    continue
                self.violation(f"request {req.index} (id {req.request_id}, {got.finish_reason}): tokens {got.token_ids} "
                               f"differ at {j} from the same request served alone: {want.token_ids} "
                               f"({want.finish_reason}; top-two logit gap there {gap})")

    def logit_gap(self, engine: ji.Engine, req: Request, prompt: list[int], tokens: list[int]) -> float | None:
        """The alone run's gap between its top two logits after prompt + tokens (None: the mock)."""
        if self.runner == "mock":
            return None
        model = self.model if req.adapter is None else lora.merge(self.model, engine.adapters.store[req.adapter])
        logits = np.asarray(ji.forward_logits(model, [prompt + tokens]))[0, -1]
        top = np.sort(logits)[-2:]
        return float(top[1] - top[0])


def write_adapters(model, count: int, directory: str) -> dict[str, str]:
    """`count` random rank-4 PEFT adapters (different projections each) under directory: {name: path}."""
    projections = [lora.PROJECTIONS, ("wq", "wv"), ("wo", "w_down"), ("w_gate", "w_up")]
    paths = {}
    for k in range(count):
        path = os.path.join(directory, f"soak-{k}")
        lora.save_adapter(lora.random_adapter(model.config, 4, projections[k % len(projections)], std=0.05,
                                              seed=FLAGS.seed * 1009 + k), path)
        paths[f"a{k}"] = path
    return paths


def engine_config(model) -> ji.EngineConfig:
    """The soak's EngineConfig: the engine flags, sequences of at most max_prompt_len + max_output_len
    tokens, a KV budget of twice that unless --kv_budget_tokens is given (tight: preemption under
    load), and the engine's default deadline."""
    if FLAGS.requests < 1 or FLAGS.max_prompt_len < 1 or FLAGS.max_output_len < 1:
        raise ValueError("--requests, --max_prompt_len and --max_output_len must be >= 1")
    if FLAGS.runner == "mock" and FLAGS.spec not in ("none", "ngram"):
        raise ValueError(f"--runner=mock runs --spec=none or ngram (no drafter model), not --spec={FLAGS.spec}")
    context = model.config.max_position_embeddings
    if FLAGS.max_prompt_len >= context:
        raise ValueError(f"--max_prompt_len={FLAGS.max_prompt_len} leaves no room in {FLAGS.model}'s context of "
                         f"{context} tokens")
    max_len = min(FLAGS.max_prompt_len + FLAGS.max_output_len, context)
    overrides = dict(max_seq_len=max_len, request_timeout_s=FLAGS.request_timeout_s,
                     kv_budget_tokens=FLAGS.kv_budget_tokens or 2 * max_len)
    if FLAGS.num_adapters:
        overrides["max_adapters"] = FLAGS.max_adapters or max(1, FLAGS.num_adapters // 2)
        overrides["max_lora_rank"] = 4
    return common.engine_config(**overrides)


def run_soak() -> dict:
    """The soak the flags describe; returns its record (config, env, metrics, violations)."""
    t0 = time.perf_counter()
    model = ji.load_model(FLAGS.model)
    if FLAGS.runner == "mock":
        model = ji.Model(model.config, params=None, tokenizer=model.tokenizer, name=model.name)
    config = engine_config(model)
    rng = np.random.default_rng(FLAGS.seed)
    deadline = t0 + FLAGS.max_wall_s if FLAGS.max_wall_s > 0 else None
    with tempfile.TemporaryDirectory() as tmp:
        soak = Soak(model, config, FLAGS.runner, write_adapters(model, FLAGS.num_adapters, tmp), rng)
        workload = soak.load.draw(FLAGS.requests)
        engine = soak.engine
        t1 = time.perf_counter()
        compiled = engine.warmup(FLAGS.max_prompt_len, engine.max_seq_len) if FLAGS.compile_first else 0
        compile_s = time.perf_counter() - t1
        free_at_start = engine.allocator.num_free
        t1 = time.perf_counter()
        try:
            soak.serve(workload, deadline)
        except Exception:  # any exception out of the engine is what the soak looks for: record it, do not raise
            soak.violation(f"the engine raised: {traceback.format_exc(limit=6)}")
        run_s = time.perf_counter() - t1
        if engine.allocator.num_free != free_at_start or engine.allocator.num_used:
            soak.violation(f"pages leaked: {free_at_start} free at the start, {engine.allocator.num_free} at the end "
                           f"({engine.allocator.num_used} in use)")
        if FLAGS.num_adapters and any(engine.adapters.refs):
            soak.violation(f"adapter slots still held at the end: {engine.adapters.refs}")
        good = [r for r in workload if r.kind == "good"]
        t1 = time.perf_counter()
        if FLAGS.check_alone:
            soak.check_alone(good, FLAGS.check_alone, deadline)
        check_s = time.perf_counter() - t1
        metrics = engine.metrics()
    counts = soak.counts
    bad = {k.split("/", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("bad/")}
    finish = {k.split("/", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("finish/")}
    result = {
        "requests": FLAGS.requests, "good_requests": len(good), "bad_requests": sum(bad.values()), "bad_by_kind": bad,
        "finish_reasons": finish, "aborts": sum(r.aborted for r in good), "deadlines": sum(
            r.sampling.timeout_s is not None for r in good), "steps": counts["steps"],
        "generated_tokens": counts["generated_tokens"], "preemptions": metrics.get("preemptions", 0.0),
        "prefix_cache_hit_rate": metrics["prefix_cache_hit_rate"], "peak_running": metrics.get("peak_running", 0.0),
        "lora_loads": metrics.get("lora_loads", 0.0), "spec_acceptance_rate": metrics.get("spec_acceptance_rate"),
        "checked_alone": counts["checked_alone"], "near_ties": counts["near_ties"], "num_pages": engine.allocator.num_pages,
        "free_pages_start": free_at_start, "free_pages_end": engine.allocator.num_free,
        "pages_leaked": free_at_start - engine.allocator.num_free, "compiled_programs": compiled,
        "compile_s": compile_s, "run_s": run_s, "check_s": check_s, "wall_s": time.perf_counter() - t0,
        "requests_per_s": len(good) / run_s if run_s else 0.0,
        "tokens_per_s": counts["generated_tokens"] / run_s if run_s else 0.0, "violations": len(soak.violations),
    }
    result = {k: v for k, v in result.items() if v is not None}
    return common.record(__name__, result, violations=soak.violations, summary=result,
                         engine_config=dataclasses.asdict(config) | {"speculative": repr(config.speculative)})


def print_table(rec: dict) -> None:
    r, c = rec["summary"], rec["config"]
    spec = f", spec {c['spec']} k={c['spec_tokens']}" if c["spec"] != "none" else ""
    kv = f", KV {c['kv_dtype']}" if c["kv_dtype"] else ""
    lora_text = f", {c['num_adapters']} adapters" if c["num_adapters"] else ""
    finish = ", ".join(f"{k} {v}" for k, v in r["finish_reasons"].items())
    bad = ", ".join(f"{k} {v}" for k, v in r["bad_by_kind"].items()) or "none"
    print(f"soak       {r['requests']} requests on {c['model']} ({c['runner']} runner), seed {c['seed']}, "
          f"{rec['env']['device']}; {r['num_pages']} KV pages{kv}{spec}{lora_text}")
    print(f"served     {r['good_requests']} good requests, samples by finish: {finish}")
    print(f"bad input  {r['bad_requests']} refused with their error: {bad}")
    print(f"lifecycle  {r['aborts']} aborted, {r['deadlines']} with a deadline, {r['preemptions']:.0f} preemptions, "
          f"prefix-cache hit rate {r['prefix_cache_hit_rate']:.2f}, peak running {r['peak_running']:.0f}"
          + (f", {r['lora_loads']:.0f} adapter loads" if c["num_adapters"] else ""))
    print(f"alone      {r['checked_alone']} greedy requests served again alone: equal "
          f"({r['near_ties']} near ties within {c['tie_tol']})")
    print(f"pages      {r['free_pages_start']} free at the start, {r['free_pages_end']} at the end: "
          f"{r['pages_leaked']} leaked")
    print(f"time       compile {r['compile_s']:.1f} s ({r['compiled_programs']} programs), run {r['run_s']:.1f} s "
          f"({r['requests_per_s']:.1f} requests/s, {r['generated_tokens']} tokens, {r['tokens_per_s']:.0f} tokens/s), "
          f"checks {r['check_s']:.1f} s, wall {r['wall_s']:.1f} s")
    print(f"violations {r['violations']}")
    for v in rec["violations"][:20]:
        print(f"  - {v}")
    if len(rec["violations"]) > 20:
        print(f"  ... and {len(rec['violations']) - 20} more")


def main(argv):
    del argv
    rec = run_soak()
    print_table(rec)
    if FLAGS.out:
        common.write_json(FLAGS.out, rec)
    if rec["violations"]:
        sys.exit(1)


def cli() -> None:
    """The `jaxinfer-soak` console script (the same as python -m jaxinfer.experiments.soak)."""
    common.run(main)


if __name__ == "__main__":
    cli()
