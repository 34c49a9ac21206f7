"""The request lifecycle under load and bad input: streamed outputs from step() and stream(),
abort, deadlines, and non-finite logits failing one request while the rest are served as if it
were not there. Mostly on the mock runner (outputs worked out by hand), the NaN guard on a model."""

from __future__ import annotations

import functools
import time

import jax
import numpy as np
import pytest

import jaxinfer as ji
from jaxinfer.engine.lifecycle import sample_seed
from jaxinfer.engine.mock_runner import MockRunner, expected_tokens

VOCAB = 300
CFG = ji.ModelConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                     head_dim=8, max_position_embeddings=128)
MODEL = ji.Model(CFG, params=None)
POISON = VOCAB - 1  # the mock's rows whose context holds this token sample NONFINITE

CONFIGS = {
    "plain": dict(overlap=False),
    "overlap": dict(decode_steps=3),
    "tight": dict(num_pages=10, page_size=4, max_batch=4, overlap=False),
    "ngram": dict(speculative=ji.SpeculativeConfig(method="ngram", num_tokens=3)),
}


@pytest.fixture(scope="module")
def model():
    cfg = ji.ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=96)
    return ji.Model(cfg, ji.init_params(cfg, jax.random.key(1), std=0.3), ji.ByteTokenizer())


def mock_engine(nan_token=None, **config) -> ji.Engine:
    return ji.Engine(MODEL, ji.EngineConfig(**config), runner=functools.partial(MockRunner, nan_token=nan_token))


def workload(rng, n, poison=False):
    """n prompts (some sharing a prefix) and sampling params, greedy and sampled, n = 1 or 2."""
    prefix = rng.integers(0, POISON, size=6).tolist()
    prompts = [(prefix if i % 3 == 0 else []) + rng.integers(0, POISON, size=int(rng.integers(1, 20))).tolist()
               for i in range(n)]
    if poison:
        for i in range(0, n, 4):
            prompts[i][int(rng.integers(0, len(prompts[i])))] = POISON
    params = [ji.SamplingParams(max_tokens=int(rng.integers(1, 24)), temperature=0.0 if i % 2 else 0.8, seed=i,
                                n=2 if i % 5 == 0 else 1) for i in range(n)]
    return prompts, params


def served_alone(prompt, sp, sample=0):
    """(tokens, error step or None): what the mock serves a request's sample alone when a token
    POISON in its context fails it."""
    want = expected_tokens(prompt, sp.max_tokens, VOCAB, seed=sample_seed(sp.seed, sample), greedy=sp.greedy)
    if POISON in prompt:
        return [], 0
    if POISON in want[:-1]:
        i = want.index(POISON) + 1
        return want[:i], i
    return want, None


def total_tokens(out) -> int:
    return sum(len(s.token_ids) for s in out.samples or [out])


