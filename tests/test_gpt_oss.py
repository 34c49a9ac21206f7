"""gpt-oss: the published config as HF transformers reads it, YaRN against HF's own RoPE init, the
stacked and interleaved expert tensors at load and save, that each gpt-oss feature moves the logits
(so the HF parity in test_hf_parity.py, ARCHS "gpt_oss", holds them all), the experts' grouped
path against the dense loop, and the engine's paths (Pallas kernels with sinks) against HF."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import (
    TOLERANCE,
    check_engine_paths_against_hf_greedy,
    check_saved_equals_hf_file,
    hf_greedy,
    hf_model,
    row_rel_error,
    save_hf,
)
from test_gemma import _hf_config, _hf_num_params

import jaxinfer as ji
from jaxinfer import memory
from jaxinfer.models import decoder as model_lib
from jaxinfer.models import family as family_lib
from jaxinfer.models import moe
from jaxinfer.models.config import ConfigError, ModelConfig, rope_from_hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF torch model, our model from its checkpoint, the checkpoint's path): helpers.ARCHS["gpt_oss"]."""
    hf = hf_model("gpt_oss", seed=11)
    path = save_hf(hf, tmp_path_factory.mktemp("gpt_oss"))
    return hf, ji.load_model(path), path


def test_published_config_reads_as_hf_reads_it():
    """gpt-oss-20b's config.json (old-style rope_scaling, experts_per_token beside num_experts_per_tok):
    HF's parameter count (20.9B, the model card's 21B), its layer types, YaRN settings and round trip."""
    published = json.loads((memory.CONFIGS_DIR / "models" / "gpt_oss_20b.json").read_text())
    cfg, hf = ModelConfig.from_hf_dict(published), _hf_config(published)
    assert cfg.num_params() == _hf_num_params(hf) == 20_914_757_184
    assert cfg.layer_windows == tuple(128 if t == "sliding_attention" else 0 for t in hf.layer_types)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.swiglu_limit) == (32, 4, 7.0)
    assert cfg.rope.type == "yarn" and cfg.rope.factor == 32.0 and not cfg.rope.truncate and cfg.attn_sinks
    # the model card's 3.6B active parameters leave out the embedding table (a token reads one row of it)
    assert (memory.active_params(cfg) - cfg.vocab_size * cfg.hidden_size) / 1e9 == pytest.approx(3.61, abs=0.01)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("rope", [
    dict(factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original_max_position_embeddings=4096,
         rope_theta=150000.0),  # gpt-oss
    dict(factor=4.0, original_max_position_embeddings=2048, rope_theta=10000.0),  # the defaults, truncated
    dict(factor=8.0, original_max_position_embeddings=512, rope_theta=1e6, attention_factor=0.9, beta_fast=16.0),
    # DeepSeek's: the cos / sin factor mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    dict(factor=40.0, original_max_position_embeddings=4096, rope_theta=10000.0, mscale=0.707, mscale_all_dim=1.0),
])
def test_yarn_matches_hf_rope_init(rope):
    """Frequencies and the cos / sin factor against transformers' own YaRN init."""
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", **rope}
    hf = GptOssConfig(head_dim=64, num_attention_heads=4, hidden_size=64, rope_parameters=rope,
                      max_position_embeddings=rope["original_max_position_embeddings"] * int(rope["factor"]))
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    ours = rope_from_hf({"rope_parameters": rope})
    np.testing.assert_allclose(ours.inv_freq(64), inv_freq.numpy(), rtol=1e-6)  # an ulp or two of float32 pow
    assert ours.cos_sin_scale == pytest.approx(factor, rel=1e-12)
    assert rope_from_hf({"rope_parameters": ji.ModelConfig(rope=ours).to_hf_dict()["rope_parameters"]}) == ours


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": False}, "attention_bias=False"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 40.0}}, "original_max_position_embeddings"),
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types has 3 entries"),
])
def test_unsupported_options_raise_naming_them(change, message):
    published = json.loads((memory.CONFIGS_DIR / "models" / "gpt_oss_20b.json").read_text())
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict({**published, **change})


