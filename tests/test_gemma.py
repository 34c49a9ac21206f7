"""Gemma 2 and Gemma 3 (text): configs as HF transformers reads them, the engine's paths against HF's
greedy tokens (the Pallas kernels with soft-capped scores and per-layer windows, the unrolled layer
loop), and AWQ / SmoothQuant folds under the (1 + w) norm. Logits and greedy parity with HF for
both families are in test_hf_parity.py (ARCHS "gemma2", "gemma3")."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import TOLERANCE, check_engine_paths_against_hf_greedy, hf_model, row_rel_error, save_hf

import jaxinfer as ji
from jaxinfer import quant
from jaxinfer.models import decoder as model_lib
from jaxinfer.models.config import ConfigError, ModelConfig
from jaxinfer.quant import awq
from jaxinfer.quant import calibration as calib

# config.json of google/gemma-2-2b and google/gemma-3-1b-pt as published (the fields that matter here).
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attention_bias": False,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "bos_token_id": 2, "eos_token_id": 1,
    "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "num_attention_heads": 8, "num_hidden_layers": 26,
    "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 256000,
}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
    "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "vocab_size": 262144,
}


def _hf_config(hf: dict):
    import transformers

    return transformers.AutoConfig.for_model(**hf)


def _hf_num_params(hf_config) -> int:
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("published", [GEMMA2_2B, GEMMA3_1B], ids=["gemma-2-2b", "gemma-3-1b"])
def test_published_configs_read_as_hf_reads_them(published):
    cfg, hf = ModelConfig.from_hf_dict(published), _hf_config(published)
    assert cfg.layer_windows == tuple(hf.sliding_window if t == "sliding_attention" else 0 for t in hf.layer_types)
    assert 0 in cfg.layer_windows and cfg.sliding_window == published["sliding_window"]
    assert cfg.attention_scale == pytest.approx(hf.query_pre_attn_scalar**-0.5)
    assert cfg.embedding_scale == pytest.approx(hf.hidden_size**0.5)
    assert cfg.logit_softcap == hf.final_logit_softcapping
    assert cfg.tie_word_embeddings and hf.tie_word_embeddings
    if published is GEMMA2_2B:
        assert cfg.attn_softcap == 50.0 and cfg.local_rope is None and not cfg.qk_norm
        assert cfg.rope.theta == hf.rope_parameters["rope_theta"]
    else:  # Gemma 3: the global and local layers' RoPE bases, q/k norms; HF applies no score soft-cap
        assert cfg.attn_softcap is None and cfg.qk_norm
        assert cfg.rope.theta == hf.rope_parameters["full_attention"]["rope_theta"] == 1e6
        assert cfg.local_rope.theta == hf.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert cfg.num_params() == _hf_num_params(hf)


@pytest.mark.parametrize("published", [GEMMA2_2B, GEMMA3_1B], ids=["gemma-2-2b", "gemma-3-1b"])
def test_to_hf_dict_round_trips_and_hf_reads_it(published):
    cfg = ModelConfig.from_hf_dict(published)
    written = cfg.to_hf_dict()
    assert ModelConfig.from_hf_dict(written) == cfg
    assert ModelConfig.from_hf_dict(_hf_config(written).to_dict()) == cfg  # HF's own reading, written back


@pytest.mark.parametrize("change, message", [
    ({"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"final_logit_softcapping": 0.0}, "final_logit_softcapping=0.0"),
    ({"query_pre_attn_scalar": -1}, "query_pre_attn_scalar"),
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types has 3 entries"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 8.0}}, "rope_type='longrope'"),
])
def test_unsupported_options_raise_naming_them(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict({**GEMMA3_1B, **change})


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def pair(request, tmp_path_factory):
    """(HF torch model, our model from its checkpoint): random small Gemma 2 / 3 of helpers.ARCHS."""
    hf = hf_model(request.param, seed=7)
    return hf, ji.load_model(save_hf(hf, tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("engine_config", [
    # both kernels in interpret mode: soft-cap, a window per layer (lax.switch); slow: 12 s a model (the
    # fast tier keeps test_pallas_prefill_and_decode_equal_xla_with_soft_caps and the kernels' own tests)
    pytest.param(dict(attention="pallas"), marks=pytest.mark.slow),
    pytest.param(dict(layer_loop="unroll"), marks=pytest.mark.slow),  # static windows, RoPE chosen at trace time
    pytest.param(dict(kv_dtype="int8"), marks=pytest.mark.slow),
    pytest.param(dict(kv_dtype="fp8"), marks=pytest.mark.slow),
], ids=["pallas", "unroll", "int8-kv", "fp8-kv"])
def test_engine_paths_match_hf_greedy(pair, engine_config, rng):
    """helpers.check_engine_paths_against_hf_greedy: windows of 5 crossed, chunked prefill, a
    prefix hit, HF's 16 greedy tokens (int8 / fp8 KV: agreement)."""
    hf, model = pair
    check_engine_paths_against_hf_greedy(hf, model, engine_config, rng)


