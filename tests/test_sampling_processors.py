"""Logits processors (jaxinfer/sampling/processors.py) against HF transformers' processors of the
same names on the same logits (repetition penalty, min new tokens, sequence bias, bad words, prefix
constraints), presence / frequency penalties against a numpy loop of OpenAI's definition, the
top-k / top-p / min-p filter against HF's warpers, log-probabilities against log_softmax; a batch
whose rows ask for nothing runs the plain program; the engine's greedy tokens with processors
equal HF generate's, under multi-step decode and speculative decoding too; bad values refused."""

from __future__ import annotations

import collections
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import run_main

import jaxinfer as ji
from experiments import bench_sampler
from jaxinfer.sampling import processors, sampler
from jaxinfer.sampling.processors import Row, Vocab
from jaxinfer.sampling.sampler import SamplingBatch

V = 70  # not a multiple of 32: the bitmask's last word is partial
VOCAB = Vocab(V, frozenset({3, 9}))
PROCESS = jax.jit(sampler.process)


def processed(logits, rows, step=None, recent=None) -> np.ndarray:
    """logits (R, V) through the rows' processors, each row at its own step (default: its generated count)."""
    sp = SamplingBatch.from_rows(rows, vocab=VOCAB)
    if step is None:
        step = [len(r.tokens) - r.prompt_len for r in rows]
    return np.asarray(PROCESS(jnp.asarray(logits), sp, jnp.asarray(step, jnp.int32), recent))


def hf(processor, tokens, logits) -> np.ndarray:
    """An HF logits processor on one row: tokens (prompt and generated so far), logits (V,)."""
    with torch.no_grad():
        return processor(torch.tensor([tokens]), torch.tensor(logits[None])).numpy()[0]


def rows_of(rng, n, prompt_len=6, generated=5, **params):
    return [Row(ji.SamplingParams(**params), 0, rng.integers(0, V, prompt_len + generated).tolist(), prompt_len)
            for _ in range(n)]


def test_repetition_penalty_equals_hf(rng):
    logits = (rng.normal(size=(4, V)) * 3).astype(np.float32)  # positive and negative logits
    for penalty in (1.3, 0.7):
        rows = rows_of(rng, 4, repetition_penalty=penalty)
        out = processed(logits, rows)
        for i, r in enumerate(rows):
            ref = hf(transformers.RepetitionPenaltyLogitsProcessor(penalty), r.tokens, logits[i])
            np.testing.assert_allclose(out[i], ref, rtol=1e-6)
        assert not np.allclose(out, logits)


def test_min_tokens_equals_hf_min_new_tokens(rng):
    logits = rng.normal(size=(4, V)).astype(np.float32)
    for generated in (0, 3, 4, 7):  # below, at and past min_tokens = 4
        for ignore_eos in (False, True):
            rows = rows_of(rng, 1, generated=generated, min_tokens=4, stop_token_ids=(20, 21), ignore_eos=ignore_eos)
            out = processed(logits[:1], rows)[0]
            banned = [20, 21] + ([] if ignore_eos else sorted(VOCAB.eos_ids))
            proc = transformers.MinNewTokensLengthLogitsProcessor(6, 4, banned)
            np.testing.assert_array_equal(out, hf(proc, rows[0].tokens, logits[0]))
            assert np.isneginf(out[banned]).all() == (generated < 4)


def test_logit_bias_equals_hf_sequence_bias(rng):
    logits = rng.normal(size=(1, V)).astype(np.float32)
    bias = {5: 100.0, 17: -3.5, 69: 0.25}
    out = processed(logits, rows_of(rng, 1, logit_bias=bias))[0]
    proc = transformers.SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])
    np.testing.assert_allclose(out, hf(proc, [1, 2], logits[0]), rtol=1e-6)


