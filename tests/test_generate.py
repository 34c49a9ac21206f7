"""Baseline generate (contiguous KV cache) and the sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer as ji
from jaxinfer.engine import baseline as generate_lib
from jaxinfer.sampling.sampler import SamplingBatch, sample


@pytest.fixture(scope="module")
def model():
    cfg = ji.ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    return ji.Model(cfg, ji.init_params(cfg, jax.random.key(0), std=0.3), ji.ByteTokenizer())


def test_cached_decode_equals_full_recompute(model, rng):
    """Each greedy token is the argmax of a full, cache-free forward pass over what precedes it."""
    prompts = [rng.integers(0, 64, size=n).tolist() for n in (1, 7, 16, 17)]
    outs = generate_lib.generate(model, prompts, ji.SamplingParams(max_tokens=12, temperature=0.0))
    for p, o in zip(prompts, outs):
        assert len(o.token_ids) == 12
        full = p + o.token_ids
        logits = ji.forward_logits(model, np.array([full[:-1]]))[0]  # (len - 1, V)
        np.testing.assert_array_equal(np.argmax(logits[len(p) - 1 :], axis=-1), o.token_ids)


def test_decode_compiles_once_per_bucket(model, rng):
    generate_lib.TRACE_COUNTS.clear()
    greedy = ji.SamplingParams(max_tokens=5, temperature=0.0)
    for n in (3, 5, 9, 11):  # one batch bucket (1), prompt bucket (16), cache bucket (16)
        generate_lib.generate(model, [rng.integers(0, 64, size=n).tolist()], greedy)
    assert generate_lib.TRACE_COUNTS == {"prefill": 1, "decode": 1}
    generate_lib.generate(model, [[1, 2]] * 3, greedy)  # batch bucket 4: one more of each
    assert generate_lib.TRACE_COUNTS == {"prefill": 2, "decode": 2}


def test_context_limit_ends_generation(model):
    out = generate_lib.generate(model, [[1] * 60], ji.SamplingParams(max_tokens=50, temperature=0.0))[0]
    assert len(out.token_ids) == 64 - 60 + 1 and out.finish_reason == "context"
    with pytest.raises(ValueError, match="max_tokens=65 is over the model's context of 64"):
        generate_lib.generate(model, [[1]], ji.SamplingParams(max_tokens=65))


def test_request_output_does_not_depend_on_batch(model, rng):
    prompts = [rng.integers(0, 64, size=n).tolist() for n in (4, 9, 2)]
    params = [ji.SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=20, seed=s) for s in (7, 8, 9)]
    together = generate_lib.generate(model, prompts, params)
    for i in range(3):
        alone = generate_lib.generate(model, [prompts[i]], [params[i]])[0]
        assert alone.token_ids == together[i].token_ids
    other_seed = generate_lib.generate(model, [prompts[0]], [ji.SamplingParams(max_tokens=10, seed=1234)])[0]
    assert other_seed.token_ids != together[0].token_ids


def test_stop_tokens_and_strings(model):
    greedy = ji.SamplingParams(max_tokens=12, temperature=0.0)
    ref = generate_lib.generate(model, ["ab"], greedy)[0]
    stop_tok = ref.token_ids[3]
    first = ref.token_ids.index(stop_tok)
    out = generate_lib.generate(model, ["ab"], ji.SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == ref.token_ids[: first + 1] and out.finish_reason == "stop"
    text = ji.ByteTokenizer().decode(ref.token_ids)
    stop = text[2:4]
    assert len(stop) == 2, text  # the greedy text is long enough to hold a stop string inside it
    out = generate_lib.generate(model, ["ab"], ji.SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and stop not in out.text and text.startswith(out.text)


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([[]], r"prompts\[0\] is empty"),
        ([""], r"prompts\[0\] is empty"),
        ([[1, 2, 258]], r"token id 258 outside the vocabulary \[0, 258\)"),
        ([[1], [-1]], r"prompts\[1\] has token id -1"),
        ([[1] * 65], "65 tokens, over the model's context of 64"),
        ([], "non-empty list"),
        ("abc", "non-empty list"),
    ],
)
def test_bad_prompts(model, prompts, message):
    with pytest.raises(ValueError, match=message):
        generate_lib.generate(model, prompts, ji.SamplingParams(max_tokens=2))


@pytest.mark.parametrize("tokens, message", [
    ("hello", "tokens is a string: tokenise it first"),
    ([[1.0, 2.0]], "tokens must be integer token ids int32\\[B, T\\], got dtype float64"),
    ([1, 2], "tokens must be int32\\[B, T\\], got shape \\(2,\\)"),
])
def test_forward_logits_bad_tokens(model, tokens, message):
    with pytest.raises(ValueError, match=message):
        ji.forward_logits(model, tokens)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
        (dict(stop="x"), "sequences"),
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32\)"),
        (dict(n=0), "n must be an integer >= 1"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ji.SamplingParams(**kwargs)


def _batch(rows, **kw):
    params = [ji.SamplingParams(**kw)] * rows
    return SamplingBatch.from_params(params, list(range(rows)))


def test_sampler_filters_match_their_definitions(rng):
    V, draws = 12, 4000
    logits = jnp.asarray(rng.normal(size=(1, V)) * 2, jnp.float32)
    probs = np.asarray(jax.nn.softmax(logits[0]))
    order = np.argsort(-probs)

    def frequencies(**kw):
        sp = _batch(1, **kw)
        step = jnp.arange(draws, dtype=jnp.int32)
        toks = jax.vmap(lambda s: sample(logits, sp, s[None])[0])(step)
        return np.bincount(np.asarray(toks), minlength=V) / draws

    assert set(np.flatnonzero(frequencies(temperature=1.0, top_k=3))) <= set(order[:3])
    nucleus = order[: int(np.searchsorted(np.cumsum(probs[order]), 0.6) + 1)]
    assert set(np.flatnonzero(frequencies(temperature=1.0, top_p=0.6))) <= set(nucleus)
    kept = np.flatnonzero(probs >= 0.3 * probs.max())
    assert set(np.flatnonzero(frequencies(temperature=1.0, min_p=0.3))) <= set(kept)
    freq = frequencies(temperature=1.0)
    assert np.abs(freq - probs).max() < 0.04  # 4000 draws: standard error <= 0.008
    assert frequencies(temperature=0.0)[order[0]] == 1.0


def test_sampler_rows_do_not_depend_on_batch(rng):
    """A row's token is the same alone, in an all-greedy batch (where the sort is skipped) and in a
    mixed batch (where it runs): greedy rows take the argmax, sampled rows the sorted draw."""
    V = 300
    logits = jnp.asarray(rng.normal(size=(6, V)) * 3, jnp.float32)
    params = [ji.SamplingParams(temperature=0.0), ji.SamplingParams(temperature=0.8, top_k=5),
              ji.SamplingParams(temperature=0.0), ji.SamplingParams(temperature=1.2, top_p=0.7),
              ji.SamplingParams(temperature=0.5, min_p=0.1), ji.SamplingParams(temperature=1.0)]
    seeds, step = [3, 4, 5, 6, 7, 8], jnp.arange(6, dtype=jnp.int32) + 10
    batch = np.asarray(jax.jit(sample)(logits, SamplingBatch.from_params(params, seeds), step))
    for i in range(6):
        alone = sample(logits[i : i + 1], SamplingBatch.from_params([params[i]], [seeds[i]]), step[i : i + 1])
        assert int(alone[0]) == batch[i], i
    argmax = np.argmax(np.asarray(logits), axis=-1)
    assert batch[0] == argmax[0] and batch[2] == argmax[2]
    greedy = SamplingBatch.from_params([ji.SamplingParams(temperature=0.0)] * 6, seeds)
    np.testing.assert_array_equal(jax.jit(sample)(logits, greedy, step), argmax)
