"""KV-cache quantisation (int8, fp8 with per-token, per-head scales): the round trip is within its
bound, the engine's int8 / fp8 cache gives exactly what a float cache holding quantised-then-
dequantised K/V gives (the reference), the Pallas kernels read quantised pages like the XLA path,
pages copied for forks and reused from the prefix cache carry their scales, and a byte budget buys
about twice the pages."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import INTERPRET, assert_rows_close

import jaxinfer as ji
from jaxinfer import data
from jaxinfer.models import attention, kv_cache
from jaxinfer.models.kv_cache import KV_DTYPES, fake_quantize, quantize
from pallas_kernels import flash_attention as fa


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_round_trip_error_is_bounded_per_token(rng, kv_dtype):
    x = (rng.standard_normal((64, 4, 32)) * rng.uniform(0.01, 10.0, size=(64, 4, 1))).astype(np.float32)
    values, scales = quantize(jnp.asarray(x), KV_DTYPES[kv_dtype])
    assert values.dtype == KV_DTYPES[kv_dtype] and scales.shape == (64, 4)
    back = np.asarray(kv_cache.dequantize(values, scales, jnp.float32))
    err = np.abs(back - x)
    if kv_dtype == "int8":
        assert np.all(err <= 0.5 * np.asarray(scales)[..., None] * (1 + 1e-6))  # half a step of the scale
    else:  # e4m3: 3 mantissa bits, relative error <= 2**-4 of the value (normals), tiny values absolutely
        assert np.all(err <= np.maximum(np.abs(x) * 2.0**-4, np.asarray(scales)[..., None] * 2.0**-9) * (1 + 1e-6))
    np.testing.assert_array_equal(np.max(np.abs(np.asarray(values, np.float32)), axis=-1),
                                  127.0 if kv_dtype == "int8" else 448.0)  # every head vector uses the full range


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_paged_prefill_kernel_reads_quantised_pages(rng, kv_dtype):
    """The flash prefill kernel (interpret mode here) on int8 / fp8 pages against its reference."""
    K, P, page, H, B, T, N = 2, 12, 8, 32, 3, 9, 4
    values, scales = quantize(jnp.asarray(rng.standard_normal((2, K, P, page, H)), jnp.float32), KV_DTYPES[kv_dtype])
    tables = jnp.asarray(rng.permutation(P)[: B * 4].reshape(B, 4), jnp.int32)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    starts, lens = jnp.asarray([0, 5, 20], jnp.int32), jnp.asarray([9, 9, 7], jnp.int32)
    args = (q, values[0], values[1], tables, starts, starts + lens)
    kw = dict(k_scales=scales[0], v_scales=scales[1])
    got = fa.paged_flash_attention(*args, **kw, interpret=INTERPRET)
    want = fa.paged_reference(*args, **kw)
    for b in range(B):  # compare the valid queries of each row
        assert_rows_close(got[b, : int(lens[b])].reshape(-1, H), want[b, : int(lens[b])].reshape(-1, H), 1e-5)
    with pytest.raises(ValueError, match="k_scales \\(K, P, page_size\\) are required"):
        fa.paged_flash_attention(*args, interpret=INTERPRET)


@pytest.fixture(scope="module")
def tiny():
    return ji.load_model("tiny")


PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Queue:\n    def", "The"]


# fp8 through the engine is slow-marked: the engine path is the same as int8's, and fp8's quantiser
# and attention are checked on their own above.
@pytest.mark.parametrize("kv_dtype", ["int8", pytest.param("fp8", marks=pytest.mark.slow)])
def test_engine_equals_the_fake_quantised_reference(tiny, monkeypatch, kv_dtype):
    """An int8 / fp8 cache gives the tokens a float cache gives when every K/V written into it is
    quantised and dequantised first (the same numerics, stored in float); n > 1 forks (page copies)
    and prefix-cache hits carry the scales."""
    prompts = PROMPTS + [PROMPTS[0] + " return"]  # shares a page with prompt 0
    params = [ji.SamplingParams(max_tokens=24, temperature=0.0)] * 4 + [
        ji.SamplingParams(max_tokens=24, temperature=0.8, n=3, seed=1)]
    config = ji.EngineConfig(page_size=8, max_tokens_per_step=32)
    quantised = ji.Engine(tiny, dataclasses.replace(config, kv_dtype=kv_dtype))
    outs = quantised.generate(prompts, params)
    assert quantised.runner.cache.dtype == KV_DTYPES[kv_dtype]  # held as bits on the CPU for fp8
    assert quantised.stats["copied_pages"] > 0 and quantised.allocator.hits > 0

    write = attention._paged

    def fake_quantised(cache, layer, q, k, v, *args):
        dtype = KV_DTYPES[kv_dtype]
        return write(cache, layer, q, fake_quantize(k, dtype), fake_quantize(v, dtype), *args)

    monkeypatch.setattr(attention, "_paged", fake_quantised)
    jax.clear_caches()  # no float-cache program compiled before the patch may serve the reference
    reference = ji.Engine(tiny, config).generate(prompts, params)
    jax.clear_caches()
    assert [[s.token_ids for s in o.samples or [o]] for o in outs] == [[s.token_ids for s in o.samples or [o]]
                                                                        for o in reference]


@pytest.mark.slow  # the kernels on int8 pages: test_paged_attention (fast); Pallas against XLA in the engine: test_engine
def test_pallas_path_equals_xla_path_on_an_int8_cache(tiny):
    sp = ji.SamplingParams(max_tokens=8, temperature=0.0)
    config = ji.EngineConfig(page_size=16, max_tokens_per_step=32, kv_dtype="int8")
    xla = ji.Engine(tiny, config).generate(PROMPTS[:2], sp)
    pallas = ji.Engine(tiny, dataclasses.replace(config, attention="pallas")).generate(PROMPTS[:2], sp)
    assert [o.token_ids for o in pallas] == [o.token_ids for o in xla]


def test_a_byte_budget_buys_about_twice_the_pages(tiny):
    budget = 1 << 20
    pages = {kv: ji.Engine(tiny, ji.EngineConfig(kv_budget_bytes=budget, kv_dtype=kv)).allocator.num_pages
             for kv in (None, "int8")}
    # float32 cache: 4 bytes per element; int8: 1 byte + a float32 scale per 32-element head vector.
    assert pages[None] == budget // (2 * 3 * 2 * 32 * 4 * 16)
    assert pages["int8"] == budget // (2 * 3 * 2 * (32 + 4) * 16)
    with pytest.raises(ValueError, match="kv_dtype='int4' is not one of None, 'int8', 'fp8'"):
        ji.EngineConfig(kv_dtype="int4")
    with pytest.raises(ValueError, match="kv_budget_bytes=100 .* is too small for even one request"):
        ji.Engine(tiny, ji.EngineConfig(kv_budget_bytes=100, kv_dtype="int8"))


def test_heldout_quality_of_a_quantised_cache(tiny):
    """Bits per byte with keys and values read as int8 / fp8 stay within 0.5% of the float cache's
    (the recorded figures: benchmarks/results/quant.md)."""
    windows = data.heldout_windows(tiny, 256, 8)
    base = data.bits_per_byte(tiny, windows)
    for kv in ("int8", "fp8"):
        assert abs(data.bits_per_byte(tiny, windows, kv_dtype=kv) / base - 1) < 0.005
