"""Prompt log-probabilities (SamplingParams.prompt_logprobs), the scoring verbs (Engine.score,
Engine.score_rolling) and the server's echo / logprobs / prompt_logprobs, against HF transformers'
log_softmax of the tiny model's logits: one prompt chunk, chunked prefill, prefix-cache hits
(bypassed where the logits are needed, shared where not), preemption; the plain programs are not
recompiled for them; lm-eval's rolling windows (values taken from lm-eval 0.4.13's own functions)."""

from __future__ import annotations


import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import torch

import jaxinfer as ji
from jaxinfer.engine import runner as runner_lib
from jaxinfer.engine.scoring import rolling_windows
from jaxinfer.models import decoder as model_lib
from jaxinfer.serving import server

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def reference(hf_tiny):
    """tokens -> HF's log_softmax of the logits at every position, (T, V) float64."""

    def log_softmax(tokens):
        with torch.no_grad():
            logits = hf_tiny(torch.tensor([list(tokens)])).logits[0].double()
        return torch.log_softmax(logits, -1).numpy()

    return log_softmax


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=n).tolist() for n in lengths]


def _check(prompt, entries, ref, n: int, start: int = 1) -> None:
    """entries (RequestOutput.prompt_logprobs) hold HF's log-probability, rank and top-n of each
    prompt token from `start` on, None before."""
    assert len(entries) == len(prompt) and all(e is None for e in entries[:start])
    for q in range(start, len(prompt)):
        row, lp = ref[q - 1], entries[q]
        assert lp.logprob == pytest.approx(row[prompt[q]], abs=1e-4), q
        assert lp.rank == 1 + int(np.sum(row > row[prompt[q]] + 1e-9)), q
        assert [t for t, _ in lp.top] == np.argsort(-row, kind="stable")[:n].tolist(), q
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(row)[::-1][:n], atol=1e-4)


@pytest.mark.parametrize("config", [
    pytest.param(ji.EngineConfig(max_batch=4, page_size=8), marks=pytest.mark.slow),
    ji.EngineConfig(max_batch=4, page_size=4, max_tokens_per_step=8),  # prompts over 3-8 chunks
    pytest.param(ji.EngineConfig(max_batch=4, page_size=4, max_tokens_per_step=8,
                                 speculative=ji.SpeculativeConfig(method="ngram", num_tokens=3)), marks=pytest.mark.slow),
], ids=["one_chunk", "chunked", "speculative"])
def test_prompt_logprobs_equal_hf_log_softmax(tiny, reference, config):
    """Every prompt token's log-probability, rank and top-3 (beside a request that does not ask,
    whose tokens are unchanged, and generated-token logprobs of the same request)."""
    prompts = _prompts(1, (30, 17, 9))
    asks = ji.SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=3, logprobs=2)
    plain = ji.SamplingParams(max_tokens=4, temperature=0.0)
    engine = ji.Engine(tiny, config)
    outs = engine.generate(prompts, [asks, plain, asks])
    assert outs[1].prompt_logprobs is None
    assert outs[1].token_ids == ji.Engine(tiny, config).generate(prompts[1:2], plain)[0].token_ids
    for prompt, out in zip(prompts[::2], outs[::2]):
        ref = reference(prompt + out.token_ids)
        _check(prompt, out.prompt_logprobs, ref, 3)
        assert out.logprobs[0].logprob == pytest.approx(ref[len(prompt) - 1][out.token_ids[0]], abs=1e-4)
    if config.max_tokens_per_step == 8:
        assert engine.stats["steps"] >= 30 / 8


def test_prefix_cache_is_bypassed_for_the_logits_needed_and_shared_below(tiny, reference):
    """A cached prompt is recomputed for a request that asks for all its log-probabilities; one that
    asks from position p takes the cached pages before p - 1, and gets the same numbers."""
    (prompt,) = _prompts(2, (40,))
    engine = ji.Engine(tiny, ji.EngineConfig(page_size=8))
    engine.generate([prompt], ji.SamplingParams(max_tokens=1, temperature=0.0))  # fills the prefix cache
    ref = reference(prompt)
    whole = engine.generate([prompt], ji.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))[0]
    assert whole.metrics["cached_tokens"] == 0
    _check(prompt, whole.prompt_logprobs, ref, 1)
    rid = engine.add_request(prompt, ji.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2),
                             prompt_logprobs_from=26)
    out = {}
    while engine.has_unfinished():
        out.update((o.request_id, o) for o in engine.step() if o.finished)
    assert out[rid].metrics["cached_tokens"] == 24  # the pages before position 25
    _check(prompt, out[rid].prompt_logprobs, ref, 2, start=26)
    with pytest.raises(ValueError, match="prompt_logprobs_from must be an integer in"):
        engine.add_request(prompt, ji.SamplingParams(prompt_logprobs=1), prompt_logprobs_from=41)
    with pytest.raises(ValueError, match="needs sampling.prompt_logprobs"):
        engine.add_request(prompt, ji.SamplingParams(), prompt_logprobs_from=5)


