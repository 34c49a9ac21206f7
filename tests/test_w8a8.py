"""W8A8 (int8 naive and SmoothQuant, FP8 dynamic and static) on models: the scheme names, the
8-bit numerics, SmoothQuant's fold (exact in float), SmoothQuant against naive W8A8 on a model with
an activation outlier channel, static FP8 scales from calibration, and the engine serving W8A8."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import row_errors, row_rel_error

import jaxinfer as ji
from jaxinfer import quant, sharding
from jaxinfer.models import act_formats as af
from jaxinfer.models import decoder as model_lib
from jaxinfer.quant import w8a8
from jaxinfer.quant.spec import SimScheme, W8A8Scheme, scheme_from_name


def _random_model(seed, **overrides):
    """A small random model (no tokenizer) with norms and biases away from 1 and 0, so every fold
    moves real numbers."""
    dims = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, max_position_embeddings=64)
    cfg = ji.ModelConfig(**{**dims, **overrides})
    params = ji.init_params(cfg, jax.random.key(seed), std=0.2)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 16))
    layers = dict(params["layers"])
    for name, x in layers.items():
        if name.endswith("norm"):
            layers[name] = x * jax.random.uniform(next(keys), x.shape, minval=0.5, maxval=2.0)
        elif name.startswith("b"):
            layers[name] = 0.1 * jax.random.normal(next(keys), x.shape)
    return ji.Model(cfg, {**params, "layers": layers})


def _windows(rng, cfg, num=4, length=32):
    return rng.integers(0, cfg.vocab_size, (num, length)).astype(np.int32)


@pytest.mark.parametrize("name, scheme", [
    ("w8a8", W8A8Scheme("int8")),
    ("w8a8-int8-naive", W8A8Scheme("int8")),
    ("w8a8-smooth", W8A8Scheme("int8", smooth_alpha=0.5)),
    ("w8a8-int8-smooth-a0.8", W8A8Scheme("int8", smooth_alpha=0.8)),
    ("w8a8-smooth-a.25", W8A8Scheme("int8", smooth_alpha=0.25)),
    ("fp8", W8A8Scheme("fp8")),
    ("w8a8-fp8-static", W8A8Scheme("fp8", static_act=True)),
    ("fp8-static-pt", W8A8Scheme("fp8", static_act=True, per_tensor=True)),
    ("w8a8-head", W8A8Scheme("int8", head=True)),
    ("w8a8-int8-smooth-a0.8-head", W8A8Scheme("int8", smooth_alpha=0.8, head=True)),
    ("fp8-pt-head", W8A8Scheme("fp8", per_tensor=True, head=True)),
    ("nvfp4-sim", SimScheme("nvfp4")),
    ("nvfp4-sim-a8", SimScheme("nvfp4", "fp8")),
    ("mxfp4-sim-a4", SimScheme("mxfp4", "mxfp4")),
    ("w4a8-sim", SimScheme("int4", "fp8", 128)),
    ("w4a16-fp8scale-sim", SimScheme("int4-fp8scale", None, 32)),
])
def test_scheme_names_parse_and_round_trip(name, scheme):
    assert scheme_from_name(name) == scheme
    assert scheme_from_name(scheme.name) == scheme


@pytest.mark.parametrize("name, message", [
    ("w8a8-int4", "is not 'dense'"),
    ("w8a8-smooth-a1.5", r"smooth_alpha=1.5 needs dtype='int8' and a value in \[0, 1\]"),
    ("w8a8-smooth-a", "is not 'dense'"),
    ("fp8-smooth", "is not 'dense'"),
    ("nvfp4-sim-a2", "is not 'dense'"),
    ("nvfp4", "is not 'dense'"),
    ("int8-head", "only w8a8 schemes quantise the LM head"),
    ("w8a8-experts", "only int4 / int8 weight-only schemes quantise the experts"),
    ("fp8-static-head", "head=True takes per-token activation scales"),
])
def test_bad_scheme_names_are_refused(name, message):
    with pytest.raises(ValueError, match=f"weights={name!r}") as e:
        scheme_from_name(name)
    assert e.match(message)


def test_bad_schemes_are_refused():
    with pytest.raises(ValueError, match="dtype='int4' is not one of"):
        W8A8Scheme("int4")
    with pytest.raises(ValueError, match="smooth_alpha=0.5 needs dtype='int8'"):
        W8A8Scheme("fp8", smooth_alpha=0.5)
    with pytest.raises(ValueError, match="static_act and per_tensor apply to dtype='fp8' only"):
        W8A8Scheme("int8", static_act=True)
    with pytest.raises(ValueError, match="act='int4'"):
        SimScheme("nvfp4", "int4")
    params = _random_model(0).params
    with pytest.raises(ValueError, match="scheme w8a8-int8-smooth-a0.5 needs calibration data"):
        quant.quantize(params, W8A8Scheme("int8", smooth_alpha=0.5))
    with pytest.raises(ValueError, match="needs the calibration maxima"):
        w8a8.quantize_weight(params["layers"]["wq"], W8A8Scheme("fp8", static_act=True))


@pytest.mark.parametrize("fmt, per_tensor", [("int8", False), ("fp8", False), ("fp8", True)])
def test_weight_and_activation_rounding_bounds(fmt, per_tensor, rng):
    """int8: every value within half a step of itself; e4m3: within 2**-4 relative (3 mantissa
    bits) above the subnormals. Per-channel scales put each column's largest |w| at QMAX."""
    w = jnp.asarray(rng.standard_normal((2, 64, 24)) * rng.uniform(0.01, 10, (1, 1, 24)), jnp.float32)
    q, scale = af.quantize_columns(w, fmt, per_tensor)
    assert q.dtype == af.DTYPES[fmt] and scale.shape == ((2, 1) if per_tensor else (2, 24))
    back = np.asarray(af.dequantize_w8a8(af.W8A8Weight(q, scale)))
    err = np.abs(back - np.asarray(w))
    step = np.broadcast_to(np.asarray(scale)[:, None, :], w.shape)
    if fmt == "int8":
        assert np.all(err <= 0.5 * step * (1 + 1e-6))
    else:
        normal = np.abs(np.asarray(w)) >= 2.0**-6 * step
        assert np.all(err[normal] <= 2.0**-4 * np.abs(np.asarray(w))[normal] * (1 + 1e-6))
        assert np.all(err[~normal] <= 2.0**-10 * step[~normal])
    if not per_tensor:
        np.testing.assert_allclose(np.abs(np.asarray(q, np.float32)).max(axis=1), af.QMAX[fmt])
    x = jnp.asarray(rng.standard_normal((3, 5, 64)), jnp.float32)
    xq, xs = af.quantize_rows(x, fmt)
    assert xs.shape == (3, 5)
    np.testing.assert_allclose(np.abs(np.asarray(xq, np.float32)).max(-1), af.QMAX[fmt])