def test_bad_and_allowed_token_ids_equal_hf(rng):
    logits = rng.normal(size=(1, V)).astype(np.float32)
    bad, allowed = [0, 31, 32, 63, 69], [2, 31, 40, 64, 69]  # word edges, the sign bit, the last partial word
    out = processed(logits, rows_of(rng, 1, bad_token_ids=bad))[0]
    np.testing.assert_array_equal(out, hf(transformers.NoBadWordsLogitsProcessor([[t] for t in bad]), [1], logits[0]))
    out = processed(logits, rows_of(rng, 1, allowed_token_ids=allowed))[0]
    proc = transformers.PrefixConstrainedLogitsProcessor(lambda batch_id, ids: allowed, num_beams=1)
    np.testing.assert_array_equal(out, hf(proc, [1], logits[0]))
    both = processed(logits, rows_of(rng, 1, allowed_token_ids=allowed, bad_token_ids=bad))[0]
    assert np.flatnonzero(np.isfinite(both)).tolist() == [2, 40, 64]


def test_bitmask_layout_is_the_grammar_engines(rng):
    """Bit t % 32 of int32 word t // 32 set = token t allowed (xgrammar's and llguidance's layout)."""
    allowed = rng.random((3, V)) < 0.5
    allowed[:, 31] = True  # the sign bit of word 0
    words = processors.pack_bitmask(allowed)
    assert words.dtype == np.int32 and words.shape == (3, 3)
    unpacked = np.array([[(int(words[r, t // 32]) >> (t % 32)) & 1 for t in range(V)] for r in range(3)])
    np.testing.assert_array_equal(unpacked, allowed)
    logits = jnp.asarray(rng.normal(size=(3, V)), jnp.float32)
    masked = np.asarray(processors.apply_bitmask(logits, jnp.asarray(words)))
    np.testing.assert_array_equal(np.isfinite(masked), allowed)


def openai_penalties(logits, output_tokens, presence, frequency):
    """OpenAI's definition, token by token: mu[j] - c[j] * frequency - (c[j] > 0) * presence, c the
    counts in the output so far (vLLM: the prompt is not counted)."""
    out = logits.copy()
    for j in range(len(out)):
        c = output_tokens.count(j)
        out[j] -= c * frequency + (c > 0) * presence
    return out


def test_presence_and_frequency_penalties_follow_openai(rng):
    logits = rng.normal(size=(3, V)).astype(np.float32)
    rows = rows_of(rng, 3, prompt_len=8, generated=12, presence_penalty=0.7, frequency_penalty=-0.4)
    out = processed(logits, rows)
    for i, r in enumerate(rows):
        np.testing.assert_allclose(out[i], openai_penalties(logits[i], r.tokens[8:], 0.7, -0.4), rtol=1e-6)
    only_prompt = sorted(set(rows[0].tokens[:8]) - set(rows[0].tokens[8:]))
    assert only_prompt and np.array_equal(out[0, only_prompt], logits[0, only_prompt])


def test_tokens_drawn_in_the_call_count_like_the_host_history(rng):
    """A multi-step call (or a verify pass) hands the processors the tokens drawn since their arrays
    were filled as `recent`: the same logits as if the host had those tokens already."""
    logits = (rng.normal(size=(2, V)) * 2).astype(np.float32)
    params = dict(repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.3, min_tokens=7)
    rows = rows_of(rng, 2, generated=4, **params)
    recent = np.array([[11, 11, 12, -1], [-1, -1, -1, -1]], np.int32)
    longer = [dataclasses.replace(rows[0], tokens=rows[0].tokens + [11, 11, 12]), rows[1]]
    np.testing.assert_allclose(processed(logits, rows, step=[7, 4], recent=jnp.asarray(recent)),
                               processed(logits, longer), rtol=1e-6)


def test_processors_compose_in_order_and_leave_other_rows_alone(rng):
    """Bans, min_tokens, bias, then the penalties (vLLM's order); a row that asks for nothing in the
    same batch keeps its logits."""
    logits = (rng.normal(size=(2, V)) * 2).astype(np.float32)
    params = ji.SamplingParams(bad_token_ids=(4,), min_tokens=4, logit_bias={5: 2.0, 6: -1.0},
                               repetition_penalty=1.5, presence_penalty=0.2, frequency_penalty=0.1)
    tokens = [5, 6, 7, 1, 5, 6, 6]
    out = processed(logits, [Row(params, 0, tokens, 4), Row(ji.SamplingParams(), 0, [1, 2], 1)])
    ref = logits[0].copy()
    ref[[4, 3, 9]] = -np.inf  # the ban; EOS while 3 generated < min_tokens
    ref[5] += 2.0
    ref[6] -= 1.0
    seen = sorted(set(tokens))
    ref[seen] = np.where(ref[seen] > 0, ref[seen] / 1.5, ref[seen] * 1.5)
    ref = openai_penalties(ref, tokens[4:], 0.2, 0.1)
    np.testing.assert_allclose(out[0], ref, rtol=1e-6)
    np.testing.assert_array_equal(out[1], logits[1])


def hf_filter(x, top_k, top_p, min_p) -> np.ndarray:
    """HF's warpers chained as generate chains them (top-k, top-p, min-p) -> the kept tokens."""
    scores = torch.tensor(x[None])
    for warper, on in ((transformers.TopKLogitsWarper(max(top_k, 1)), top_k > 0),
                       (transformers.TopPLogitsWarper(top_p), top_p < 1),
                       (transformers.MinPLogitsWarper(min_p), min_p > 0)):
        if on:
            scores = warper(None, scores)
    return np.isfinite(scores.numpy()[0])


@pytest.mark.parametrize("top_k, top_p, min_p", [(5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2), (12, 0.8, 0.05),
                                                 (3, 0.5, 0.3), (0, 1.0, 0.0), (V + 3, 1.0, 0.0), (2**40, 0.9, 0.0)])
def test_filter_equals_hf_warpers(rng, top_k, top_p, min_p):
    x = (rng.normal(size=(6, V)) * 2.5).astype(np.float32)
    sp = SamplingBatch.from_params([ji.SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)] * 6, range(6))
    keep = np.asarray(jax.jit(sampler.keep_mask)(jnp.asarray(x), sp))
    for i in range(6):
        np.testing.assert_array_equal(keep[i], hf_filter(x[i], top_k, top_p, min_p))


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_logprobs_raw_and_processed(rng):
    logits = (rng.normal(size=(3, V)) * 2).astype(np.float32)
    params = [ji.SamplingParams(temperature=0.8, top_k=10, logprobs=3),
              ji.SamplingParams(temperature=0.5, top_p=0.9, bad_token_ids=(1,), logprobs=5, logprobs_mode="processed"),
              ji.SamplingParams(temperature=0.0)]
    sp = SamplingBatch.from_rows([Row(p, i) for i, p in enumerate(params)], vocab=VOCAB)
    assert sp.logprobs.top_n == 8  # the bucket of 5
    out = jax.jit(sampler.draw)(jnp.asarray(logits), sp, jnp.zeros(3, jnp.int32))
    tokens = np.asarray(out.tokens)
    lp = jax.tree.map(np.asarray, out.logprobs)
    raw = log_softmax(logits.astype(np.float64))
    x = logits[1].astype(np.float64) / 0.5
    x[1] = -np.inf
    order = np.argsort(-x)
    x[order[np.cumsum(np.exp(log_softmax(x))[order]) - np.exp(log_softmax(x))[order] >= 0.9]] = -np.inf
    expected = [raw[0], log_softmax(x), raw[2]]
    for i in range(3):
        np.testing.assert_allclose(lp.token[i], expected[i][tokens[i]], rtol=1e-5, atol=1e-6)
        best = np.argsort(-expected[i])[:8]
        np.testing.assert_array_equal(lp.top_ids[i][np.isfinite(lp.top[i])], best[np.isfinite(expected[i][best])])
        np.testing.assert_allclose(lp.top[i], expected[i][lp.top_ids[i]], rtol=1e-5, atol=1e-6)
    host = sampler.host_logprobs(lp, range(3), params)
    assert len(host[0].top) == 3 and len(host[1].top) == 5 and host[2] is None
    assert host[0].top[0][0] == int(np.argmax(raw[0]))


def test_rows_that_ask_for_nothing_run_the_plain_program(rng):
    traces = collections.Counter()

    @jax.jit
    def step(logits, sp, steps):
        traces[jax.tree.structure(sp)] += 1
        return sampler.draw(logits, sp, steps)

    logits = jnp.asarray(rng.normal(size=(4, V)), jnp.float32)
    steps = jnp.zeros(4, jnp.int32)
    plain = [ji.SamplingParams(temperature=t) for t in (0.0, 1.0, 0.7, 0.0)]
    sp = SamplingBatch.from_params(plain, range(4), VOCAB)
    assert sp.processors is None and sp.logprobs is None
    assert len(jax.tree.leaves(sp)) == 5  # temperature, top_k, top_p, min_p, seed: nothing else travels
    step(logits, sp, steps)
    step(logits, SamplingBatch.from_params(plain[::-1], range(4), VOCAB), steps)
    asking = plain[:3] + [ji.SamplingParams(repetition_penalty=1.2)]
    step(logits, SamplingBatch.from_rows([Row(p) for p in asking], vocab=VOCAB), steps)
    assert sorted(traces.values()) == [1, 1]  # one program for the plain batches, one with penalties


def test_processor_checks(rng):
    with pytest.raises(ValueError, match="bad_token_ids holds token id 70, outside the vocabulary of 70"):
        processors.check(ji.SamplingParams(bad_token_ids=(70,)), VOCAB)
    with pytest.raises(ValueError, match="logit_bias holds token id 99"):
        processors.check(ji.SamplingParams(logit_bias={99: 1.0}), VOCAB)
    with pytest.raises(ValueError, match="ban every one of allowed_token_ids"):
        processors.check(ji.SamplingParams(allowed_token_ids=(1, 2), bad_token_ids=(1, 2, 3)), VOCAB)
    with pytest.raises(ValueError, match=r"extra_args\['nope'\] names no registered logits processor"):
        processors.check(ji.SamplingParams(extra_args={"nope": 1}), VOCAB)
    single = processors.register(processors.Processor(
        "single", lambda sp: "single" in (sp.extra_args or {}), lambda rows, vocab: {},
        lambda logits, a, ctx: logits, multi_step=False))
    try:
        processors.check(ji.SamplingParams(extra_args={"single": 1}), VOCAB)
        with pytest.raises(ValueError, match="'single' runs single-step and cannot be verified speculatively"):
            processors.check(ji.SamplingParams(extra_args={"single": 1}), VOCAB, speculative=True)
        assert not processors.may_multi_step(ji.SamplingParams(extra_args={"single": 1}))
        with pytest.raises(ValueError, match="already registered"):
            processors.register(single)
    finally:
        processors.unregister("single")
    assert processors.may_multi_step(ji.SamplingParams(repetition_penalty=1.1))
    assert not processors.may_overlap(ji.SamplingParams(repetition_penalty=1.1))
    assert processors.may_overlap(ji.SamplingParams(min_tokens=2, logit_bias={1: 1.0}, bad_token_ids=(3,)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(logit_bias={1: 101.0}), r"logit_bias\[1\] must be a number in \[-100, 100\]"),
    (dict(logit_bias={-1: 1.0}), "logit_bias keys must be integer token ids >= 0"),
    (dict(logit_bias=[1, 2]), "logit_bias must be a mapping"),
    (dict(presence_penalty=2.5), r"presence_penalty must be a number in \[-2, 2\]"),
    (dict(frequency_penalty=float("nan")), r"frequency_penalty must be a number in \[-2, 2\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=1e300), r"within float32's range \[1e-37, 3.403e\+38\], got 1e\+300"),
    (dict(repetition_penalty=1e-300), "within float32's range"),
    (dict(min_tokens=17), r"min_tokens must be an integer in \[0, max_tokens=16\]"),
    (dict(min_tokens=-1), r"min_tokens must be an integer in \[0, max_tokens=16\]"),
    (dict(bad_token_ids=5), "bad_token_ids must be a sequence of token ids"),
    (dict(bad_token_ids=[1, -2]), "bad_token_ids must hold integer token ids >= 0"),
    (dict(allowed_token_ids=[]), "allowed_token_ids must hold at least one token id"),
    (dict(logprobs=21), r"logprobs must be None or an integer in \[0, 20\]"),
    (dict(logprobs=True), r"logprobs must be None or an integer in \[0, 20\]"),
    (dict(logprobs_mode="logits"), "logprobs_mode must be one of"),
    (dict(extra_args={1: 2}), "extra_args must be a mapping with string keys"),
])
def test_bad_processing_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ji.SamplingParams(**kwargs)


def test_bench_sampler_times_every_variant(tmp_path, capsys):
    run_main(bench_sampler, "--rows=2", "--vocab=40", "--runs=1", "--calls=1", f"--out={tmp_path}/s.json")
    results = json.loads((tmp_path / "s.json").read_text())["results"]
    assert [r["variant"] for r in results] == list(bench_sampler.VARIANTS)
    assert "penalties" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--variants: \\['nope'\\] are not among"):
        run_main(bench_sampler, "--variants=nope")


# --- through the engine ------------------------------------------------------------------------

PROMPTS = ["def fibonacci(n):", "The quick brown fox"]
ENGINE_PARAMS = dict(repetition_penalty=1.3, min_tokens=6, bad_token_ids=(32,), logit_bias={101: 2.5})


@pytest.fixture(scope="module")
def hf_tokens(tiny, hf_tiny):
    """HF generate's greedy tokens with the same processors (stopping at EOS, as the engine does)."""
    out = []
    for p in PROMPTS:
        ids = torch.tensor([tiny.tokenizer.encode(p)])
        with torch.no_grad():
            gen = hf_tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                   repetition_penalty=1.3, min_new_tokens=6, bad_words_ids=[[32]],
                                   sequence_bias=[[[101], 2.5]], eos_token_id=list(tiny.tokenizer.eos_ids),
                                   pad_token_id=0)
        new = gen[0, ids.shape[1]:].tolist()
        eos = [i for i, t in enumerate(new) if t in tiny.tokenizer.eos_ids]
        out.append(new[: eos[0] + 1] if eos else new)
    return out


@pytest.mark.parametrize("config", [
    ji.EngineConfig(max_batch=2, page_size=8),
    pytest.param(ji.EngineConfig(max_batch=4, page_size=8, decode_steps=4, overlap=True), marks=pytest.mark.slow),
    pytest.param(ji.EngineConfig(max_batch=4, page_size=8, speculative=ji.SpeculativeConfig(method="ngram")),
                 marks=pytest.mark.slow),
], ids=["continuous", "multi_step_overlap", "speculative"])
def test_engine_greedy_with_processors_equals_hf_generate(tiny, hf_tokens, config):
    """Multi-step calls count the tokens they draw; the penalties' rows are not overlapped (their
    counts need every token on the host); verify passes count the drafts before each position."""
    sp = ji.SamplingParams(max_tokens=12, temperature=0.0, **ENGINE_PARAMS)
    plain = ji.SamplingParams(max_tokens=12, temperature=0.0)
    engine = ji.Engine(tiny, config)
    outs = engine.generate(PROMPTS + PROMPTS[:1], [sp] * 2 + [plain])
    assert [o.token_ids for o in outs[:2]] == hf_tokens
    assert outs[2].token_ids == ji.Engine(tiny, config).generate(PROMPTS[:1], plain)[0].token_ids
    assert all(32 not in o.token_ids for o in outs[:2]) and 32 in outs[2].token_ids  # the ban took effect
    with pytest.raises(ValueError, match=r"sampling\[0\] asks for penalties, logprobs: served by ji.Engine"):
        ji.generate(tiny, PROMPTS[:1], ji.SamplingParams(repetition_penalty=1.1, logprobs=1))
    if config.speculative is not None:
        assert engine.metrics()["spec_accepted"] > 0


def test_engine_presence_and_frequency_equal_a_reference_loop(tiny, hf_tiny):
    """Greedy decoding with OpenAI's penalties against HF's logits and the numpy penalties, token by
    token: under multi-step decode (counts updated inside the call) and overlap (refused for these
    rows: the counts of a look-ahead call would miss the tokens still in flight)."""
    sp = ji.SamplingParams(max_tokens=14, temperature=0.0, presence_penalty=0.8, frequency_penalty=0.6)
    engine = ji.Engine(tiny, ji.EngineConfig(max_batch=4, page_size=8, decode_steps=4, overlap=True))
    outs = engine.generate(PROMPTS, sp)
    for p, out in zip(PROMPTS, outs):
        tokens = tiny.tokenizer.encode(p)
        prompt_len = len(tokens)
        for _ in range(len(out.token_ids)):
            with torch.no_grad():
                logits = hf_tiny(torch.tensor([tokens])).logits[0, -1].numpy()
            tokens.append(int(np.argmax(openai_penalties(logits, tokens[prompt_len:], 0.8, 0.6))))
        assert out.token_ids == tokens[prompt_len:]
    assert engine.stats["lookahead_calls"] == 0


@pytest.mark.parametrize("config", [
    ji.EngineConfig(max_batch=4, page_size=8),
    pytest.param(ji.EngineConfig(max_batch=4, page_size=8, decode_steps=4, overlap=True), marks=pytest.mark.slow),
    pytest.param(ji.EngineConfig(max_batch=4, page_size=8, speculative=ji.SpeculativeConfig(method="ngram")),
                 marks=pytest.mark.slow),
], ids=["continuous", "multi_step_overlap", "speculative"])
def test_engine_logprobs_equal_hf_log_softmax(tiny, hf_tiny, config):
    """Each generated token's raw log-probability and top-5 equal HF's log_softmax of its logits, for
    n > 1 samples forked from one prompt too, from multi-step calls and from verify passes."""
    engine = ji.Engine(tiny, config)
    prompt = tiny.tokenizer.encode(PROMPTS[0])
    outs = engine.generate([prompt, prompt], [ji.SamplingParams(max_tokens=8, temperature=1.0, logprobs=5, seed=1, n=2),
                                              ji.SamplingParams(max_tokens=8, temperature=0.0)])
    assert outs[1].logprobs is None
    for sample in outs[0].samples:
        assert len(sample.logprobs) == len(sample.token_ids) == 8
        with torch.no_grad():
            ref = torch.log_softmax(hf_tiny(torch.tensor([prompt + sample.token_ids])).logits[0], -1).numpy()
        for j, (token, lp) in enumerate(zip(sample.token_ids, sample.logprobs)):
            row = ref[len(prompt) - 1 + j]
            assert lp.logprob == pytest.approx(row[token], abs=1e-4)
            assert [t for t, _ in lp.top] == np.argsort(-row)[:5].tolist()
            np.testing.assert_allclose([v for _, v in lp.top], np.sort(row)[::-1][:5], atol=1e-4)
    if config.speculative is not None:
        assert engine.metrics()["spec_accepted"] > 0
