"""Scheduler and engine properties on the mock runner (no model): every request gets the tokens
worked out by hand, the token budget holds, static batches admit no one mid-batch, preemption
takes the latest admitted sequence, the batch fills under load, pages always come back; abort
and rollback; LoRA adapters on fewer device slots than adapters in use."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxinfer as ji
from jaxinfer import lora
from jaxinfer.engine.lifecycle import sample_seed
from jaxinfer.engine.mock_runner import MockRunner, expected_tokens
from jaxinfer.engine.scheduler import Scheduler

VOCAB = 300
CFG = ji.ModelConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                     head_dim=8, max_position_embeddings=128)
MODEL = ji.Model(CFG, params=None)


def mock_engine(**config) -> ji.Engine:
    return ji.Engine(MODEL, ji.EngineConfig(**config), runner=MockRunner)


class PlanLog:
    """Wraps Scheduler.schedule to check each plan as it is made."""

    def __init__(self, monkeypatch):
        self.plans = []
        original = Scheduler.schedule
        log = self

        def schedule(sched):
            running_before = list(sched.running)
            plan = original(sched)
            log.plans.append((sched, running_before, plan, list(sched.running)))
            return plan

        monkeypatch.setattr(Scheduler, "schedule", schedule)


def serve(engine, prompts, params, max_steps: int = 20_000):
    """engine.generate, but a run that does not end within max_steps fails instead of hanging."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids, outs = [], {}
    for p, sp in zip(prompts, params):
        try:
            ids.append(engine.add_request(p, sp))
        except ValueError as e:
            ids.append(ji.RequestOutput(p, [], None, "error", {}, error=str(e)))
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return [outs[i] if isinstance(i, int) else i for i in ids]
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    raise AssertionError(f"the workload did not finish in {max_steps} steps")


def random_prompts(rng, n, max_len=40, prefix=()):
    return [list(prefix) + rng.integers(0, VOCAB, size=int(rng.integers(1, max_len))).tolist() for _ in range(n)]


def check_outputs(engine, prompts, params, outs):
    capacity = engine.allocator.num_pages * engine.allocator.page_size
    for p, sp, o in zip(prompts, params, outs):
        want = expected_tokens(p, sp.max_tokens, VOCAB, seed=sp.seed or 0, greedy=sp.temperature == 0)
        if len(p) > capacity:
            assert o.finish_reason == "error" and "can never run" in o.error
        elif len(p) + sp.max_tokens - 1 <= capacity:
            assert o.token_ids == want
        else:  # ends early when it alone fills the cache
            assert o.finish_reason == "length" and o.token_ids == want[: len(o.token_ids)]
    assert engine.allocator.num_used == 0
    engine.allocator.check_invariants(owners={})


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    num_requests=st.integers(1, 10),
    num_pages=st.integers(3, 24),
    page_size=st.sampled_from([2, 4, 8]),
    batching=st.sampled_from(["continuous", "static"]),
    budget=st.integers(2, 64),
    chunked=st.booleans(),
    prefix_cache=st.booleans(),
    overlap=st.booleans(),
    decode_steps=st.sampled_from([1, 2, 5]),
    sampled=st.booleans(),
)
def test_any_workload_gets_its_tokens_and_returns_every_page(seed, num_requests, num_pages, page_size, batching,
                                                             budget, chunked, prefix_cache, overlap, decode_steps,
                                                             sampled):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, VOCAB, size=10).tolist() if seed % 2 else []
    prompts = random_prompts(rng, num_requests, prefix=prefix)
    params = [ji.SamplingParams(max_tokens=int(rng.integers(1, 30)), temperature=0.7 if sampled else 0.0, seed=i)
              for i in range(num_requests)]
    engine = mock_engine(batching=batching, num_pages=num_pages, page_size=page_size, max_batch=3,
                         max_tokens_per_step=budget, chunked_prefill=chunked, prefix_cache=prefix_cache,
                         overlap=overlap, decode_steps=decode_steps)
    check_outputs(engine, prompts, params, serve(engine, prompts, params))


