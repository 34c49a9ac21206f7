"""bf16 and fp8 KV pages on the CPU are held as their bit pattern (uint16 / uint8): XLA's CPU
backend would otherwise convert the whole cache to float32 and back for every token written. The
store must change nothing but that: the same logits and the same cache contents, bit for bit."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer as ji
from jaxinfer.models import decoder as model_lib
from jaxinfer.models import kv_cache
from jaxinfer.models.kv_cache import BatchDescriptor, PagedKVCache, as_floats

PAGES, PAGE = 16, 8


@pytest.fixture(scope="module")
def bf16_model():
    return ji.load_model("tiny", dtype="bfloat16")


def _steps(model, kv_dtype, prompt, decode_tokens):
    """A prompt chunk of one row, then one-token decode steps: each step's logits, and the cache."""
    cfg = model.config
    cache = PagedKVCache.zeros(cfg, PAGES, PAGE, model.dtype, kv_dtype)
    tables = np.arange(4, dtype=np.int32)[None, :]  # pages 0..3, up to 32 tokens
    step = jax.jit(model_lib.forward_paged, static_argnames=("cfg",))
    batch = BatchDescriptor.chunk_rows(np.array([0], np.int32), np.array([len(prompt)], np.int32), tables,
                                       len(prompt), PAGE, PAGES * PAGE, xp=np)
    out = step(model.params, cfg, jnp.asarray(prompt, jnp.int32), cache, batch)
    logits = [out.logits]
    for i, token in enumerate(decode_tokens):
        batch = BatchDescriptor.decode_rows(np.array([len(prompt) + i], np.int32), np.array([True]), tables, PAGE,
                                            PAGES * PAGE, xp=np)
        out = step(model.params, cfg, jnp.asarray([token], jnp.int32), out.cache, batch)
        logits.append(out.logits)
    return logits, out.cache


@pytest.mark.parametrize("kv_dtype", [None, "fp8"])
def test_bit_store_changes_nothing_but_the_store(bf16_model, monkeypatch, kv_dtype):
    prompt, decode = list(b"The bits of a page"), list(b" are its values")
    logits, cache = _steps(bf16_model, kv_dtype, prompt, decode)
    assert cache.k.dtype == (jnp.uint16 if kv_dtype is None else jnp.uint8)  # on the CPU
    assert cache.dtype == (jnp.bfloat16 if kv_dtype is None else jnp.float8_e4m3fn)
    monkeypatch.setattr(kv_cache, "store_dtype", jnp.dtype)  # pages held as themselves
    plain_logits, plain = _steps(bf16_model, kv_dtype, prompt, decode)
    assert plain.k.dtype == cache.dtype
    for a, b in zip(logits, plain_logits):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    for bits, floats in ((cache.k, plain.k), (cache.v, plain.v)):
        np.testing.assert_array_equal(np.asarray(as_floats(bits)).view(np.uint8), np.asarray(floats).view(np.uint8))


def _full_cache_converts(model, kv_dtype) -> int:
    """`convert` ops over an array of the whole cache's shape in the compiled decode step."""
    cfg = model.config
    cache = PagedKVCache.zeros(cfg, PAGES, PAGE, model.dtype, kv_dtype)
    tables = np.arange(4, dtype=np.int32)[None, :]
    batch = BatchDescriptor.decode_rows(np.array([3], np.int32), np.array([True]), tables, PAGE, PAGES * PAGE, xp=np)
    hlo = jax.jit(model_lib.forward_paged, static_argnames=("cfg",)).lower(
        model.params, cfg, jnp.zeros((1,), jnp.int32), cache, batch).compile().as_text()
    shape = "[" + ",".join(map(str, cache.k.shape)) + "]"
    return sum(1 for line in hlo.splitlines() if re.search(rf"\[?{re.escape(shape)}", line)
               and re.search(r"\bconvert\(", line))


@pytest.mark.parametrize("kv_dtype", [None, "fp8"])
def test_a_decode_step_converts_no_whole_cache(bf16_model, monkeypatch, kv_dtype):
    """The guard on the fix, and on its reason: with the pages stored as floats XLA's CPU backend
    converts the whole cache around the write; stored as bits it does not."""
    if jax.default_backend() != "cpu":
        pytest.skip("the bit store is the CPU's")
    assert _full_cache_converts(bf16_model, kv_dtype) == 0
    monkeypatch.setattr(kv_cache, "store_dtype", jnp.dtype)
    assert _full_cache_converts(bf16_model, kv_dtype) > 0
