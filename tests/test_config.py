"""ModelConfig from HF config.json: both generations of RoPE fields, every supported family, clear errors."""

from __future__ import annotations

import jax
import pytest

from jaxinfer.models.config import ConfigError, ModelConfig, RopeConfig

LLAMA31_OLD_STYLE = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}


def test_old_and_new_rope_fields_agree():
    old = ModelConfig.from_hf_dict(LLAMA31_OLD_STYLE)
    new_style = {k: v for k, v in LLAMA31_OLD_STYLE.items() if k not in ("rope_theta", "rope_scaling")}
    new_style["rope_parameters"] = {**LLAMA31_OLD_STYLE["rope_scaling"], "rope_theta": 500000.0}
    new = ModelConfig.from_hf_dict(new_style)
    assert old == new
    assert old.rope == RopeConfig(theta=500000.0, type="llama3", factor=8.0, original_max_position_embeddings=8192)
    assert old.head_dim == 128 and old.q_per_kv == 4
    assert old.eos_token_ids == (128001, 128008, 128009)
    assert old.num_params() == 8_030_261_248


def test_old_style_type_key_and_default_theta():
    cfg = ModelConfig.from_hf_dict({**LLAMA31_OLD_STYLE, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert cfg.rope.type == "linear" and cfg.rope.factor == 4.0 and cfg.rope.theta == 500000.0
    bare = {k: v for k, v in LLAMA31_OLD_STYLE.items() if k not in ("rope_theta", "rope_scaling")}
    assert ModelConfig.from_hf_dict(bare).rope == RopeConfig(theta=10000.0)


def test_config_is_hashable_and_a_static_jit_argument():
    cfg = ModelConfig.from_hf_dict(LLAMA31_OLD_STYLE)
    assert hash(cfg) == hash(ModelConfig.from_hf_dict(dict(LLAMA31_OLD_STYLE)))
    f = jax.jit(lambda x, cfg: x * cfg.num_layers, static_argnames="cfg")
    assert int(f(1, cfg=cfg)) == 32


def test_to_hf_dict_round_trips():
    for cfg in (
        ModelConfig.from_hf_dict(LLAMA31_OLD_STYLE),
        ModelConfig(model_type="mistral", layer_windows=(8, 8)),
        ModelConfig(model_type="qwen3", qk_norm=True, head_dim=32),
        ModelConfig(model_type="qwen2", qkv_bias=True),
    ):
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_families():
    base = {k: v for k, v in LLAMA31_OLD_STYLE.items() if k not in ("rope_scaling",)}
    mistral = ModelConfig.from_hf_dict({**base, "model_type": "mistral", "sliding_window": 4096})
    assert mistral.layer_windows == (4096,) * 32 and not mistral.qkv_bias
    assert ModelConfig.from_hf_dict({**base, "model_type": "mistral", "sliding_window": None}).sliding_window == 0
    qwen2 = ModelConfig.from_hf_dict({**base, "model_type": "qwen2"})
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm
    qwen3 = ModelConfig.from_hf_dict({**base, "model_type": "qwen3", "head_dim": 256})
    assert qwen3.qk_norm and qwen3.head_dim == 256 and not qwen3.qkv_bias
    mixed = ModelConfig.from_hf_dict(
        {**base, "model_type": "qwen2", "num_hidden_layers": 4, "sliding_window": 64, "use_sliding_window": True,
         "max_window_layers": 2}
    )
    assert mixed.layer_windows == (0, 0, 64, 64)
    assert ModelConfig.from_hf_dict({**base, "attention_bias": True}).o_bias


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "model_type='gpt2'"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope_type='longrope'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"num_key_value_heads": 5}, "num_key_value_heads=5"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_unsupported_options_raise_naming_them(change, message):
    hf = {**LLAMA31_OLD_STYLE, **change}
    if change.get("hidden_size", 0) is None:
        del hf["hidden_size"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_hf_dict(hf)
    assert issubclass(ConfigError, ValueError)


def test_llama3_inv_freq_matches_hf():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = LlamaConfig(**{k: v for k, v in LLAMA31_OLD_STYLE.items() if k != "model_type"})
    inv_freq, scale = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, torch.device("cpu"))
    ours = ModelConfig.from_hf_dict(LLAMA31_OLD_STYLE).rope.inv_freq(128)
    assert scale == 1.0
    assert abs(ours - inv_freq.numpy()).max() <= 1e-6 * abs(inv_freq.numpy()).max()