ADAPTERS = [lora.random_adapter(CFG, 2, ("wq", "w_down"), seed=i, name=f"a{i}") for i in range(5)]


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    num_requests=st.integers(1, 12),
    slots=st.integers(1, 3),
    num_pages=st.integers(4, 24),
    page_size=st.sampled_from([2, 4]),
    batching=st.sampled_from(["continuous", "static"]),
    prefix_cache=st.booleans(),
    overlap=st.booleans(),
    decode_steps=st.sampled_from([1, 3]),
    sampled=st.booleans(),
)
def test_adapters_on_few_slots_get_their_tokens(seed, num_requests, slots, num_pages, page_size, batching,
                                                prefix_cache, overlap, decode_steps, sampled):
    """Requests under five adapters (or none) with shared prompt prefixes, on 1-3 slots: every
    request gets the tokens worked out for its adapter alone (the mock's output depends on the
    adapter in its slot and on the adapter the cached pages were written under), slot counts match
    the running sequences after every step, and everything comes back."""
    rng = np.random.default_rng(seed)
    prompts = random_prompts(rng, num_requests, max_len=20, prefix=rng.integers(0, VOCAB, size=6).tolist())
    params = [ji.SamplingParams(max_tokens=int(rng.integers(1, 16)), temperature=0.7 if sampled else 0.0, seed=i,
                                n=2 if sampled and i % 3 == 0 else 1) for i in range(num_requests)]
    names = [None if k == len(ADAPTERS) else ADAPTERS[k].name for k in rng.integers(0, len(ADAPTERS) + 1, num_requests)]
    engine = mock_engine(batching=batching, num_pages=num_pages, page_size=page_size, max_batch=3, max_adapters=slots,
                         max_lora_rank=2, prefix_cache=prefix_cache, overlap=overlap, decode_steps=decode_steps)
    for a in ADAPTERS:
        engine.add_adapter(a.name, a)
    ids, outs = [], {}
    for p, sp, name in zip(prompts, params, names):
        try:
            ids.append(engine.add_request(p, sp, adapter=name))
        except ValueError:
            ids.append(None)  # a prompt longer than the cache
    while engine.has_unfinished():
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
        engine.adapters.check_invariants(engine.scheduler.running)
    capacity = num_pages * page_size
    for p, sp, name, rid in zip(prompts, params, names, ids):
        if rid is None:
            continue
        adapter = engine.adapters.store[name] if name else None
        for k, sample in enumerate(outs[rid].samples or [outs[rid]]):  # forked samples share the adapter
            want = expected_tokens(p, sp.max_tokens, VOCAB, seed=sample_seed(sp.seed, k), greedy=not sampled,
                                   adapter=adapter)
            got = sample.token_ids
            assert got == want if len(p) + sp.max_tokens - 1 <= capacity else got == want[: len(got)]
    assert engine.allocator.num_used == 0 and engine.adapters.refs == [0] * slots


@pytest.mark.parametrize("chunked", [True, False])
def test_token_budget_is_never_exceeded(monkeypatch, chunked):
    log = PlanLog(monkeypatch)
    rng = np.random.default_rng(1)
    prompts = random_prompts(rng, 12, max_len=50 if chunked else 12)
    engine = mock_engine(max_tokens_per_step=20, max_batch=4, page_size=4, chunked_prefill=chunked)
    params = ji.SamplingParams(max_tokens=12, temperature=0.0)
    check_outputs(engine, prompts, [params] * 12, serve(engine, prompts, params))
    for _, _, plan, _ in log.plans:
        chunks = [n for _, n in plan.prefill]
        # Unchunked, a whole prompt may exceed the budget, but only as the step's one prompt.
        assert len(plan.decode) + sum(chunks) <= 20 or (not chunked and len(chunks) == 1)
    assert any(len(p.prefill) > 1 for _, _, p, _ in log.plans)


def test_static_batching_never_admits_mid_batch(monkeypatch):
    log = PlanLog(monkeypatch)
    rng = np.random.default_rng(2)
    prompts = random_prompts(rng, 10)
    params = [ji.SamplingParams(max_tokens=int(m), temperature=0.0) for m in rng.integers(1, 25, size=10)]
    engine = mock_engine(batching="static", max_batch=3)
    check_outputs(engine, prompts, params, serve(engine, prompts, params))
    for _, before, plan, after in log.plans:
        admitted = [s for s in after if s not in before]
        if admitted:
            assert not before, "a static batch admitted a sequence while others ran"


def test_preemption_takes_the_latest_admitted(monkeypatch):
    log = PlanLog(monkeypatch)
    rng = np.random.default_rng(3)
    prompts = random_prompts(rng, 8, max_len=30)
    params = ji.SamplingParams(max_tokens=20, temperature=0.0)
    engine = mock_engine(num_pages=10, page_size=4, max_batch=4)
    check_outputs(engine, prompts, [params] * 8, serve(engine, prompts, params))
    preempted = 0
    for _, before, plan, _ in log.plans:
        for victim in plan.preempted:
            preempted += 1
            still = [s for s in before if s not in plan.preempted[: plan.preempted.index(victim)]]
            assert victim is still[-1], "the victim was not the latest admitted running sequence"
    assert preempted > 0


def test_the_batch_fills_under_load():
    rng = np.random.default_rng(4)
    prompts = random_prompts(rng, 20)
    engine = mock_engine(max_batch=6)
    params = ji.SamplingParams(max_tokens=30, temperature=0.0)
    check_outputs(engine, prompts, [params] * 20, serve(engine, prompts, params))
    assert engine.stats["peak_running"] == 6


