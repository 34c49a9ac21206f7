"""The paged engine: token-for-token equal to the contiguous baseline and HF transformers, under
every batching policy, chunked prefill, preemption, prefix caching and parallel sampling."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
from helpers import hf_model, save_hf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxinfer as ji
from jaxinfer.engine import runner as runner_lib
from jaxinfer.engine.batch import DecodeBucket

GREEDY = ji.SamplingParams(max_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def model():
    cfg = ji.ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=96)
    return ji.Model(cfg, ji.init_params(cfg, jax.random.key(1), std=0.3), ji.ByteTokenizer())


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(42)
    return [rng.integers(0, 256, size=n).tolist() for n in (3, 21, 40, 8, 33, 1)]


@pytest.fixture(scope="module")
def baseline(model, prompts):
    return [o.token_ids for o in ji.generate(model, prompts, GREEDY)]


CONFIGS = {
    "continuous": ji.EngineConfig(),
    "static": ji.EngineConfig(batching="static", max_batch=2),
    "no_chunking": ji.EngineConfig(chunked_prefill=False, max_tokens_per_step=16),
    "small_chunks": ji.EngineConfig(max_tokens_per_step=12, page_size=4),
    "preemption": ji.EngineConfig(num_pages=8, page_size=8, max_batch=4),
    "preemption_static": ji.EngineConfig(batching="static", num_pages=8, page_size=8, max_batch=4, max_tokens_per_step=20),
    "no_prefix_cache": ji.EngineConfig(prefix_cache=False, page_size=8),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_equals_baseline(model, prompts, baseline, name):
    engine = ji.Engine(model, CONFIGS[name])
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == baseline
    assert all(o.finish_reason == "length" for o in outs)
    if name.startswith("preemption"):
        assert engine.stats["preemptions"] > 0
    assert engine.allocator.num_used == 0  # every page back
    engine.allocator.check_invariants(owners={})


def test_prefix_cache_hits_keep_outputs(model):
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, size=40).tolist()
    prompts = [base + [1, 2, 3], base + [4, 5], base[:35], base]
    ref = [o.token_ids for o in ji.generate(model, prompts, GREEDY)]
    engine = ji.Engine(model, ji.EngineConfig(page_size=8))
    outs = [engine.generate([p], GREEDY)[0] for p in prompts]  # one at a time: later ones hit
    assert [o.token_ids for o in outs] == ref
    assert [o.metrics["cached_tokens"] for o in outs] == [0, 40, 32, 32]  # the last token is never cached
    together = ji.Engine(model, ji.EngineConfig(page_size=8)).generate(prompts, GREEDY)
    assert [o.token_ids for o in together] == ref


def test_sampling_equals_baseline_and_ignores_batch(model, prompts):
    params = [ji.SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=s) for s in range(len(prompts))]
    ref = [o.token_ids for o in ji.generate(model, prompts, params)]
    engine = ji.Engine(model, ji.EngineConfig(max_batch=3, num_pages=12, page_size=8))
    assert [o.token_ids for o in engine.generate(prompts, params)] == ref
    alone = ji.Engine(model).generate([prompts[2]], [params[2]])[0]
    assert alone.token_ids == ref[2]


def test_parallel_sampling_shares_pages(model, prompts):
    sp = ji.SamplingParams(max_tokens=10, temperature=1.0, n=4, seed=3)
    engine = ji.Engine(model, ji.EngineConfig(page_size=8))
    (out,) = engine.generate([prompts[4]], sp)
    assert len(out.samples) == 4 and out.samples[0] is out
    single = ji.Engine(model).generate([prompts[4]], ji.SamplingParams(max_tokens=10, temperature=1.0, seed=3))[0]
    assert out.token_ids == single.token_ids  # sample 0 is the n=1 sample
    assert len({tuple(s.token_ids) for s in out.samples}) == 4
    assert engine.stats["copied_pages"] > 0  # the shared partial page was copied before writing
    assert engine.allocator.num_used == 0
    greedy = engine.generate([prompts[4]], ji.SamplingParams(max_tokens=10, temperature=0.0, n=3))[0]
    assert all(s.token_ids == greedy.token_ids for s in greedy.samples)


def test_compiles_once_per_bucket(model, prompts):
    runner_lib.TRACE_COUNTS.clear()
    engine = ji.Engine(model, ji.EngineConfig(max_batch=4))
    engine.generate(prompts, ji.SamplingParams(max_tokens=40, temperature=0.0))
    steps = engine.stats["steps"]
    assert steps > 40
    traced = runner_lib.TRACE_COUNTS["step"] + runner_lib.TRACE_COUNTS["multi_decode"]
    assert traced == len(engine.buckets) <= 10
    # The same workload again compiles nothing new.
    ji.Engine(model, ji.EngineConfig(max_batch=4)).generate(prompts, ji.SamplingParams(max_tokens=40, temperature=0.0))
    assert runner_lib.TRACE_COUNTS["step"] + runner_lib.TRACE_COUNTS["multi_decode"] == traced


def test_stop_conditions_match_baseline(model, prompts, baseline):
    stop_tok = baseline[1][5]
    sp = ji.SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=(stop_tok,))
    ref = ji.generate(model, prompts, sp)
    outs = ji.Engine(model).generate(prompts, sp)
    assert [(o.token_ids, o.finish_reason) for o in outs] == [(o.token_ids, o.finish_reason) for o in ref]


def test_bad_requests_are_refused_and_do_not_disturb_others(model, prompts, baseline):
    """A bad prompt anywhere in a batch raises naming it, before any prompt is served; the engine
    is left as it was and serves the good prompts after."""
    engine = ji.Engine(model, ji.EngineConfig(num_pages=8, page_size=8))  # holds 64 tokens
    for bad, message in (([], r"prompts\[1\]: prompt is empty"),
                         ([1, 2, 999], r"prompts\[1\]: prompt has token id 999 outside the vocabulary"),
                         ([5] * 70, r"prompts\[1\]: prompt has 70 tokens; the KV cache holds 64 .* can never run")):
        with pytest.raises(ValueError, match=message):
            engine.generate([prompts[0], bad, prompts[1]], GREEDY)
        assert not engine.has_unfinished() and engine.allocator.num_used == 0
    outs = engine.generate([prompts[0], prompts[1], prompts[3]], GREEDY)
    assert [o.token_ids for o in outs] == [baseline[0], baseline[1], baseline[3]]
    with pytest.raises(ValueError, match="prompt has 97 tokens, over the model's context of 96"):
        ji.Engine(model).add_request([1] * 97)


def test_request_alone_too_long_for_the_cache_ends_with_length(model):
    engine = ji.Engine(model, ji.EngineConfig(num_pages=2, page_size=8))
    (out,) = engine.generate([[1] * 10], ji.SamplingParams(max_tokens=30, temperature=0.0))
    assert out.finish_reason == "length" and len(out.token_ids) == 16 - 10 + 1
    assert engine.allocator.num_used == 0


@pytest.mark.parametrize("name", ["continuous", "static"])
def test_metrics(model, prompts, name):
    engine = ji.Engine(model, CONFIGS[name])
    outs = engine.generate(prompts, GREEDY)
    for o in outs:
        m = o.metrics
        assert 0 < m["ttft_s"] <= m["latency_s"] and m["tpot_s"] > 0
        assert m["generated_tokens"] == 16 and m["prompt_tokens"] == len(o.prompt_token_ids)
    assert len(engine.pages_in_use) == engine.stats["steps"] and max(engine.pages_in_use) > 0
    run = engine.metrics()
    assert run["decode_tokens"] + len(prompts) == 16 * len(prompts)
    assert 0 < run["pages_in_use_mean"] <= run["pages_in_use_max"] <= run["num_pages"]
    assert run["host_s"] > 0 and run["device_s"] > 0 and 0 <= run["kv_waste"] < 1
    assert engine.last_run["generated_tokens"] == 16 * len(prompts) and engine.last_run["throughput_tok_s"] > 0


def test_engine_config_errors():
    for kwargs, msg in [
        (dict(batching="dynamic"), "batching='dynamic'"),
        (dict(page_size=0), "page_size=0"),
        (dict(num_pages=0), "num_pages=0"),
        (dict(max_batch=0), "max_batch=0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            ji.EngineConfig(**kwargs)


def test_auto_implementations_resolve_to_the_backends_path():
    """"auto" is the engine's default: the Pallas kernels on a GPU, the XLA path on a CPU; the
    config holds the resolved names, and an Impl built from "auto" is the same static jit key."""
    expected = "pallas" if jax.default_backend() == "gpu" else "xla"
    config = ji.EngineConfig()
    assert (config.attention, config.matmul, config.lora_impl) == (expected,) * 3
    assert ji.models.decoder.Impl("auto", "auto") == ji.models.decoder.Impl(expected, expected)
    assert ji.EngineConfig(attention="pallas").attention == "pallas"
    with pytest.raises(ValueError, match="attention='fast'"):
        ji.EngineConfig(attention="fast")


@pytest.mark.parametrize("arch", ["llama", "mistral_window"])
def test_engine_matches_hf_transformers(arch, tmp_path):
    hf = hf_model(arch, seed=11)
    model = ji.load_model(save_hf(hf, tmp_path / arch))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (4, 13, 30)]
    engine = ji.Engine(model, ji.EngineConfig(page_size=8, max_tokens_per_step=16, num_pages=12))
    outs = engine.generate(prompts, ji.SamplingParams(max_tokens=24, temperature=0.0))
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                              attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert o.token_ids == ref[0, len(p):].tolist()


# A few fixed cache shapes and budgets, so the examples share compiled programs; the scheduler's
# own properties are checked over many more workloads on the mock runner (test_scheduler.py).
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    max_tokens=st.lists(st.integers(1, 12), min_size=6, max_size=6),
    num_pages=st.sampled_from([6, 16]),
    page_size=st.sampled_from([4, 8]),
    batching=st.sampled_from(["continuous", "static"]),
    budget=st.sampled_from([8, 32]),
    shared_prefix=st.booleans(),
    overlap=st.booleans(),
    decode_steps=st.sampled_from([1, 3]),
)
def test_random_workloads(model, lengths, max_tokens, num_pages, page_size, batching, budget, shared_prefix,
                          overlap, decode_steps):
    """Random workloads on the model: outputs equal the baseline, and every page comes back."""
    rng = np.random.default_rng(len(lengths) * 1000 + num_pages)
    prefix = rng.integers(0, 256, size=12).tolist() if shared_prefix else []
    prompts = [(prefix + rng.integers(0, 256, size=n).tolist())[:30] for n in lengths]
    params = [ji.SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens[: len(prompts)]]
    capacity = num_pages * page_size
    engine = ji.Engine(model, ji.EngineConfig(batching=batching, num_pages=num_pages, page_size=page_size,
                                              max_batch=3, max_tokens_per_step=budget, overlap=overlap,
                                              decode_steps=decode_steps))
    never = [i for i, p in enumerate(prompts) if len(p) > capacity]
    if never:  # a prompt the cache can never hold refuses the batch
        with pytest.raises(ValueError, match=rf"prompts\[{never[0]}\]: .* can never run"):
            engine.generate(prompts, params)
        assert engine.allocator.num_used == 0
        kept = [i for i in range(len(prompts)) if i not in never]
        prompts, params = [prompts[i] for i in kept], [params[i] for i in kept]
    outs = engine.generate(prompts, params) if prompts else []
    ref = ji.generate(model, prompts, params) if prompts else []
    for p, sp, o, r in zip(prompts, params, outs, ref):
        if len(p) + sp.max_tokens - 1 <= capacity:  # fits alone: must equal the baseline
            assert o.token_ids == r.token_ids
        else:  # ends early when it alone fills the cache
            assert o.finish_reason == "length" and o.token_ids == r.token_ids[: len(o.token_ids)]
    assert engine.allocator.num_used == 0
    engine.allocator.check_invariants(owners={})


@pytest.mark.parametrize("window", [pytest.param(0, marks=pytest.mark.slow), 6])
def test_pallas_attention_equals_xla(window):
    """The engine and the baseline with the Pallas kernels (interpret mode here) give the XLA path's tokens."""
    cfg = ji.ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=1, head_dim=16, max_position_embeddings=64, layer_windows=(window, window))
    model = ji.Model(cfg, ji.init_params(cfg, jax.random.key(2), std=0.3), ji.ByteTokenizer())
    rng = np.random.default_rng(window)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (2, 9, 19)]
    sp = ji.SamplingParams(max_tokens=10, temperature=0.0)
    config = ji.EngineConfig(page_size=8, max_tokens_per_step=12, num_pages=8)
    ref = [o.token_ids for o in ji.Engine(model, config).generate(prompts, sp)]
    pallas = ji.Engine(model, dataclasses.replace(config, attention="pallas")).generate(prompts, sp)
    assert [o.token_ids for o in pallas] == ref
    assert [o.token_ids for o in ji.generate(model, prompts, sp, attn_impl="pallas")] == ref