@pytest.mark.slow
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_logprobs_with_a_quantised_kv_cache_are_the_models_with_that_cache(tiny, reference, kv_dtype):
    """An int8 / fp8 KV cache changes the logits: the reference is the model's own full pass reading
    keys and values as that cache holds them (decoder.Impl(kv_dtype), the numerics bits_per_byte
    measures), not the float model's; the float model's differ, so the comparison can tell."""
    prompts = _prompts(11, (26, 9))
    sp = ji.SamplingParams(max_tokens=5, temperature=0.0, prompt_logprobs=3, logprobs=2)
    outs = ji.Engine(tiny, ji.EngineConfig(max_batch=4, page_size=4, max_tokens_per_step=8,
                                           kv_dtype=kv_dtype)).generate(prompts, sp)
    impl = model_lib.Impl(kv_dtype=kv_dtype)
    for prompt, out in zip(prompts, outs):
        tokens = jnp.asarray([prompt + out.token_ids], jnp.int32)
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        logits = model_lib.forward(tiny.params, tiny.config, tokens, positions, impl=impl).logits[0]
        ref = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1), np.float64)
        _check(prompt, out.prompt_logprobs, ref, 3)
        for j, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            assert lp.logprob == pytest.approx(ref[len(prompt) - 1 + j][token], abs=1e-4)
        float_ref = reference(prompt + out.token_ids)
        assert max(abs(e.logprob - float_ref[q - 1][prompt[q]]) for q, e in enumerate(out.prompt_logprobs)
                   if e is not None) > 1e-4


@pytest.mark.slow
def test_prompt_logprobs_survive_preemption(tiny, reference):
    """Sequences preempted mid-prompt and after it, recomputed (with prefix hits on their own pages),
    still get every prompt token's log-probability once, equal to HF's."""
    prompts = _prompts(3, (28, 30, 26, 29))
    engine = ji.Engine(tiny, ji.EngineConfig(num_pages=8, page_size=8, max_batch=4, max_tokens_per_step=12))
    outs = engine.generate(prompts, ji.SamplingParams(max_tokens=12, temperature=0.0, prompt_logprobs=1,
                                                      ignore_eos=True))
    assert engine.stats["preemptions"] > 0
    for prompt, out in zip(prompts, outs):
        _check(prompt, out.prompt_logprobs, reference(prompt), 1)
    assert engine.allocator.num_used == 0


def test_plain_requests_compile_nothing_new(tiny):
    """After warm-up, prompt log-probabilities compile programs of their own ("prompt_step"), and
    requests that do not ask run exactly the programs warm-up compiled, before and after them."""
    engine = ji.Engine(tiny, ji.EngineConfig(max_batch=3, page_size=8, max_tokens_per_step=24))
    engine.warmup(max_prompt_len=14, max_len=20)
    prompts = _prompts(4, (14, 9, 5))
    plain = ji.SamplingParams(max_tokens=6, temperature=0.0)
    before = dict(runner_lib.TRACE_COUNTS)
    engine.generate(prompts, plain)
    assert dict(runner_lib.TRACE_COUNTS) == before
    # prompt_logprobs=5 (8 alternatives computed) is asked nowhere else in this module: its programs are new
    outs = engine.generate(prompts, [plain, ji.SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=5), plain])
    assert all(len(lp.top) == 5 for lp in outs[1].prompt_logprobs[1:])
    grown = {k for k in runner_lib.TRACE_COUNTS if runner_lib.TRACE_COUNTS[k] != before.get(k, 0)}
    assert grown == {"prompt_step"}
    after = dict(runner_lib.TRACE_COUNTS)
    engine.generate(prompts, plain)
    assert dict(runner_lib.TRACE_COUNTS) == after


@pytest.mark.parametrize("value", [-1, 21, 1.5, True, "2"])
def test_bad_prompt_logprobs_are_refused(tiny, value):
    with pytest.raises(ValueError, match=r"prompt_logprobs must be None or an integer in \[0, 20\]"):
        ji.SamplingParams(prompt_logprobs=value)


