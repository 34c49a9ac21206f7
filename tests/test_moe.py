"""Mixture-of-experts layers (Mixtral, Qwen3-MoE): the grouped matmul path against a dense loop over
experts, configs as HF transformers reads them, the paged engine's features on a MoE model. Logits
and greedy parity with HF are in test_hf_parity.py (ARCHS "mixtral", "qwen3_moe")."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOLERANCE, hf_model, row_rel_error, save_hf
from test_gemma import _hf_config, _hf_num_params

import jaxinfer as ji
from jaxinfer import memory, quant
from jaxinfer.models import family as family_lib
from jaxinfer.models import decoder as model_lib
from jaxinfer.models import moe
from jaxinfer.models.config import ConfigError, ModelConfig
from jaxinfer.quant import dequantize_params


def _random_moe(num_experts, k, norm_topk_prob=True, seed=0, dtype=jnp.float32):
    cfg = ModelConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=24, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, num_experts=num_experts,
                      experts_per_token=k, norm_topk_prob=norm_topk_prob)
    params = ji.init_params(cfg, jax.random.key(seed), dtype=dtype, std=0.3)
    return cfg, {k: v[0] for k, v in params["layers"].items()}


@pytest.mark.parametrize("num_experts, k, tokens, norm", [
    (4, 2, 24, True), (8, 1, 3, False),  # 3 tokens, 1 expert each: most of the 8 experts get no token
    (16, 4, 40, True), (2, 2, 5, False),  # every token to every expert
])
def test_grouped_matmul_equals_the_dense_loop_over_experts(num_experts, k, tokens, norm):
    cfg, lp = _random_moe(num_experts, k, norm, seed=num_experts)
    family = family_lib.of(cfg)
    h = jax.random.normal(jax.random.key(1), (2, tokens, cfg.hidden_size))
    grouped = moe.moe(family, cfg, lp, h, model_lib.dense_projection())
    reference = moe.reference_moe(family, cfg, lp, h)
    assert row_rel_error(grouped, reference) <= TOLERANCE["float32"]
    _, experts = moe.route(cfg, lp["router"], h.reshape(-1, cfg.hidden_size))
    used = np.unique(np.asarray(experts)).size
    assert (used < num_experts) == (tokens == 3)  # the empty-expert case has empty groups


def test_routing_weights_by_hand():
    """top-k of the softmax, renormalised over the k only when asked."""
    cfg, lp = _random_moe(4, 2, norm_topk_prob=False)
    h = jax.random.normal(jax.random.key(2), (5, cfg.hidden_size))
    probs = np.asarray(jax.nn.softmax(np.asarray(h) @ np.asarray(lp["router"]), axis=-1))
    weights, experts = moe.route(cfg, lp["router"], h)
    top = np.argsort(-probs, axis=-1)[:, :2]
    np.testing.assert_array_equal(np.sort(np.asarray(experts), -1), np.sort(top, -1))
    np.testing.assert_allclose(np.asarray(weights), np.take_along_axis(probs, np.asarray(experts), -1), rtol=1e-6)
    cfg = dataclasses.replace(cfg, norm_topk_prob=True)
    np.testing.assert_allclose(np.asarray(moe.route(cfg, lp["router"], h)[0]).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name, published_b", [("mixtral_8x7b", 46.70), ("qwen3_30b_a3b", 30.53)])
def test_published_configs_read_as_hf_reads_them(name, published_b):
    path = memory.CONFIGS_DIR / "models" / f"{name}.json"
    hf_dict = json.loads(path.read_text())
    cfg, hf = memory.load_model_config(name), _hf_config(hf_dict)
    assert cfg.num_experts == hf.num_local_experts and cfg.experts_per_token == hf.num_experts_per_tok
    assert cfg.norm_topk_prob == getattr(hf, "norm_topk_prob", True)
    assert cfg.num_params() == _hf_num_params(hf)
    assert cfg.num_params() / 1e9 == pytest.approx(published_b, abs=0.01)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("change, message", [
    ({"decoder_sparse_step": 2}, "a mix of dense and MoE layers"),
    ({"mlp_only_layers": [0, 3]}, "a mix of dense and MoE layers"),
    ({"num_experts_per_tok": 200}, r"num_experts_per_tok=200 must be in \[1, num_experts=128\]"),
    ({"num_experts": None}, "num_experts"),
])
def test_unsupported_options_raise_naming_them(change, message):
    hf = json.loads((memory.CONFIGS_DIR / "models" / "qwen3_30b_a3b.json").read_text())
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict({**hf, **change})
    with pytest.raises(ConfigError, match="shared_expert_intermediate_size"):  # Qwen2-MoE without its shared expert
        ModelConfig.from_hf_dict({**hf, "model_type": "qwen2_moe"})


# config.json of Qwen/Qwen1.5-MoE-A2.7B as published.
QWEN15_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21, "moe_intermediate_size": 1408,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "shared_expert_intermediate_size": 5632, "sliding_window": 32768, "tie_word_embeddings": False,
    "use_sliding_window": False, "vocab_size": 151936,
}


def test_qwen2_moe_config_reads_as_hf_reads_it():
    """Qwen1.5-MoE-A2.7B: 14.3B parameters, 2.7B of them a token uses (the shared expert among them)."""
    cfg, hf = ModelConfig.from_hf_dict(QWEN15_MOE), _hf_config(QWEN15_MOE)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.shared_expert_size) == (60, 4, 5632)
    assert not cfg.norm_topk_prob and cfg.qkv_bias and not cfg.o_bias
    assert cfg.num_params() == _hf_num_params(hf)
    assert cfg.num_params() / 1e9 == pytest.approx(14.32, abs=0.01)
    assert memory.active_params(cfg) / 1e9 == pytest.approx(2.69, abs=0.01)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("how", ["smoothquant", "awq"])
def test_folds_beside_a_shared_expert_keep_the_float_model(how, rng, tmp_path):
    """Qwen2-MoE's shared expert reads the input the router and experts read: that site is not
    folded (nothing there can take 1/s); the attention sites and the shared expert's inner site
    (folded into shared_up) are. The float model's logits do not move."""
    from jaxinfer.quant import awq
    from jaxinfer.quant import calibration as calib

    model = ji.load_model(save_hf(hf_model("qwen2_moe", seed=9), tmp_path))
    windows = rng.integers(0, 256, (4, 24)).astype(np.int32)
    if how == "smoothquant":
        folded = quant.smooth_model(model, 0.5, windows, progress=False)
    else:
        scheme = quant.QuantScheme(bits=4, group_size=32, pad=True, method="awq")
        run = calib.run_layers(model, windows, lambda i, lp, stats: awq.scale_layer(model.config, lp, stats,
                                                                                    scheme)[0], progress=False)
        folded = dataclasses.replace(model, params={**model.params, "layers": run.layers})
    before, after = model.params["layers"], folded.params["layers"]
    for name in ("shared_gate", "router", "experts_gate", "mlp_norm"):  # the unfolded site and its readers
        np.testing.assert_array_equal(after[name], before[name])
    for name in ("attn_norm", "shared_up", "shared_down"):
        assert row_rel_error(after[name], before[name]) > 1e-3, name
    tokens = rng.integers(0, 256, (2, 16))
    assert row_rel_error(ji.forward_logits(folded, tokens), ji.forward_logits(model, tokens)) <= 1e-5


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    hf = hf_model("mixtral", seed=5)
    return hf, ji.load_model(save_hf(hf, tmp_path_factory.mktemp("mixtral")))


