"""Phi-3: its fused qkv_proj / gate_up_proj tensors split at load and stacked back on save, configs as
HF transformers reads them, what it refuses. Logits and greedy parity with HF are in
test_hf_parity.py (ARCHS "phi3")."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy
from helpers import check_saved_equals_hf_file, hf_model, save_hf
from test_gemma import _hf_config, _hf_num_params

import jaxinfer as ji
from jaxinfer.checkpoints.hf_layout import CheckpointError, expected_tensors
from jaxinfer.models.config import ConfigError, ModelConfig

# config.json of microsoft/Phi-3-mini-4k-instruct as published.
PHI3_MINI_4K = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "attention_dropout": 0.0, "bos_token_id": 1,
    "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 8192,
    "max_position_embeddings": 4096, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
    "vocab_size": 32064,
}


def test_published_config_reads_as_hf_reads_it():
    cfg, hf = ModelConfig.from_hf_dict(PHI3_MINI_4K), _hf_config(PHI3_MINI_4K)
    assert cfg.layer_windows == (hf.sliding_window,) * hf.num_hidden_layers
    assert cfg.rope.theta == hf.rope_parameters["rope_theta"] and not cfg.tie_word_embeddings
    assert cfg.num_params() == _hf_num_params(hf)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48}},
     "rope_type='longrope'"),
    ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48}}, "rope_type='su'"),
    ({"partial_rotary_factor": 0.75}, "partial_rotary_factor=0.75"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unsupported_options_raise_naming_them(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict({**PHI3_MINI_4K, **change})


def test_fused_tensors_split_at_load_and_stack_back_on_save(tmp_path):
    """The loader cuts qkv_proj into wq, wk, wv and gate_up_proj into w_gate, w_up by rows; the
    writer stacks them back: the saved file equals HF's, tensor for tensor."""
    hf = hf_model("phi3", seed=3)
    path = save_hf(hf, tmp_path / "hf")
    model = ji.load_model(path)
    layer = hf.model.layers[1]
    qkv = layer.self_attn.qkv_proj.weight.detach().numpy()
    gate_up = layer.mlp.gate_up_proj.weight.detach().numpy()
    cfg, lp = model.config, {k: np.asarray(v[1]) for k, v in model.params["layers"].items()}
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    np.testing.assert_array_equal(lp["wq"].T, qkv[:q])
    np.testing.assert_array_equal(lp["wk"].T, qkv[q:q + kv])
    np.testing.assert_array_equal(lp["wv"].T, qkv[q + kv:])
    np.testing.assert_array_equal(lp["w_gate"].T, gate_up[:cfg.intermediate_size])
    np.testing.assert_array_equal(lp["w_up"].T, gate_up[cfg.intermediate_size:])
    check_saved_equals_hf_file(model, path, tmp_path / "ours")
    fused = {k: s for k, s in expected_tensors(cfg).items() if s.parts}
    assert len(fused) == 2 * cfg.num_layers and fused["model.layers.0.self_attn.qkv_proj.weight"].hf_shape == (
        q + 2 * kv, cfg.hidden_size)


def test_a_misshaped_fused_tensor_is_named(tmp_path):
    hf = hf_model("phi3", seed=3)
    path = save_hf(hf, tmp_path / "hf")
    tensors = safetensors.numpy.load_file(f"{path}/model.safetensors")
    name = "model.layers.2.self_attn.qkv_proj.weight"
    tensors[name] = tensors[name][:-16]
    safetensors.numpy.save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \(112, 64\), expected \(128, 64\)"):
        ji.load_model(path)


def test_packed_checkpoints_of_fused_projections_are_refused():
    from jaxinfer.checkpoints import quantized

    cfg = ModelConfig.from_hf_dict({**PHI3_MINI_4K, "num_hidden_layers": 2})
    awq = quantized.CheckpointQuant.from_hf({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm",
                                             "zero_point": True})
    with pytest.raises(CheckpointError, match="fused projections .*self_attn.qkv_proj"):
        quantized._projections(cfg, awq)
