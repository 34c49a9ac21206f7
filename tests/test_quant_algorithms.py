"""AWQ and GPTQ from calibration activations: the layer-by-layer runner, the algorithms on one
matrix with outlier-heavy inputs, AWQ's scale folding, and held-out bits/byte on the tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOLERANCE, row_rel_error

import jaxinfer as ji
from jaxinfer import data, quant
from jaxinfer.models import decoder as model_lib
from jaxinfer.models import formats as qf
from jaxinfer.models import matmul
from jaxinfer.quant import awq, gptq
from jaxinfer.quant import calibration as calib
from jaxinfer.quant.rtn import quantize_weight


@pytest.fixture(scope="module")
def tiny():
    return ji.load_model("tiny")


_forward_jit = jax.jit(model_lib.forward, static_argnames="cfg")


def _forward(model, windows):
    tokens = jnp.asarray(windows, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return _forward_jit(model.params, model.config, tokens, positions)


def _logits(model, hidden):
    return jnp.einsum("BTD,DV->BTV", hidden, model.params["embed"].T, preferred_element_type=jnp.float32)


def _outlier_activations(rng, M, K):
    """(M, K) inputs with correlated channels (a mixing matrix and a rank-4 common part) and
    log-normal channel scales, one channel in 32 twenty times larger: what LLM activations look like."""
    z = rng.standard_normal((M, K)) @ (np.eye(K) + rng.standard_normal((K, K)) / np.sqrt(K))
    z += rng.standard_normal((M, 4)) @ rng.standard_normal((4, K))
    scale = np.exp(0.5 * rng.standard_normal(K))
    scale[rng.choice(K, K // 32, replace=False)] *= 20
    return (z * scale).astype(np.float32)


def _output_error(x, w, w_effective):
    ref = x @ w
    return float(np.linalg.norm(x @ np.asarray(w_effective) - ref) / np.linalg.norm(ref))


# --- calibration data and the runner -------------------------------------------------------------


def test_calibration_windows_come_from_heldout_text_past_the_offset(tiny, seed):
    stream = data.heldout_stream(tiny.tokenizer).ids
    a = calib.calibration_windows(tiny, 3, 16, seed)
    assert a.shape == (3, 16) and a.dtype == np.int32
    np.testing.assert_array_equal(a, calib.calibration_windows(tiny, 3, 16, seed))
    assert not np.array_equal(a, calib.calibration_windows(tiny, 3, 16, seed + 1))
    tail = np.lib.stride_tricks.sliding_window_view(stream[calib.HELDOUT_OFFSET:], 16)  # (S, 16)
    for window in a:
        assert np.any(np.all(tail == window, axis=1))
    with pytest.raises(ValueError, match="num_sequences=0"):
        calib.calibration_windows(tiny, 0, 16)
    with pytest.raises(ValueError, match=f"seq_len=16 windows past offset={stream.size}"):
        calib.calibration_windows(tiny, 2, 16, offset=stream.size)
    with pytest.raises(ValueError, match="this model has none"):
        calib.calibration_windows(dataclasses.replace(tiny, tokenizer=None), 2, 16)


def test_runner_reproduces_forward(tiny, seed):
    """With the layers left as they are, the per-layer runner is model.forward: the same final
    hidden states and logits (uneven chunks of 3 and 1 windows)."""
    windows = calib.calibration_windows(tiny, 4, 32, seed)
    seen = []

    def update(l, lp, stats):
        seen.append((l, [int(getattr(stats, f).count) for f in ("attn", "attn_out", "mlp", "mlp_act")]))
        return lp

    run = calib.run_layers(tiny, windows, update, chunk_size=3, progress=False)
    assert seen == [(l, [4 * 32] * 4) for l in range(tiny.config.num_layers)]
    want = _forward(tiny, windows)
    assert row_rel_error(run.hidden, want.hidden) < TOLERANCE["float32"]
    assert row_rel_error(_logits(tiny, run.hidden), want.logits) < TOLERANCE["float32"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, run.layers, tiny.params["layers"])
    with pytest.raises(ValueError, match="chunk_size=0"):
        calib.run_layers(tiny, windows, update, chunk_size=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        calib.run_layers(tiny, windows + 300, update)


def test_runner_records_what_each_projection_sees(tiny, seed, monkeypatch):
    """The statistics of every projection's input equal those of the inputs model.forward itself
    passes to `linear` (recorded eagerly, layer by layer, in the order wq wk wv wo w_gate w_up w_down)."""
    windows = calib.calibration_windows(tiny, 4, 32, seed)
    recorded = []
    linear = matmul.linear

    def spy(x, w, b=None, **kw):
        recorded.append(np.asarray(x, np.float64).reshape(-1, x.shape[-1]))
        return linear(x, w, b, **kw)

    monkeypatch.setattr(matmul, "linear", spy)
    with jax.disable_jit():
        _forward(tiny, windows)
    monkeypatch.setattr(matmul, "linear", linear)
    assert len(recorded) == 7 * tiny.config.num_layers

    def check(l, lp, stats):
        for i, name in enumerate(quant.LINEAR_WEIGHTS):
            x = recorded[7 * l + i]
            st = stats.for_weight(name)
            assert row_rel_error(st.gram, x.T @ x) < TOLERANCE["float32"], (l, name)
            assert row_rel_error(st.abs_mean[None], np.abs(x).mean(0)[None]) < TOLERANCE["float32"], (l, name)
        return lp

    calib.run_layers(tiny, windows, check, progress=False)


def test_runner_is_sequential(tiny, seed):
    """Layer l + 1 is measured through the params `update` returned for layer l: RTN-quantising
    each layer as it is reached ends at the quantised model's hidden states, not the float one's."""
    windows = calib.calibration_windows(tiny, 4, 32, seed)

    def update(l, lp, stats):
        return {**lp, **{n: quantize_weight(lp[n], 4, 32, pad=True) for n in quant.LINEAR_WEIGHTS}}

    run = calib.run_layers(tiny, windows, update, progress=False)
    assert isinstance(run.layers["w_down"], quant.QuantizedWeight) and run.layers["w_down"].scales.shape == (3, 22, 256)
    quantized = dataclasses.replace(tiny, params={**tiny.params, "layers": run.layers})
    assert row_rel_error(run.hidden, _forward(quantized, windows).hidden) < TOLERANCE["float32"]
    assert row_rel_error(run.hidden, _forward(tiny, windows).hidden) > 1e-3


# --- the algorithms on one matrix ----------------------------------------------------------------


@pytest.mark.parametrize("group", [32, None])
def test_gptq_and_awq_beat_rtn_on_outlier_activations(rng, group):
    K, N = 256, 96
    x = _outlier_activations(rng, 4096, K)
    w = (0.05 * rng.standard_normal((K, N))).astype(np.float32)
    stats = calib.InputStats.from_inputs(jnp.asarray(x))
    rtn_err = _output_error(x, w, qf.dequantize(quantize_weight(jnp.asarray(w), 4, group)))
    gptq_err = _output_error(x, w, qf.dequantize(gptq.gptq_quantize(jnp.asarray(w), stats.hessian(), 4, group)))
    qw, s = awq.awq_quantize(jnp.asarray(w), stats, 4, group)
    awq_err = _output_error(x, w, qf.dequantize(qw) / s[:, None])
    assert gptq_err < 0.7 * rtn_err, (gptq_err, rtn_err)
    assert awq_err < 0.8 * rtn_err, (awq_err, rtn_err)


def test_gptq_act_order_perm_and_padding(rng):
    """K = 240 rows, groups of 32 padded to 256, asymmetric: the perm is a permutation of the
    input rows, dequantize() puts the rows back in their original order, pad rows stay last and
    zero, and taking the most active inputs first lowers the output error."""
    K, N = 240, 64
    x = _outlier_activations(rng, 4096, K)
    w = (0.05 * rng.standard_normal((K, N))).astype(np.float32)
    H = calib.InputStats.from_inputs(jnp.asarray(x)).hessian()
    kw = dict(symmetric=False, pad=True)
    plain = gptq.gptq_quantize(jnp.asarray(w), H, 4, 32, **kw)
    act = gptq.gptq_quantize(jnp.asarray(w), H, 4, 32, act_order=True, **kw)
    perm = np.asarray(act.perm)
    assert plain.perm is None and act.perm.dtype == jnp.int32
    np.testing.assert_array_equal(np.sort(perm), np.arange(K))
    np.testing.assert_array_equal(perm, np.argsort(-np.diag(H), kind="stable"))
    assert act.padded_in_features == 256 and act.in_features == K
    stored = np.asarray(qf.dequantize_stored(act))
    np.testing.assert_array_equal(stored[K:], 0.0)
    dense = np.asarray(qf.dequantize(act))
    assert np.linalg.norm(dense - w) < 0.2 * np.linalg.norm(w)  # rows back in input order ...
    assert np.linalg.norm(stored[:K] - w) > 0.8 * np.linalg.norm(w)  # ... which the stored order is not
    assert row_rel_error(qf.reference_matmul(jnp.asarray(x[:8]), act), x[:8] @ dense) < TOLERANCE["float32"]
    assert _output_error(x, w, dense) < _output_error(x, w, qf.dequantize(plain))


def test_gptq_is_rtn_when_the_inputs_are_white(rng):
    """H = I: no row's error can be compensated by another, so GPTQ rounds exactly as RTN does
    (with padding, and with act_order, whose order is then the identity)."""
    K, N = 80, 24
    w = jnp.asarray(rng.standard_normal((K, N)), jnp.float32)
    rtn = qf.dequantize(quantize_weight(w, 4, 32, pad=True))
    for act_order in (False, True):
        qw = gptq.gptq_quantize(w, np.eye(K), 4, 32, pad=True, act_order=act_order)
        np.testing.assert_array_equal(qf.dequantize(qw), rtn)


def test_gptq_dead_inputs(rng):
    """Inputs that are zero on every calibration token get zero weights and break nothing."""
    K, N = 128, 32
    x = _outlier_activations(rng, 2048, K)
    dead = rng.choice(K, 5, replace=False)
    x[:, dead] = 0.0
    w = (0.05 * rng.standard_normal((K, N))).astype(np.float32)
    H = calib.InputStats.from_inputs(jnp.asarray(x)).hessian()
    rtn_err = _output_error(x, w, qf.dequantize(quantize_weight(jnp.asarray(w), 4, 32)))
    for act_order in (False, True):
        dense = np.asarray(qf.dequantize(gptq.gptq_quantize(jnp.asarray(w), H, 4, 32, act_order=act_order)))
        assert np.all(np.isfinite(dense))
        np.testing.assert_array_equal(dense[dead], 0.0)
        assert _output_error(x, w, dense) < 0.7 * rtn_err


def test_awq_fake_quantize_is_rtn(rng):
    w = jnp.asarray(rng.standard_normal((80, 24)), jnp.float32)
    for bits, group, symmetric in [(4, 32, False), (4, None, True), (8, 32, True)]:
        want = qf.dequantize(quantize_weight(w, bits, group, symmetric=symmetric, pad=True))
        got = awq.fake_quantize(w, bits, group, symmetric=symmetric, pad=True)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_awq_clip_only_shrinks_and_never_hurts_a_group(rng):
    K, N = 128, 32
    x = _outlier_activations(rng, 2048, K)
    w = (0.05 * rng.standard_normal((K, N))).astype(np.float32)
    stats = calib.InputStats.from_inputs(jnp.asarray(x))
    clipped = np.asarray(awq.search_clip(jnp.asarray(w), stats, 4, 32))
    assert np.all(np.abs(clipped) <= np.abs(w)) and np.any(clipped != w)
    xg = x.reshape(-1, K // 32, 32)  # (M, G, g)

    def group_errors(w_used):  # (G, N): squared error of each group's partial output
        d = (w - np.asarray(awq.fake_quantize(jnp.asarray(w_used), 4, 32))).reshape(K // 32, 32, N)
        return np.sum(np.einsum("MGi,Gin->MGn", xg, d) ** 2, axis=0)

    assert np.all(group_errors(clipped) <= group_errors(w) * (1 + 1e-4))


# --- AWQ's folding on whole models -----------------------------------------------------------------


def _mha_bias_model(rng):
    """A small random model with as many kv heads as query heads (so wo's scale folds into wv)
    and q/k/v/o biases, its norms and biases perturbed and a few hidden channels made outliers."""
    cfg = ji.ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=4, head_dim=16, qkv_bias=True, o_bias=True, layer_windows=(0, 0))
    params = model_lib.init_params(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))), std=0.1)
    layers = dict(params["layers"])
    for name in ("bq", "bk", "bv", "bo"):
        layers[name] = jnp.asarray(0.1 * rng.standard_normal(layers[name].shape), jnp.float32)
    for name in ("attn_norm", "mlp_norm"):
        scale = 1.0 + 0.1 * rng.standard_normal(layers[name].shape)
        scale[:, :4] *= 8.0
        layers[name] = jnp.asarray(scale, jnp.float32)
    return ji.Model(config=cfg, params={**params, "layers": layers})


@pytest.mark.parametrize("which", ["tiny", "mha_bias"])
def test_awq_folding_keeps_the_float_model(tiny, rng, which):
    """Fold the searched scales into norms / wv / w_up and leave the weights unrounded: the model's
    logits do not move. The scales are far from 1, so a wrong fold would show."""
    model = tiny if which == "tiny" else _mha_bias_model(rng)
    scheme = quant.QuantScheme(bits=4, group_size=32, pad=True, method="awq")
    windows = rng.integers(0, 256, size=(4, 32)) if which == "mha_bias" else calib.calibration_windows(tiny, 4, 32)

    def fold(l, lp, stats):
        return awq.scale_layer(model.config, lp, stats, scheme)[0]

    run = calib.run_layers(model, windows, fold, progress=False)
    folded = dataclasses.replace(model, params={**model.params, "layers": run.layers})
    before, after = model.params["layers"], folded.params["layers"]
    for name in ("attn_norm", "mlp_norm", "w_down"):
        assert np.max(np.abs(np.asarray(after[name]) / np.asarray(before[name]) - 1)) > 0.1, name
    mha = model.config.num_kv_heads == model.config.num_heads
    assert mha == (not np.array_equal(after["wo"], before["wo"]))  # wo's scale folds only without GQA
    if mha:
        assert not np.array_equal(after["bv"], before["bv"])
    assert row_rel_error(_forward(folded, windows).logits, _forward(model, windows).logits) < TOLERANCE["float32"]


# --- the tiny model end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bits_per_byte(tiny):
    """Held-out bits/byte of the tiny model, float and quantised (AWQ, GPTQ act-order on 16 x 256 tokens)."""
    windows = data.heldout_windows(tiny, 256, 16)
    calibration = calib.calibration_windows(tiny, 16, 256, seed=0)
    schemes = {
        "int8-pc": quant.QuantScheme(bits=8, group_size=None),
        "rtn": quant.QuantScheme(bits=4, group_size=32, pad=True),
        "awq": quant.QuantScheme(bits=4, group_size=32, pad=True, method="awq"),
        "gptq": quant.QuantScheme(bits=4, group_size=32, pad=True, method="gptq", act_order=True),
    }
    models = {k: quant.quantize_model(tiny, s, calibration, progress=False) for k, s in schemes.items()}
    assert models["gptq"].params["layers"]["w_down"].perm.shape == (3, 688)
    assert all(isinstance(m.params["layers"][n], quant.QuantizedWeight) for m in models.values()
               for n in quant.LINEAR_WEIGHTS)
    bpb = {k: data.bits_per_byte(m, windows) for k, m in models.items()}
    return {"float": data.bits_per_byte(tiny, windows), **bpb}


def test_int8_per_channel_is_within_half_a_percent(tiny_bits_per_byte):
    bpb = tiny_bits_per_byte
    assert abs(bpb["int8-pc"] - bpb["float"]) < 0.005 * bpb["float"], bpb


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_int4_awq_and_gptq_beat_rtn(tiny_bits_per_byte, method):
    """int4 g32: each calibrated method is below RTN and closes at least a third of RTN's gap to float."""
    bpb = tiny_bits_per_byte
    assert bpb["rtn"] > bpb["float"], bpb
    assert bpb[method] < bpb["rtn"] - (bpb["rtn"] - bpb["float"]) / 3, bpb


def test_quantize_model_checks(tiny):
    windows = calib.calibration_windows(tiny, 2, 16)
    for method in ("awq", "gptq"):
        with pytest.raises(ValueError, match="layers.w_down: group_size=32 does not divide in_features=688"):
            quant.quantize_model(tiny, quant.QuantScheme(bits=4, group_size=32, method=method), windows,
                                 progress=False)
    with pytest.raises(ValueError, match="num_sequences and seq_len"):
        quant.quantize_model(tiny, quant.QuantScheme(method="gptq"), windows, num_sequences=4)
    layers = {**tiny.params["layers"], "wk": quantize_weight(tiny.params["layers"]["wk"], 8)}
    quantized = dataclasses.replace(tiny, params={**tiny.params, "layers": layers})
    with pytest.raises(ValueError, match="layers.wk is already quantised"):
        quant.quantize_model(quantized, quant.QuantScheme(method="awq"), windows)