def test_contiguous_layout_equals_paged_and_wastes_more(model, prompts, baseline):
    budget = 4 * 96  # four full-length requests
    paged = ji.Engine(model, ji.EngineConfig(kv_budget_tokens=budget, page_size=8, prefix_cache=False))
    contiguous = ji.Engine(model, ji.EngineConfig(kv_layout="contiguous", kv_budget_tokens=budget))
    assert [o.token_ids for o in paged.generate(prompts, GREEDY)] == baseline
    assert [o.token_ids for o in contiguous.generate(prompts, GREEDY)] == baseline
    assert contiguous.allocator.num_pages == 4 and contiguous.allocator.page_size == 96
    assert max(n for n in contiguous.pages_in_use) <= 4
    assert paged.kv_waste() < 0.25 < contiguous.kv_waste()
    with pytest.raises(ValueError, match="kv_budget_tokens=50 is too small for even one request"):
        ji.Engine(model, ji.EngineConfig(kv_layout="contiguous", kv_budget_tokens=50))


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_multi_step_decode_equals_single_step(model, prompts, baseline, batching):
    engine = ji.Engine(model, ji.EngineConfig(batching=batching, max_batch=3, decode_steps=4, page_size=8))
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == baseline
    assert any(isinstance(b, DecodeBucket) for b in engine.buckets)  # multi-step calls ran
    assert engine.stats["steps"] < 16 + len(prompts)
    assert engine.allocator.num_used == 0
    sp = [ji.SamplingParams(max_tokens=m, temperature=0.8, seed=i) for i, m in enumerate((5, 9, 3, 14, 7, 2))]
    ref = [o.token_ids for o in ji.generate(model, prompts, sp)]
    multi = ji.Engine(model, ji.EngineConfig(batching=batching, max_batch=3, decode_steps=4, page_size=8))
    assert [o.token_ids for o in multi.generate(prompts, sp)] == ref