def test_baseline_generate_refuses_prompt_logprobs(tiny):
    with pytest.raises(ValueError, match="asks for prompt_logprobs: served by ji.Engine"):
        ji.generate(tiny, [[1, 2, 3]], ji.SamplingParams(prompt_logprobs=0))


# Scoring ---------------------------------------------------------------------------------------

def _expected(reference, context, continuation) -> tuple[float, bool]:
    ref = reference(context + continuation)
    rows = ref[len(context) - 1 : len(context) + len(continuation) - 1]
    return (float(sum(r[t] for r, t in zip(rows, continuation))),
            all(int(np.argmax(r)) == t for r, t in zip(rows, continuation)))


def test_score_equals_hf_and_choices_share_their_context(tiny, reference):
    """A 4-choice question (one greedy choice) scores as HF's log_softmax says; the three choices
    after the first take the context's pages from the prefix cache (all but its last page's)."""
    (context,) = _prompts(5, (37,))
    ref = reference(context)
    greedy = [int(np.argmax(ref[-1]))]
    greedy.append(int(np.argmax(reference(context + greedy)[-1])))
    choices = [greedy, [7, 8, 9], [100], [3, 250, 17, 18]]
    engine = ji.Engine(tiny, ji.EngineConfig(page_size=8))
    scores = engine.score([context] * 4, choices)
    for s, choice in zip(scores, choices):
        logprob, is_greedy = _expected(reference, context, choice)
        assert s.logprob == pytest.approx(logprob, abs=1e-4) and s.greedy == is_greedy
    assert [s.greedy for s in scores] == [True, False, False, False]
    shared = 32  # full pages before the context's last token
    assert engine.stats["prefill_tokens"] == sum(len(context) + len(c) for c in choices) - 3 * shared
    unshared = ji.Engine(tiny, ji.EngineConfig(page_size=8, prefix_cache=False)).score([context] * 4, choices)
    assert [s.logprob for s in unshared] == pytest.approx([s.logprob for s in scores], abs=1e-4)


@pytest.mark.slow
def test_score_text_pairs_as_lm_eval_encodes_them(tiny, reference):
    """Text pairs: the context's trailing space moves to the continuation; an empty context is BOS."""
    tok = tiny.tokenizer
    scores = ji.Engine(tiny).score(["The capital of France is ", ""], ["Paris", "hello"])
    ctx = tok.encode("The capital of France is", add_special_tokens=False)
    whole = tok.encode("The capital of France is Paris", add_special_tokens=False)
    assert scores[0].logprob == pytest.approx(_expected(reference, ctx, whole[len(ctx):])[0], abs=1e-4)
    bos = [tok.bos_id]
    assert scores[1].logprob == pytest.approx(
        _expected(reference, bos, tok.encode("hello", add_special_tokens=False))[0], abs=1e-4)


@pytest.mark.parametrize("contexts,continuations,words", [
    ([[1, 2]], [[3], [4]], "equal length"),
    ([[]], [[3]], r"contexts\[0\] is empty"),
    ([[1]], [[]], r"continuations\[0\] is empty"),
    ([[1, 2]], [[999]], r"pair 0 .*token id 999"),
    ([[1] * 600], [[2]], r"pair 0 .*601 tokens"),
    (["a"], [[1]], "must both be strings or both token-id lists"),
])
def test_bad_pairs_are_refused_before_any_work(tiny, contexts, continuations, words):
    engine = ji.Engine(tiny, ji.EngineConfig(max_seq_len=512))
    with pytest.raises(ValueError, match=words):
        engine.score(contexts, continuations)
    assert not engine.has_unfinished() and engine.stats["steps"] == 0


# (tokens, max_length, context_len) -> lm-eval 0.4.13's
# list(map(make_disjoint_window, get_rolling_token_windows(tokens, prefix_token=7, max_length, context_len)))
LM_EVAL_WINDOWS = [
    (10, 4, 1, [([7], [100, 101, 102, 103]), ([103], [104, 105, 106, 107]), ([105, 106, 107], [108, 109])]),
    (3, 4, 1, [([7], [100, 101, 102])]),
    (4, 4, 1, [([7], [100, 101, 102, 103])]),
    (13, 5, 2, [([7], [100, 101, 102, 103, 104]), ([103, 104], [105, 106, 107, 108]),
                ([107, 108], [109, 110, 111, 112])]),
    (9, 4, 4, [([7], [100, 101, 102, 103]), ([100, 101, 102, 103], [104]), ([101, 102, 103, 104], [105]),
               ([102, 103, 104, 105], [106]), ([103, 104, 105, 106], [107]), ([104, 105, 106, 107], [108])]),
    (1, 3, 1, [([7], [100])]),
]