def drive(engine, prompts, params):
    """Add every request, step to the end; returns {request id: [outputs in step order]} and ids."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    seen = {rid: [] for rid in ids}
    while engine.has_unfinished():
        before = {rid: [len(s.generated) for s in engine.requests[rid].sequences] for rid in engine.requests.live}
        outs = engine.step()
        got = {rid for rid, n in before.items()
               if rid not in engine.requests.live or [len(s.generated) for s in engine.requests[rid].sequences] != n}
        assert {o.request_id for o in outs} == got  # every request with new tokens or finished, and no other
        for o in outs:
            seen[o.request_id].append(o)
    return seen, ids


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_streams_every_request_with_new_tokens(name, rng):
    """step() returns each request that got tokens or finished in it; a request's outputs grow
    token by token to its final one (finished last, and only last), which is the hand-worked one."""
    engine = mock_engine(**CONFIGS[name])
    prompts, params = workload(rng, 12)
    seen, ids = drive(engine, prompts, params)
    capacity = engine.allocator.num_pages * engine.allocator.page_size
    for p, sp, rid in zip(prompts, params, ids):
        outs = seen[rid]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert all(o.finish_reason is None and o.error is None for o in outs[:-1])
        final = outs[-1]
        assert final.finish_reason in ("length", "stop") and final.request_id == rid
        for a, b in zip(outs, outs[1:]):
            assert b.finished or total_tokens(a) < total_tokens(b)
            for x, y in zip(a.samples or [a], b.samples or [b]):
                assert y.token_ids[: len(x.token_ids)] == x.token_ids
        for k, sample in enumerate(final.samples or [final]):
            want = expected_tokens(p, sp.max_tokens, VOCAB, seed=sample_seed(sp.seed, k), greedy=sp.greedy)
            got = sample.token_ids
            assert got == want if len(p) + sp.max_tokens - 1 <= capacity else got == want[: len(got)]
    assert engine.allocator.num_used == 0


def test_stream_text_holds_back_a_possible_stop_string():
    """A streamed text never shows what a stop string later cuts, nor half a character."""
    engine = ji.Engine(ji.load_model("tiny"), ji.EngineConfig(overlap=False, max_batch=2, max_seq_len=64))
    prompt = "def fibonacci(n):"
    (ref,) = engine.generate([prompt], ji.SamplingParams(max_tokens=40, temperature=0.0))
    stop = ref.text[20:24]  # a stop string the greedy completion reaches
    sp = ji.SamplingParams(max_tokens=40, temperature=0.0, stop=(stop, "\u00e9t\u00e9"))
    outs = list(engine.stream(prompt, sp))
    final = outs[-1]
    assert final.finished and final.finish_reason == "stop" and final.text == ref.text[: ref.text.index(stop)]
    texts = [o.text for o in outs]
    assert all(final.text.startswith(t) for t in texts)  # never taken back
    assert all(stop not in t and not any(t.endswith(stop[:k]) for k in range(1, len(stop))) for t in texts[:-1])
    assert [o.token_ids for o in outs] == [final.token_ids[: len(o.token_ids)] for o in outs]
    assert len(outs) == len(final.token_ids)  # one output per token (the plain engine decodes one at a time)


def test_stream_yields_each_new_token_and_close_aborts(rng):
    engine = mock_engine(page_size=4, max_batch=4)
    prompts, params = workload(rng, 5)
    others = [engine.add_request(p, sp) for p, sp in zip(prompts[1:], params[1:])]
    sp = ji.SamplingParams(max_tokens=12, temperature=0.0)
    outs = list(engine.stream(prompts[0], sp))
    assert [len(o.token_ids) for o in outs] == list(range(1, 13)) and outs[-1].finished
    assert outs[-1].token_ids == expected_tokens(prompts[0], 12, VOCAB)

    # Two streams side by side, one closed early: it is aborted, its pages come back, the other is untouched.
    a, b = engine.stream(prompts[1], sp), engine.stream(prompts[2], sp)
    first_a = [next(a) for _ in range(3)]
    rid = first_a[0].request_id
    a.close()
    assert rid not in engine.requests.live
    outs_b = list(b)
    assert outs_b[-1].token_ids == expected_tokens(prompts[2], 12, VOCAB) and outs_b[-1].finish_reason == "length"
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    for rid, p, sp_i in zip(others, prompts[1:], params[1:]):
        if rid in done:  # the ones the streams did not drive to the end
            want = expected_tokens(p, sp_i.max_tokens, VOCAB, seed=sp_i.seed, greedy=sp_i.greedy)
            assert done[rid].token_ids == want
    assert engine.allocator.num_used == 0
    with pytest.raises(ValueError, match="prompt is empty"):
        next(engine.stream([]))


def test_abort_mid_run_keeps_tokens_and_returns_pages(rng):
    engine = mock_engine(page_size=4, max_batch=4, decode_steps=2)
    prompts, _ = workload(rng, 3)
    sp = ji.SamplingParams(max_tokens=30, temperature=0.0)
    ids = [engine.add_request(p, sp) for p in prompts]
    for _ in range(5):
        engine.step()
    used = engine.allocator.num_used
    held = len(engine.requests[ids[0]].sequences[0].pages)
    out = engine.abort(ids[0])
    assert out.finished and out.finish_reason == "aborted" and 0 < len(out.token_ids) < 30
    assert out.token_ids == expected_tokens(prompts[0], 30, VOCAB)[: len(out.token_ids)]
    assert engine.allocator.num_used == used - held  # at once
    while engine.has_unfinished():
        assert ids[0] not in {o.request_id for o in engine.step()}
    assert engine.allocator.num_used == 0


@pytest.fixture
def clock(monkeypatch):
    """A settable time.perf_counter, for deadlines."""
    now = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    return now


@pytest.mark.parametrize("name", ["plain", "overlap"])
def test_deadline_ends_a_request_with_timeout(name, clock, rng):
    """A request past its deadline (its own timeout_s, else the engine's) ends with "timeout" and
    the tokens it had; its pages come back; the others are served as before."""
    engine = mock_engine(request_timeout_s=50.0, max_batch=3, page_size=4, **CONFIGS[name])
    prompts, _ = workload(rng, 4)
    sps = [ji.SamplingParams(max_tokens=40, temperature=0.0, timeout_s=t) for t in (5.0, None, 100.0, 1e-3)]
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, sps)]
    done = {}
    for t, steps in ((1000.0, 4), (1006.0, 4), (1051.0, 200)):
        clock[0] = t
        for _ in range(steps):
            done.update((o.request_id, o) for o in engine.step() if o.finished)
    reasons = [done[rid].finish_reason for rid in ids]
    assert reasons == ["timeout", "timeout", "length", "timeout"]
    assert done[ids[3]].token_ids == []  # expired while it waited for a place in the batch
    for rid, p in zip(ids[:2], prompts):
        got = done[rid].token_ids
        assert 0 < len(got) < 40 and got == expected_tokens(p, 40, VOCAB)[: len(got)]
    assert len(done[ids[0]].token_ids) < len(done[ids[1]].token_ids)
    assert done[ids[2]].token_ids == expected_tokens(prompts[2], 40, VOCAB)
    assert engine.allocator.num_used == 0 and not engine.has_unfinished()


def test_timeout_checks():
    for value in (0, -1.0, float("nan"), "5", True):
        with pytest.raises(ValueError, match="timeout_s must be None or a number of seconds > 0"):
            ji.SamplingParams(timeout_s=value)
        with pytest.raises(ValueError, match="request_timeout_s must be None or a number of seconds > 0"):
            ji.EngineConfig(request_timeout_s=value)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_nonfinite_logits_fail_only_their_request_mock(name, rng):
    """A request whose logits turn non-finite (its context holds POISON) ends with "error" and the
    tokens before it; every other request gets what it gets served alone; pages come back clean
    (the mock fails a read of a cleared slot before it is written again)."""
    engine = mock_engine(nan_token=POISON, **CONFIGS[name])
    prompts, params = workload(rng, 16, poison=True)
    seen, ids = drive(engine, prompts, params)
    capacity = engine.allocator.num_pages * engine.allocator.page_size
    failed = 0
    for p, sp, rid in zip(prompts, params, ids):
        final = seen[rid][-1]
        for k, sample in enumerate(final.samples or [final]):
            want, error_at = served_alone(p, sp, k)
            got = sample.token_ids
            if error_at is not None and error_at < sp.max_tokens and (len(p) + error_at <= capacity):
                failed += 1
                assert sample.finish_reason == "error" and got == want
                assert f"non-finite logits (NaN or Inf) at generated token {error_at} " in sample.error
            else:
                assert got == want if len(p) + sp.max_tokens - 1 <= capacity else got == want[: len(got)]
    assert failed >= 4
    assert engine.allocator.num_used == 0 and engine.runner.stats["cleared_pages"] > 0
    engine.allocator.check_invariants(owners={})


def test_nonfinite_logits_in_a_prompt_chunk_fail_the_request_at_that_chunk():
    """Every prompt chunk's logits are checked, not only the chunk that completes the prompt (the
    chunks of a preempted sequence being recomputed included): a request whose first chunk holds
    POISON fails after that chunk, before the rest of its prompt is computed, and its pages come
    back cleared; the request beside it is served as if alone."""
    engine = mock_engine(nan_token=POISON, max_tokens_per_step=8, max_batch=2)
    poisoned, clean = [POISON] + list(range(1, 40)), list(range(50, 70))
    sp = ji.SamplingParams(max_tokens=5, temperature=0.0)
    outs = engine.generate([poisoned, clean], sp)
    assert outs[0].finish_reason == "error" and outs[0].token_ids == []
    assert "at generated token 0 " in outs[0].error
    assert outs[1].token_ids == expected_tokens(clean, 5, VOCAB)
    # 8 tokens of the poisoned prompt ran (one chunk, shared with nothing else), not its 40.
    assert engine.runner.stats["prefill_tokens"] - len(clean) <= 8
    assert engine.allocator.num_used == 0 and engine.runner.stats["cleared_pages"] > 0


@pytest.mark.parametrize("config", [dict(num_pages=6, page_size=8),
                                    dict(overlap=False, speculative=ji.SpeculativeConfig(method="ngram", num_tokens=3))],
                         ids=["decode_calls", "ngram"])
def test_nonfinite_logits_fail_only_their_request(model, config, rng):
    """On a model whose embedding of one token is NaN: the requests that meet it end with "error"
    at that token and keep the tokens before it, the others are token for token what the clean
    model serves, and no NaN is left in the KV cache (the failed requests' pages were zeroed
    before they were reused: 6 pages of 8 tokens make sure they are)."""
    config = ji.EngineConfig(max_seq_len=32, max_tokens_per_step=16, max_batch=2, **config)
    prompts = [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(2, 14, size=8)]
    # Sampled rows too, but not under speculation: which steps verify drafts depends on the batch, and a
    # verify pass draws other random numbers than a plain step (the same distribution, other tokens).
    sampled = config.speculative is None
    sp = [ji.SamplingParams(max_tokens=10, temperature=1.0 if sampled and i % 2 == 0 else 0.0, seed=i,
                            n=2 if i == 3 else 1) for i in range(8)]
    clean = ji.Engine(model, config).generate(prompts, sp)
    # A token that request 1 generates (greedy) for the first time at index i >= 2, and then reads.
    toks = clean[1].token_ids
    i = next(i for i, t in enumerate(toks) if i >= 2 and t not in prompts[1] and t not in toks[:i])
    poison = toks[i]
    prompts[6][0] = poison  # and a prompt that holds it (it fails at its first token, whatever it was)
    params = {**model.params, "embed": model.params["embed"].at[poison].set(float("nan"))}
    engine = ji.Engine(ji.Model(model.config, params, model.tokenizer), config)
    outs = engine.generate(prompts, sp)
    for p, o, r in zip(prompts, outs, clean):
        for got, want in zip(o.samples or [o], r.samples or [r]):
            stream = p + want.token_ids  # the last token is never read
            if poison not in stream[:-1]:
                assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)
            else:
                at = max(stream.index(poison) - len(p) + 1, 0)
                assert got.finish_reason == "error" and f"at generated token {at} " in got.error
                assert got.token_ids == want.token_ids[:at]
    assert outs[6].finish_reason == "error" and outs[1].finish_reason == "error"
    assert len(outs[1].token_ids) == i + 1
    assert engine.allocator.num_used == 0
    assert all(np.isfinite(np.asarray(x)).all() for x in (engine.runner.cache.k, engine.runner.cache.v))