@pytest.mark.parametrize("name,overlap,decode_steps", [
    ("continuous", False, 1), ("preemption", False, 1), ("small_chunks", False, 3),
    ("continuous", True, 3), ("preemption_static", True, 3),
])
def test_overlap_and_decode_steps_equal_baseline(model, prompts, baseline, name, overlap, decode_steps):
    """Dispatching the next decode call before reading the last one back (the default, checked
    above) or not, one or several decode steps per call: no token changes."""
    config = dataclasses.replace(CONFIGS[name], overlap=overlap, decode_steps=decode_steps)
    engine = ji.Engine(model, config)
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == baseline
    assert engine.allocator.num_used == 0
    engine.allocator.check_invariants(owners={})
    if name in ("continuous", "no_prefix_cache"):
        assert (engine.stats["lookahead_calls"] > 0) == overlap


def test_overlap_stops_sampling_and_forks(model, prompts, baseline):
    """Sequences that stop inside an in-flight call drop the look-ahead's tokens; sampled and n > 1."""
    config = ji.EngineConfig(overlap=True, max_batch=4, page_size=8)
    stop = ji.SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=(baseline[1][5], baseline[3][2]))
    ref = ji.generate(model, prompts, stop)
    engine = ji.Engine(model, config)
    outs = engine.generate(prompts, stop)
    assert [(o.token_ids, o.finish_reason) for o in outs] == [(o.token_ids, o.finish_reason) for o in ref]
    assert engine.stats["lookahead_calls"] > 0
    sp = [ji.SamplingParams(max_tokens=m, temperature=0.8, seed=i) for i, m in enumerate((5, 9, 3, 14, 7, 2))]
    assert ([o.token_ids for o in ji.Engine(model, config).generate(prompts, sp)]
            == [o.token_ids for o in ji.generate(model, prompts, sp)])
    forked = ji.Engine(model, config).generate([prompts[4]], ji.SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=3))
    alone = ji.Engine(model).generate([prompts[4]], ji.SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=3))
    assert [s.token_ids for s in forked[0].samples] == [s.token_ids for s in alone[0].samples]
    assert engine.allocator.num_used == 0
    engine.allocator.check_invariants(owners={})