def test_one_row_int8_product_converts_no_weight_on_the_cpu(rng):
    """Batch-1 decode multiplies one row: XLA's CPU backend then turns the int8 weight into an
    int32 copy before the product, every call (112 against 12 ms per SmolLM2 token;
    benchmarks/results/cpu_int8.md). The row is taken as two; the result is the same."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU backend's integer products")
    K, N = 64, 96
    q, s = af.quantize_columns(jnp.asarray(rng.standard_normal((K, N)), jnp.float32), "int8")
    w = af.W8A8Weight(q, s)
    x = jnp.asarray(rng.standard_normal((3, K)), jnp.float32)
    for rows in (x[:1], x[:1, None], x):  # (1, K), (1, 1, K), (3, K)
        hlo = jax.jit(af.w8a8_reference).lower(rows, w).compile().as_text()
        assert not [line for line in hlo.splitlines() if "convert(" in line and f"[{K},{N}]" in line]
    expected = np.asarray(af.w8a8_reference(x, w))
    np.testing.assert_array_equal(np.asarray(af.w8a8_reference(x[1:2], w)), expected[1:2])
    xq, xs = af.quantize_rows(x, "int8")
    by_hand = (np.asarray(xq, np.int64) @ np.asarray(q, np.int64)) * np.asarray(xs)[:, None] * np.asarray(s)
    np.testing.assert_allclose(expected, by_hand, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_int8_head_is_the_heads_own_int8_product(tied, rng):
    """"-head" schemes quantise the LM head too: a tied model's embedding transposed (the table
    itself stays float for the lookup) or its own lm_head, one scale per vocabulary column. Its
    logits are the int8 product of the per-token quantised hidden state by hand; on the CPU the
    compiled head multiplies int8 into int32 and converts no head-sized weight (what takes SmolLM2's
    batch-1 step from 9.9 to 7.3 ms, cpu_int8.md); dequantize_params gives the dense head back and
    head_weight (the drafters' view) reads it; a mesh refuses the packed weights by name."""
    model = _random_model(3, tie_word_embeddings=tied, vocab_size=96)
    cfg, D, V = model.config, model.config.hidden_size, model.config.vocab_size
    qm = quant.quantize_by_name(model, "w8a8-head")
    head = qm.params["lm_head"]
    assert isinstance(head, af.W8A8Weight) and head.shape == (D, V)
    dense_head = model.params["embed"].T if tied else model.params["lm_head"]
    want_q, want_s = af.quantize_columns(dense_head, "int8")
    np.testing.assert_array_equal(np.asarray(head.qweight), np.asarray(want_q))
    np.testing.assert_array_equal(np.asarray(qm.params["embed"]), np.asarray(model.params["embed"]))
    h = jnp.asarray(rng.standard_normal((3, D)), jnp.float32)
    xq, xs = af.quantize_rows(h, "int8")
    by_hand = (np.asarray(xq, np.int64) @ np.asarray(head.qweight, np.int64)) * np.asarray(xs)[:, None] \
        * np.asarray(head.scales)
    np.testing.assert_allclose(np.asarray(model_lib.lm_head(qm.params, cfg, h)), by_hand, rtol=1e-6, atol=1e-6)
    if jax.default_backend() == "cpu":
        hlo = jax.jit(lambda p, x: model_lib.lm_head(p, cfg, x)).lower(qm.params, h[:1]).compile().as_text()
        assert f"s32[2,{V}]" in hlo  # the one row taken as two, summed in int32
        assert not [line for line in hlo.splitlines() if "convert(" in line and f"[{D},{V}]" in line]
    tokens = jnp.asarray(_windows(rng, cfg, 2, 16))
    without = ji.forward_logits(quant.quantize_by_name(model, "w8a8"), tokens)
    assert 1e-4 < row_rel_error(ji.forward_logits(qm, tokens), without) < 0.1
    back = quant.dequantize_params(qm.params)
    np.testing.assert_allclose(np.asarray(back["lm_head"]), np.asarray(af.dequantize_w8a8(head)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(model_lib.head_weight(qm.params, cfg)), np.asarray(back["lm_head"]))
    with pytest.raises(ValueError, match="lm_head is already quantised"):
        w8a8.quantize_head(qm.params, W8A8Scheme("int8", head=True))
    with pytest.raises(ValueError, match=r"layers\.\w+ is a W8A8Weight: W8A8 and simulated weights have no partition"):
        sharding.shard_model(qm, sharding.make_mesh(1))


def test_smoothing_factors_by_hand():
    act = jnp.asarray([4.0, 1.0, 0.0, 9.0])
    w = jnp.asarray([1.0, 4.0, 2.0, 0.0])
    np.testing.assert_allclose(w8a8.smoothing_factors(act, w, 0.5), [2.0, 0.5, 1.0, 1.0])  # dead channels keep 1
    np.testing.assert_allclose(w8a8.smoothing_factors(act, w, 1.0), [4.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(w8a8.smoothing_factors(act, w, 0.0), [1.0, 0.25, 1.0, 1.0])


@pytest.mark.parametrize("overrides", [dict(qkv_bias=True, o_bias=True), dict(qk_norm=True, num_kv_heads=4)],
                         ids=["gqa-bias", "qk-norm"])
def test_smoothing_fold_leaves_the_float_model_unchanged(overrides, rng):
    """SmoothQuant's folds (norms, wv and bv per kv channel under GQA, w_up) change the weights
    and not the function: logits within 1e-5 per row."""
    model = _random_model(3, **overrides)
    smoothed = quant.smooth_model(model, 0.5, _windows(rng, model.config), progress=False)
    before, after = model.params["layers"], smoothed.params["layers"]
    for name in ("attn_norm", "mlp_norm", "wv", "w_up", "wo", "w_down"):
        assert row_rel_error(after[name], before[name]) > 1e-2, name
    tokens = jnp.asarray(_windows(rng, model.config, 2, 24))
    assert row_rel_error(ji.forward_logits(smoothed, tokens), ji.forward_logits(model, tokens)) <= 1e-5


def test_smoothquant_beats_naive_w8a8_on_an_outlier_channel(rng):
    """One hidden channel 100x the others (a float-exact change): naive per-token int8 crushes the
    other channels of every token, SmoothQuant moves the range into the weights and recovers most
    of the loss. Logits error against the float model, per row."""
    tiny = ji.load_model("tiny")
    model = w8a8.inject_outlier(tiny, 5, 100.0)
    tokens = jnp.asarray([list(b"def main(argv):\n    for i in range(10):\n        print(i)\n")], jnp.int32)
    dense = ji.forward_logits(model, tokens)
    assert row_rel_error(dense, ji.forward_logits(tiny, tokens)) < 1e-4
    windows = _windows(rng, model.config, 8, 64)

    def error(name, m=model):
        qm = quant.quantize_model(m, scheme_from_name(name), windows, progress=False)
        return float(np.mean(row_errors(ji.forward_logits(qm, tokens), dense)))

    naive, smooth, baseline = error("w8a8-int8-naive"), error("w8a8-int8-smooth"), error("w8a8-int8-naive", tiny)
    assert naive > 5 * baseline  # the outlier is what hurts naive W8A8
    assert smooth < 0.3 * naive
    with pytest.raises(ValueError, match="channel=256 is outside the hidden size 256"):
        w8a8.inject_outlier(tiny, 256, 100.0)


def test_static_fp8_scales_come_from_the_calibration_maxima(rng):
    """fp8-static: the first layer's q/k/v share one activation scale, max |attn_norm(embed)| / 448
    over the calibration windows; every projection holds one scale per layer."""
    model = _random_model(1)
    windows = _windows(rng, model.config)
    qm = quant.quantize_model(model, scheme_from_name("fp8-static"), windows, progress=False)
    layers, cfg = qm.params["layers"], model.config
    h = model_lib.rms_norm(model.params["embed"][windows], model.params["layers"]["attn_norm"][0], cfg.rms_norm_eps)
    for name in quant.LINEAR_WEIGHTS:
        assert layers[name].act_scale.shape == (cfg.num_layers,) and layers[name].fmt == "fp8"
    for name in ("wq", "wk", "wv"):
        np.testing.assert_allclose(layers[name].act_scale[0], jnp.max(jnp.abs(h)) / 448, rtol=1e-6)
    assert layers["wq"].scales.shape == (cfg.num_layers, cfg.num_heads * cfg.head_dim)


def test_w8a8_models_stay_close_to_dense_and_dequantize(rng, tmp_path):
    """Every W8A8 scheme keeps the logits near the dense model's; dequantize_params turns the
    weights back into dense arrays of the model dtype holding what the 8-bit values stand for
    (NumPy's product of the values, read through ml_dtypes for e4m3, and their scales), within half
    a step of the original weight where no smoothing moved it, and the dequantised model's logits
    near the dense model's; save_model refuses W8A8 weights by name."""
    model = ji.load_model("tiny")
    tokens = jnp.asarray([list(b"import os\nprint(os.getcwd())\n")], jnp.int32)
    dense = ji.forward_logits(model, tokens)
    windows = _windows(rng, model.config, 4, 32)
    for name in ("w8a8-int8-naive", "w8a8-int8-smooth", "w8a8-fp8", "w8a8-fp8-static-pt"):
        qm = quant.quantize_by_name(model, name, calibration=windows, progress=False) \
            if quant.needs_calibration(scheme_from_name(name)) else quant.quantize_by_name(model, name)
        assert all(isinstance(qm.params["layers"][n], af.W8A8Weight) for n in quant.LINEAR_WEIGHTS)
        assert 1e-4 < row_rel_error(ji.forward_logits(qm, tokens), dense) < 0.1, name
        back = quant.dequantize_params(qm.params)
        for n in quant.LINEAR_WEIGHTS:
            w, got = qm.params["layers"][n], back["layers"][n]
            assert got.dtype == model.dtype and got.shape == model.params["layers"][n].shape, (name, n)
            scales = np.asarray(w.scales, np.float64)[..., None, :]  # (L, 1, N) or (L, 1, 1)
            want = np.asarray(w.qweight).astype(np.float64) * scales
            np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=0, err_msg=f"{name} {n}")
            if "smooth" not in name:  # the weight itself was quantised: back within half a step of it
                original = np.asarray(model.params["layers"][n], np.float64)
                # int8: half of one scale; e4m3: half a spacing of 3 mantissa bits, or of a subnormal
                # (2**-9 scales). The margin: w / scale is rounded in float32 before it is rounded to 8 bits.
                half = scales / 2 if w.fmt == "int8" else np.abs(original) / 16 + scales / 2**10
                assert np.all(np.abs(want - original) <= half + 1e-4 * scales), (name, n)
        assert row_rel_error(ji.forward_logits(dataclasses.replace(qm, params=back), tokens), dense) < 0.1, name
    with pytest.raises(ValueError, match=r"layers\.\w+ is a W8A8Weight: save_model writes dense and weight-only"):
        ji.save_model(qm, tmp_path / "w8a8")


def _byte_model(name, seed):
    """A one-layer random byte-level model quantised by the named scheme (small, so the engine compiles
    fast); SmoothQuant and static scales calibrated on random windows."""
    model = dataclasses.replace(_random_model(seed, vocab_size=258, num_layers=1), tokenizer=ji.ByteTokenizer())
    windows = _windows(np.random.default_rng(seed), model.config)
    return quant.quantize_by_name(model, name, calibration=windows, progress=False)


@pytest.mark.parametrize("name", ["w8a8-int8-naive", "w8a8-int8-smooth-head",
                                  pytest.param("w8a8-fp8", marks=pytest.mark.slow), "w8a8-fp8-static-pt"])
def test_engine_serves_w8a8_token_for_token(name):
    """The paged engine on a W8A8 model (naive int8, SmoothQuant with the LM head in int8 too, FP8
    with dynamic per-token or calibrated per-tensor scales) gives the greedy tokens of the model's
    own forward pass (the contiguous-cache loop): per-token or static activation scales make a row's
    result independent of its batch, int32 sums are exact and e4m3 products exact in float32."""
    model = _byte_model(name, 5)
    prompts = ["def fibonacci(n):", "class Engine:\n    def step(self"]
    sp = ji.SamplingParams(max_tokens=10, temperature=0.0)
    want = [o.token_ids for o in ji.generate(model, prompts, sp)]
    got = [o.token_ids for o in ji.Engine(model, ji.EngineConfig(max_batch=4, page_size=8)).generate(prompts, sp)]
    assert got == want and got[0] != got[1]


def test_engine_pallas_w8a8_equals_xla():
    """EngineConfig(matmul="pallas") runs the W8A8 kernel (interpret mode) and serves the XLA path's
    tokens (fp8 through the same dispatch: test_w8a8_matmul.test_linear_pallas_equals_xla)."""
    model = _byte_model("w8a8-int8-naive", 7)
    sp = ji.SamplingParams(max_tokens=4, temperature=0.0)
    prompts = ["import os", "x = 1"]
    want = [o.token_ids for o in ji.Engine(model, ji.EngineConfig(matmul="xla")).generate(prompts, sp)]
    got = [o.token_ids for o in ji.Engine(model, ji.EngineConfig(matmul="pallas")).generate(prompts, sp)]
    assert got == want