def test_stacked_interleaved_experts_split_at_load_and_interleave_back_on_save(pair, tmp_path):
    """gate_up_proj (E, D, 2F) holds gate and up in alternate columns, stored (in, out): the loader
    takes every other column and does not transpose; the writer gives back HF's file exactly."""
    hf, model, path = pair
    experts = hf.model.layers[1].mlp.experts
    gate_up, bias = experts.gate_up_proj.detach().numpy(), experts.gate_up_proj_bias.detach().numpy()
    lp = {k: np.asarray(v[1]) for k, v in model.params["layers"].items()}
    np.testing.assert_array_equal(lp["experts_gate"], gate_up[..., ::2])
    np.testing.assert_array_equal(lp["experts_up"], gate_up[..., 1::2])
    np.testing.assert_array_equal(lp["experts_gate_bias"], bias[:, ::2])
    np.testing.assert_array_equal(lp["experts_down"], experts.down_proj.detach().numpy())
    np.testing.assert_array_equal(lp["sinks"], hf.model.layers[1].self_attn.sinks.detach().numpy())
    check_saved_equals_hf_file(model, path, tmp_path / "ours")


def _without(model, **changes):
    """model with config fields changed (and the sinks dropped when attn_sinks goes)."""
    cfg = dataclasses.replace(model.config, **changes)
    layers = {k: v for k, v in model.params["layers"].items() if cfg.attn_sinks or k != "sinks"}
    return dataclasses.replace(model, config=cfg, params={**model.params, "layers": layers})


@pytest.mark.parametrize("changes", [
    dict(attn_sinks=False), dict(swiglu_limit=None), dict(rope=ji.ModelConfig().rope),
    dict(layer_windows=(0, 0, 0, 0)), dict(norm_topk_prob=False),
], ids=["no-sinks", "no-clamp", "no-yarn", "no-windows", "softmax-over-all"])
def test_each_feature_moves_the_logits(pair, changes, rng):
    """Parity with HF (1e-5 per row) holds every feature: each one, left out, moves the logits by far more."""
    hf, model, _ = pair
    tokens = rng.integers(0, 256, size=(2, 24))
    with torch.no_grad():
        expected = hf(torch.from_numpy(tokens)).logits.numpy()
    assert row_rel_error(ji.forward_logits(model, tokens), expected) <= TOLERANCE["float32"]
    assert row_rel_error(ji.forward_logits(_without(model, **changes), tokens), expected) > 1e-3


def test_grouped_experts_with_biases_and_clamp_equal_the_dense_loop(pair):
    _, model, _ = pair
    cfg, lp = model.config, {k: v[0] for k, v in model.params["layers"].items()}
    h = 3 * jax.random.normal(jax.random.key(4), (3, 7, cfg.hidden_size))  # large enough for the clamp to bite
    grouped = moe.moe(family_lib.of(cfg), cfg, lp, h, model_lib.dense_projection())
    assert row_rel_error(grouped, moe.reference_moe(family_lib.of(cfg), cfg, lp, h)) <= TOLERANCE["float32"]


def test_pallas_forward_equals_xla_with_sinks(pair, rng):
    """Both Pallas kernels (interpret mode) take the sinks and a window per layer (lax.switch)."""
    _, model, _ = pair
    tokens = rng.integers(0, 256, size=(2, 12))
    assert row_rel_error(ji.forward_logits(model, tokens, attn_impl="pallas"),
                         ji.forward_logits(model, tokens)) <= TOLERANCE["float32"]


@pytest.mark.parametrize("engine_config", [
    pytest.param(dict(attention="pallas"), marks=pytest.mark.slow),  # paged prefill and decode kernels with sinks
    pytest.param(dict(kv_dtype="int8"), marks=pytest.mark.slow),
    pytest.param(dict(), marks=pytest.mark.slow),  # 5 s; the fast tier keeps HF's 32 greedy tokens (test_hf_parity)
], ids=["pallas", "int8-kv", "xla"])
def test_engine_paths_match_hf_greedy(pair, engine_config, rng):
    """helpers.check_engine_paths_against_hf_greedy: the window (5) crossed, chunked prefill, a
    prefix hit, HF's 16 greedy tokens (int8 KV: agreement)."""
    hf, model, _ = pair
    check_engine_paths_against_hf_greedy(hf, model, engine_config, rng)


def test_sinks_split_over_tp_like_query_heads():
    from jaxinfer import sharding

    assert family_lib.parallel_style("sinks") == "column_bias"
    specs = sharding.param_specs({"layers": {"sinks": jnp.zeros((2, 4))}}, tp=2)
    assert specs["layers"]["sinks"] == sharding.P(None, "tp")