@pytest.mark.parametrize("overlap,decode_steps", [(True, 2), (False, 1)])
def test_warmup_compiles_every_program_a_run_needs(model, overlap, decode_steps):
    """After Engine.warmup, serving any workload within its lengths compiles nothing more (decode
    as k-step calls, or as plain steps)."""
    config = ji.EngineConfig(max_batch=3, page_size=8, max_tokens_per_step=24, overlap=overlap,
                             decode_steps=decode_steps)
    engine = ji.Engine(model, config)
    compiled = engine.warmup(max_prompt_len=14, max_len=26)
    assert compiled > 0
    before = sum(runner_lib.TRACE_COUNTS.values())
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(1, 15, size=9)]
    params = [ji.SamplingParams(max_tokens=int(m), temperature=0.0) for m in rng.integers(1, 13, size=9)]
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ji.generate(model, prompts, params)]
    assert sum(runner_lib.TRACE_COUNTS.values()) == before
    assert engine.warmup(max_prompt_len=14, max_len=26) == 0  # all compiled already


def test_limits_and_finish_reasons(model, prompts):
    """A request cut by the context ends with "context"; max_tokens or max_seq_len beyond the
    context are refused; a bad batch is refused before any of it is served."""
    engine = ji.Engine(model)
    (out,) = engine.generate([[1] * 90], ji.SamplingParams(max_tokens=20, temperature=0.0))
    assert out.finish_reason == "context" and len(out.token_ids) == 96 - 90 + 1
    with pytest.raises(ValueError, match="max_tokens=97 is over the engine's max_seq_len=96"):
        engine.add_request([1], ji.SamplingParams(max_tokens=97))
    with pytest.raises(ValueError, match="max_seq_len=200 is over the model's context of 96"):
        ji.Engine(model, ji.EngineConfig(max_seq_len=200))
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt is empty"):
        engine.generate([prompts[0], []], GREEDY)
    assert not engine.has_unfinished() and engine.allocator.num_used == 0
    with pytest.raises(ValueError, match="sampling is a dict"):
        engine.generate([prompts[0]], {"max_tokens": 4})