@pytest.mark.slow  # 13 s: the fast tier keeps HF's greedy tokens through the engine (test_hf_parity)
def test_engine_features_on_a_moe_model(mixtral, rng):
    """Chunked prefill over pages, a prefix hit, preemption (a cache too small for both), and
    prompt-lookup speculation: the tokens of plain decoding at batch 1."""
    _, model = mixtral
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (13, 9)]
    prompts.append(prompts[0][:8] + [1, 2, 3])
    sp = ji.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [ji.Engine(model, ji.EngineConfig(max_batch=1)).generate([p], sp)[0].token_ids for p in prompts]
    tight = ji.Engine(model, ji.EngineConfig(max_batch=3, page_size=4, max_tokens_per_step=8, num_pages=10))
    assert [o.token_ids for o in tight.generate(prompts, sp)] == alone
    assert tight.allocator.hits > 0 and tight.stats["preemptions"] > 0
    spec = ji.Engine(model, ji.EngineConfig(max_batch=3, speculative=ji.SpeculativeConfig(method="ngram",
                                                                                         num_tokens=3)))
    assert [o.token_ids for o in spec.generate(prompts, sp)] == alone


def test_quantising_a_moe_model_leaves_the_experts_in_float(mixtral, rng):
    """RTN int8 quantises the attention projections; the router and experts stay as they are."""
    _, model = mixtral
    q = quant.quantize_model(model, quant.QuantScheme(bits=8, group_size=32), progress=False)
    layers = q.params["layers"]
    assert type(layers["wq"]).__name__ == "QuantizedWeight"
    for name in ("router", "experts_gate", "experts_up", "experts_down"):
        assert layers[name] is model.params["layers"][name]
    tokens = rng.integers(0, 256, (2, 12))
    dequantised = dataclasses.replace(model, params=dequantize_params(q.params))  # the same numbers, in float
    assert row_rel_error(ji.forward_logits(q, tokens), ji.forward_logits(dequantised, tokens)) <= 1e-5
    assert row_rel_error(ji.forward_logits(q, tokens), ji.forward_logits(model, tokens)) > 1e-4