@pytest.fixture(scope="module")
def mxfp4_pair(tmp_path_factory):
    """A random gpt-oss checkpoint with its experts in MXFP4 as published (random codes, scales of
    2^-9..2^-6: weights of the other tensors' size), (HF's model dequantised by its own Mxfp4
    integration, our model, the path)."""
    import transformers
    from safetensors.torch import load_file, save_file

    path = save_hf(hf_model("gpt_oss", seed=2, intermediate_size=64), tmp_path_factory.mktemp("mxfp4"))
    tensors, rng = load_file(f"{path}/model.safetensors"), np.random.default_rng(0)
    for name in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, K, N = tensors.pop(name).shape
        tensors[name + "_blocks"] = torch.from_numpy(rng.integers(0, 256, (E, N, K // 32, 16), dtype=np.uint8))
        tensors[name + "_scales"] = torch.from_numpy(rng.integers(118, 122, (E, N, K // 32), dtype=np.uint8))
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    config = json.loads(open(f"{path}/config.json").read())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(f"{path}/config.json", "w") as f:
        json.dump(config, f)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager").eval()
    return hf, ji.load_model(path), path


def test_mxfp4_experts_load_packed_and_match_hf(mxfp4_pair, rng):
    """The experts stay packed (4.25 bits a weight), dequantise to HF's weights exactly, and the
    logits and greedy tokens are HF's (its own MXFP4 dequantiser)."""
    from jaxinfer.models.formats import MXFP4Weight, dequantize_mxfp4

    hf, model, _ = mxfp4_pair
    layers = model.params["layers"]
    for name in ("experts_gate", "experts_up", "experts_down"):
        assert isinstance(layers[name], MXFP4Weight), name
        assert layers[name].nbytes * 8 / np.prod(layers[name].shape) == 4.25
    gate_up = hf.model.layers[2].mlp.experts.gate_up_proj.detach().numpy()
    np.testing.assert_array_equal(np.asarray(dequantize_mxfp4(layers["experts_up"])[2]), gate_up[..., 1::2])
    tokens = rng.integers(0, 256, size=(2, 24))
    with torch.no_grad():
        expected = hf(torch.from_numpy(tokens)).logits.numpy()
    assert row_rel_error(ji.forward_logits(model, tokens), expected) <= TOLERANCE["float32"]
    prompt = rng.integers(0, 256, size=9).tolist()
    out = ji.generate(model, [prompt], ji.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert out[0].token_ids == hf_greedy(hf, prompt, 16)


def test_mxfp4_misshaped_blocks_are_named(mxfp4_pair, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    _, _, path = mxfp4_pair
    bad = shutil.copytree(path, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.experts.down_proj_scales"
    tensors[name] = tensors[name][:, :-1]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ji.CheckpointError if hasattr(ji, "CheckpointError") else ValueError, match=name):
        ji.load_model(bad)


def test_mxfp4_experts_split_over_tp():
    """Column experts split on their output columns, row experts on their blocks of input rows."""
    from jaxinfer import sharding
    from jaxinfer.models.formats import MXFP4Weight

    w = MXFP4Weight(blocks=jnp.zeros((2, 4, 8, 6, 16), jnp.uint8), scales=jnp.zeros((2, 4, 8, 6), jnp.uint8))
    specs = sharding.param_specs({"layers": {"experts_gate": w, "experts_down": w}}, tp=2)["layers"]
    assert specs["experts_gate"].blocks == sharding.P(None, None, "tp", None, None)
    assert specs["experts_down"].scales == sharding.P(None, None, None, "tp")
    with pytest.raises(ValueError, match="6 MXFP4 blocks of input rows do not split evenly over tp=4"):
        sharding.param_specs({"layers": {"experts_down": w}}, tp=4)


def test_planner_counts_mxfp4_experts_at_4_25_bits():
    """gpt-oss-20b as published: experts in MXFP4 (a byte per two weights, a scale byte per 32),
    everything else in bfloat16 (12.8 GiB; the experts' 19.1B weights would be 36 GiB in bfloat16)."""
    cfg = memory.load_model_config("gpt_oss_20b")
    experts = cfg.num_layers * cfg.num_experts * memory.expert_params(cfg)
    assert memory.weight_bytes(cfg, "mxfp4-experts") == memory.weight_bytes(cfg, "bfloat16") - 2 * experts + (
        experts // 2 + experts // 32)
    assert memory.weight_bytes(cfg, "mxfp4-experts") / 2**30 == pytest.approx(12.82, abs=0.01)
    assert memory.weight_bytes(cfg, "mxfp4") < memory.weight_bytes(cfg, "mxfp4-experts")