@pytest.mark.parametrize("length,max_length,context_len,expected", LM_EVAL_WINDOWS)
def test_rolling_windows_are_lm_evals(length, max_length, context_len, expected):
    assert rolling_windows(list(range(100, 100 + length)), 7, max_length, context_len) == expected


@pytest.mark.slow
def test_score_rolling_equals_hf_over_the_windows(tiny, reference):
    """A text in one window: the sum of HF's log-probabilities of every token after BOS; a longer
    one: the windows' sums (each window conditioned as lm-eval conditions it)."""
    short, long = _prompts(6, (20, 45))
    engine = ji.Engine(tiny, ji.EngineConfig(page_size=8))
    got = engine.score_rolling([short, long], max_length=24)
    bos = tiny.tokenizer.bos_id
    assert got[0] == pytest.approx(_expected(reference, [bos], short)[0], abs=1e-3)
    windows = rolling_windows(long, bos, 24)
    assert len(windows) == 2
    assert got[1] == pytest.approx(sum(_expected(reference, c, t)[0] for c, t in windows), abs=1e-3)
    with pytest.raises(ValueError, match="max_length must be an integer in"):
        engine.score_rolling([short], max_length=engine.max_seq_len)


# The server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tiny):
    app = server.build_app(ji.Engine(tiny, ji.EngineConfig()), api_key=KEY)
    with server.BackgroundServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_as_lm_eval_local_completions_reads_them(client, tiny, reference, max_tokens):
    """lm-eval's local-completions loglikelihood request (token-id prompt, echo, logprobs 1, max_tokens
    0 or 1, temperature 0): the prompt's entries first (the first null), then the generated token's;
    the sum and is_greedy it computes from them equal HF's."""
    (context,) = _prompts(7, (21,))
    continuation = [5, 6, 7]
    prompt = context + continuation
    r = client.completions.create(model="tiny", prompt=[prompt], echo=True, logprobs=1, max_tokens=max_tokens,
                                  temperature=0, seed=1234)
    choice, ref = r.choices[0], reference(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt) + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1 : len(prompt)] == pytest.approx([ref[q - 1][prompt[q]] for q in range(1, len(prompt))],
                                                                abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(lp.tokens))]
    assert choice.text.startswith(tiny.tokenizer.decode(prompt))
    if max_tokens == 0:
        assert choice.text == tiny.tokenizer.decode(prompt) and r.usage.completion_tokens == 0
        assert choice.finish_reason == "length"
    if max_tokens:  # lm-eval's parse_logprobs: the entries [ctxlen:-1] (the last one is the generated token's)
        ctxlen = len(context)
        got = sum(lp.token_logprobs[ctxlen:-1])
        greedy = all(t == max(top.values()) for t, top in zip(lp.token_logprobs[ctxlen:-1], lp.top_logprobs[ctxlen:-1]))
        logprob, is_greedy = _expected(reference, context, continuation)
        assert got == pytest.approx(logprob, abs=1e-4) and greedy == is_greedy


@pytest.mark.slow
def test_vllm_prompt_logprobs_field(client, reference):
    prompt = _prompts(8, (12,))[0]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 2})
    entries = r.choices[0].model_extra["prompt_logprobs"]
    ref = reference(prompt)
    assert entries[0] is None and len(entries) == len(prompt)
    for q in range(1, len(prompt)):
        row = ref[q - 1]
        mine = entries[q][str(prompt[q])]
        assert mine["logprob"] == pytest.approx(row[prompt[q]], abs=1e-4)
        assert mine["rank"] == 1 + int(np.sum(row > row[prompt[q]] + 1e-9))
        top = sorted(((v["rank"], int(k)) for k, v in entries[q].items() if v["rank"] <= 2))
        assert [t for _, t in top][:2] == np.argsort(-row, kind="stable")[:2].tolist()
    assert r.choices[0].logprobs is None  # logprobs were not asked


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "needs echo: true"),
    ({"prompt": "x", "max_tokens": 0, "echo": True, "min_tokens": 2}, "min_tokens", "over max_tokens=0"),
    ({"prompt": "x", "echo": True, "stream": True}, "echo", "not supported with stream"),
    ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "not supported with stream"),
    ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs", "less than or equal to 20"),
    ({"prompt": "x", "echo": 1}, "echo", "echo"),
    ({"prompt": [[1, 2], [3]], "echo": True}, "prompt", "batched prompts are not supported"),
])
def test_bad_echo_requests_are_400s_naming_the_field(served, body, param, words):
    r = httpx.post(served.url + "/v1/completions", json={"model": "tiny", **body},
                   headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