def test_parallel_samples_share_and_copy_pages():
    engine = mock_engine(page_size=4)
    prompt = list(range(1, 11))
    (out,) = serve(engine, [prompt], ji.SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=5))
    assert len(out.samples) == 3 and engine.stats["copied_pages"] > 0
    assert out.token_ids == expected_tokens(prompt, 8, VOCAB, seed=5, greedy=False)
    assert engine.allocator.num_used == 0


def test_abort_returns_pages_and_leaves_others_alone():
    rng = np.random.default_rng(5)
    prompts = random_prompts(rng, 4)
    params = ji.SamplingParams(max_tokens=20, temperature=0.0)
    engine = mock_engine(max_batch=4, page_size=4)
    ids = [engine.add_request(p, params) for p in prompts]
    for _ in range(4):
        engine.step()
    out = engine.abort(ids[1])
    assert out.finish_reason == "aborted" and len(out.token_ids) < 20
    with pytest.raises(ValueError, match=f"request_id={ids[1]}"):
        engine.abort(ids[1])
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert ids[1] not in done
    for i in (0, 2, 3):
        assert done[ids[i]].token_ids == expected_tokens(prompts[i], 20, VOCAB)
    assert engine.allocator.num_used == 0
    waiting = engine.add_request(prompts[0], params)
    assert engine.abort(waiting).token_ids == [] and engine.allocator.num_used == 0


@pytest.mark.parametrize("n", [1, 3, 6])
def test_rollback_forgets_tokens_and_their_pages(n):
    """Drop a sequence's newest tokens (as rejected speculative tokens are), then go on: its pages
    shrink to what it holds, a rewritten page leaves the prefix cache, and the output is the one
    worked out by hand."""
    engine = mock_engine(page_size=4, overlap=False, prefix_cache=True)
    prompt = list(range(1, 10))
    rid = engine.add_request(prompt, ji.SamplingParams(max_tokens=20, temperature=0.0))
    for _ in range(8):
        engine.step()
    (seq,) = engine.requests[rid].sequences
    assert len(seq.generated) == 8 and seq.num_computed == 16
    registered = set(engine.allocator._page_hash)
    engine.scheduler.kv.rollback(seq, n)
    assert len(seq.generated) == 8 - n and seq.num_computed == 16 - n == len(seq.tokens) - 1
    assert len(seq.pages) == -(-seq.num_computed // 4)
    assert not {seq.pages[i] for i in range(seq.num_computed // 4, len(seq.pages))} & set(engine.allocator._page_hash)
    assert registered  # the full pages before were in the prefix cache
    engine.allocator.check_invariants()
    seq.stop = engine.rules.checker(seq.sampling, seq.stop.budget)
    while engine.has_unfinished():
        outs = engine.step()
    assert outs[0].token_ids == expected_tokens(prompt, 20, VOCAB)
    assert engine.allocator.num_used == 0
    with pytest.raises(ValueError, match="rollback of 30 tokens"):
        engine.scheduler.kv.rollback(dataclasses.replace(seq, tokens=prompt + [1]), 30)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    num_requests=st.integers(1, 8),
    num_pages=st.integers(4, 24),
    page_size=st.sampled_from([2, 4, 8]),
    budget=st.integers(2, 48),
    prefix_cache=st.booleans(),
    k=st.integers(1, 6),
    sampled=st.booleans(),
    batching=st.sampled_from(["continuous", "static"]),
)
def test_speculative_steps_keep_every_token_and_page(seed, num_requests, num_pages, page_size, budget, prefix_cache,
                                                     k, sampled, batching):
    """Prompt-lookup speculation on the mock: outputs are the hand-worked ones (the drafts rejected
    or accepted, their K/V rolled back), max_tokens holds, and every page comes back."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, VOCAB, size=10).tolist() if seed % 2 else []
    prompts = [prefix + rng.integers(0, 4, size=int(rng.integers(1, 30))).tolist() for _ in range(num_requests)]
    params = [ji.SamplingParams(max_tokens=int(rng.integers(1, 30)), temperature=0.7 if sampled else 0.0, seed=i)
              for i in range(num_requests)]
    engine = mock_engine(batching=batching, num_pages=num_pages, page_size=page_size, max_batch=3,
                         max_tokens_per_step=budget, prefix_cache=prefix_cache,
                         speculative=ji.SpeculativeConfig(method="ngram", num_tokens=k, ngram=2))
    check_outputs(engine, prompts, params, serve(engine, prompts, params))
    m = engine.metrics()
    assert m["spec_emitted"] <= sum(sp.max_tokens for sp in params)
    assert m["spec_passes"] == 0 or 1 <= m["spec_tokens_per_pass"] <= k + 1