def test_pallas_prefill_and_decode_equal_xla_with_soft_caps(pair, rng):
    """Logits of one paged step (a prefill chunk and decode rows) through both attention
    implementations: the kernels' soft-cap and window choice against the XLA reference."""
    _, model = pair
    tokens = rng.integers(0, 256, size=(2, 12))
    xla = ji.forward_logits(model, tokens)
    pallas = ji.forward_logits(model, tokens, attn_impl="pallas")
    assert row_rel_error(pallas, xla) <= TOLERANCE["float32"]


def _perturbed_norms(model, seed):
    """model with every norm's weight random around a gain of 1.5 +- 0.5, so a fold moves real numbers."""
    rng = np.random.default_rng(seed)
    layers = {k: (jnp.asarray(rng.uniform(0.0, 1.0, v.shape), v.dtype) if k.endswith("norm") else v)
              for k, v in model.params["layers"].items()}
    return dataclasses.replace(model, params={**model.params, "layers": layers})


def test_smoothquant_fold_under_the_one_plus_w_norm(pair, rng):
    """SmoothQuant divides the norms' gains (1 + w, not w) by its factors: the weights change, the
    logits do not (1e-5 per row)."""
    _, model = pair
    model = _perturbed_norms(model, 1)
    windows = rng.integers(0, 256, (4, 24)).astype(np.int32)
    smoothed = quant.smooth_model(model, 0.5, windows, progress=False)
    before, after = model.params["layers"], smoothed.params["layers"]
    for name in ("attn_norm", "mlp_norm", "w_up"):
        assert row_rel_error(after[name], before[name]) > 1e-2, name
    for name in ("post_attn_norm", "post_mlp_norm"):  # after the projections: untouched
        np.testing.assert_array_equal(after[name], before[name])
    tokens = rng.integers(0, 256, (2, 16))
    assert row_rel_error(ji.forward_logits(smoothed, tokens), ji.forward_logits(model, tokens)) <= 1e-5


def test_awq_fold_under_the_one_plus_w_norm(pair, rng):
    """AWQ's searched scales folded into the norms' gains, wv and w_up, the weights left unrounded:
    the logits do not move."""
    _, model = pair
    model = _perturbed_norms(model, 2)
    scheme = quant.QuantScheme(bits=4, group_size=32, pad=True, method="awq")
    windows = rng.integers(0, 256, (4, 24)).astype(np.int32)
    run = calib.run_layers(model, windows, lambda i, lp, stats: awq.scale_layer(model.config, lp, stats, scheme)[0],
                           progress=False)
    folded = dataclasses.replace(model, params={**model.params, "layers": run.layers})
    assert row_rel_error(folded.params["layers"]["mlp_norm"], model.params["layers"]["mlp_norm"]) > 1e-2
    tokens = rng.integers(0, 256, (2, 16))
    assert row_rel_error(ji.forward_logits(folded, tokens), ji.forward_logits(model, tokens)) <= TOLERANCE["float32"]


def test_calibration_layer_equals_the_decoder(pair, rng):
    """The calibration runner's layer-by-layer pass (its own RoPE and window per layer) ends at the
    decoder's final hidden states."""
    _, model = pair
    windows = rng.integers(0, 256, (2, 16)).astype(np.int32)
    run = calib.run_layers(model, windows, lambda i, lp, stats: lp, progress=False)
    tokens = jnp.asarray(windows)
    positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), tokens.shape)
    out = jax.jit(model_lib.forward, static_argnames="cfg")(model.params, model.config, tokens, positions)
    assert row_rel_error(run.hidden, out.hidden) <= TOLERANCE["float32"]