def test_bench_moe_times_every_path(tmp_path, capsys):
    from experiments import bench_moe
    from helpers import run_main

    out = tmp_path / "moe.json"
    run_main(bench_moe, "--tokens=1,16", "--experts=4", "--experts_per_token=2", "--moe_hidden=32", "--moe_ffn=48", "--runs=1",
             "--calls=1", "--paths=xla,pallas,loop,gather", f"--out={out}")
    result = json.loads(out.read_text())
    assert [r["tokens"] for r in result["results"]] == [1, 16]
    for r in result["results"]:
        assert set(r["ms"]) == {"xla", "pallas", "loop", "gather"}
        assert max(r["max_abs_diff_from_first"].values()) <= 1e-5  # every path computes the same layer
        assert r["experts_touched"] <= min(4, 2 * r["tokens"])
    assert result["results"][0]["experts_touched"] == 2 and "touched" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--experts_per_token=5 must be <= --experts=4"):
        run_main(bench_moe, "--experts=4", "--experts_per_token=5")


def test_lora_on_a_moe_models_attention(mixtral, rng):
    """An adapter over every projection of a MoE model (its attention: the experts are not
    adaptable) gives the merged model's logits; a row without it, the base model's."""
    from jaxinfer import lora

    _, model = mixtral
    adapter = lora.random_adapter(model.config, 4, std=0.05, seed=3, name="a")
    assert set(adapter.projections) == {"wq", "wk", "wv", "wo"}
    tokens = rng.integers(0, 256, (2, 12))
    both = lora.forward_logits(model, tokens, [adapter, None])
    assert row_rel_error(both[0], ji.forward_logits(lora.merge(model, adapter), tokens[:1])[0]) <= 1e-5
    assert row_rel_error(both[1], ji.forward_logits(model, tokens[1:])[0]) <= 1e-5
    assert row_rel_error(both[0], ji.forward_logits(model, tokens[:1])[0]) > 1e-3


@pytest.mark.parametrize("name", ["int8-experts", pytest.param("int4-g16-experts", marks=pytest.mark.slow)])
def test_quantised_experts_equal_their_dequantised_model(mixtral, name, rng):
    """RTN on the experts too (QuantScheme(experts=True)): one QuantizedWeight (L, E, K, N) per
    expert weight, dequantised in the grouped matmul's program (XLA) or tile by tile in the Pallas
    grouped kernel (no dense expert weight in its program): the model's logits are its dequantised
    twin's, and the quantisation moved them."""
    _, model = mixtral
    scheme = quant.scheme_from_name(name)
    assert scheme.experts and scheme.name.endswith("-experts")
    q = quant.quantize_model(model, scheme, progress=False)
    for expert in ("experts_gate", "experts_up", "experts_down"):
        w = q.params["layers"][expert]
        assert isinstance(w, quant.QuantizedWeight) and w.shape == model.params["layers"][expert].shape
    tokens = rng.integers(0, 256, (2, 12))
    dequantised = dataclasses.replace(model, params=dequantize_params(q.params))
    expected = ji.forward_logits(dequantised, tokens)
    assert row_rel_error(ji.forward_logits(q, tokens), expected) <= 1e-5
    assert row_rel_error(ji.forward_logits(q, tokens, matmul_impl="pallas"), expected) <= 1e-5
    assert row_rel_error(expected, ji.forward_logits(model, tokens)) > 1e-4
    # Under Pallas the experts reach the kernel packed: its program has grouped_quant_matmul's
    # pallas_call and no float array of a whole expert weight's (E, K, N) shape.
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    text = str(jax.make_jaxpr(lambda p: model_lib.forward(p, q.config, jnp.asarray(tokens), positions,
                                                           impl=model_lib.Impl(matmul="pallas")).logits)(q.params))
    assert "grouped_quant_matmul" in text
    E, K, N = model.params["layers"]["experts_gate"].shape[1:]
    assert f"f32[{E},{K},{N}]" not in text and f"f32[{E},{N},{K}]" not in text


def test_quantised_experts_by_name():
    assert quant.scheme_from_name("int4-awq-g32-experts").experts
    with pytest.raises(ValueError, match="only int4 / int8 weight-only schemes"):
        quant.scheme_from_name("w8a8-fp8-experts")
