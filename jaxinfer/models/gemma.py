"""The Gemma 2 and Gemma 3 (text) families.

What sets them apart from the Llama-style layer (jaxinfer.models.llama), all of it data on the
family seam except the layer function below:
  - RMSNorm as x / rms(x) * (1 + w), in float32 (Norm("rms_plus_1"));
  - a norm after attention and after the MLP as well as before each (four per layer);
  - GeGLU (gelu_pytorch_tanh), the embedding scaled by sqrt(hidden_size);
  - the scores scaled by query_pre_attn_scalar ** -0.5 (ModelConfig.attention_scale);
  - sliding-window and global layers alternating (layer_types);
  - Gemma 2: the attention scores soft-capped (attn_logit_softcapping: ModelConfig.attn_softcap,
    inside both attention paths and both Pallas kernels) and the final logits (final_logit_softcapping);
  - Gemma 3: q and k normalised per head, and the local layers' own RoPE base (ModelConfig.local_rope).

One layer (x (B, T, D) -> (B, T, D); every projection through `project`):
  h = norm(x, attn_norm);  q, k, v = h @ wq, h @ wk, h @ wv  (+ biases with attention_bias)
  q, k = norm(q, q_norm), norm(k, k_norm) per head (Gemma 3);  q, k = rope(q), rope(k)
  x = x + norm(attend(q, k, v) @ wo, post_attn_norm)
  h = norm(x, mlp_norm);  x = x + norm((gelu(h @ w_gate) * (h @ w_up)) @ w_down, post_mlp_norm)

AWQ and SmoothQuant fold into the norms before the projections (attn_norm, mlp_norm) through the
norm's gain, 1 + w (Norm.map_gain); the norms after the projections see the projections' outputs,
which a fold leaves unchanged. GGUF files (general.architecture gemma2, gemma3): `gguf_config` says
what llama.cpp reads from them and what it fixes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxinfer.models import llama
from jaxinfer.models.config import (
    ConfigError,
    ModelConfig,
    RopeConfig,
    hf_field,
    read_common,
    rope_from_hf,
    rope_to_hf,
    windows_from_layer_types,
    write_common,
)
from jaxinfer.models.family import ACTIVATIONS, Family, Norm, Param, register

ACTIVATION = "gelu_pytorch_tanh"


def layer(family: Family, cfg: ModelConfig, lp, x, cos, sin, attend, project):
    """One Gemma 2/3 decoder layer: x (B, T, D) -> (B, T, D) (module docstring)."""
    norm, eps = family.norm, cfg.rms_norm_eps
    a, state = llama.attention(family, cfg, lp, x, cos, sin, attend, project)  # q/k norms when cfg.qk_norm
    x = x + norm(a, lp["post_attn_norm"], eps)

    h = norm(x, lp["mlp_norm"], eps)
    mlp = ACTIVATIONS[family.activation](project("w_gate", h, lp)) * project("w_up", h, lp)  # (B, T, F)
    return x + norm(project("w_down", mlp, lp), lp["post_mlp_norm"], eps), state


def _hf_names(params: tuple[Param, ...]) -> tuple[Param, ...]:
    """The Llama-style params under Gemma's HF names: the norm before the MLP is
    pre_feedforward_layernorm (post_attention_layernorm is the norm after attention here). llama.cpp
    names them as the Llama-style ones (ffn_norm before the MLP)."""
    renamed = {"mlp_norm": "pre_feedforward_layernorm.weight"}
    return tuple(dataclasses.replace(p, hf=renamed.get(p.name, p.hf)) for p in params)


PARAMS = _hf_names(llama.PARAMS) + (
    Param("post_attn_norm", "norm", lambda c: (c.hidden_size,), "post_attention_layernorm.weight",
          "post_attention_norm.weight"),
    Param("post_mlp_norm", "norm", lambda c: (c.hidden_size,), "post_feedforward_layernorm.weight",
          "post_ffw_norm.weight"),
)

_DEFAULTS = {  # HF's config defaults where config.json may leave a field out
    "gemma2": dict(head_dim=256, max_position_embeddings=8192, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0, window_pattern=2),
    "gemma3_text": dict(head_dim=256, max_position_embeddings=131072, query_pre_attn_scalar=256, sliding_window=4096,
                        final_logit_softcapping=None, attn_logit_softcapping=None, window_pattern=6),
}


def _optional_float(hf: dict[str, Any], name: str, default: float | None) -> float | None:
    """A positive float field that may be null (absent: default)."""
    value = hf.get(name, default) if name not in hf or hf[name] is not None else None
    if value is None:
        return None
    value = hf_field({name: value}, name, float)
    if value <= 0:
        raise ConfigError(f"{name}={value!r} must be > 0 (or null: none)")
    return value


def _ropes(family: Family, hf: dict[str, Any]) -> tuple[RopeConfig, RopeConfig | None]:
    """Gemma 2: one RoPE. Gemma 3: the global layers' and the local (sliding) layers' RoPE, from
    rope_parameters keyed by layer type, or the older rope_theta / rope_scaling / rope_local_base_freq."""
    if family.name == "gemma2":
        return rope_from_hf(hf), None
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and {"full_attention", "sliding_attention"} & params.keys():
        by_type = {}
        for kind in ("full_attention", "sliding_attention"):
            fields = params.get(kind) or {"rope_type": "default"}
            if not isinstance(fields, dict):
                raise ConfigError(f"rope_parameters[{kind!r}]={fields!r} is not an object of rope fields")
            theta = 1_000_000.0 if kind == "full_attention" else 10_000.0
            by_type[kind] = rope_from_hf({"rope_parameters": {"rope_theta": theta, **fields}})
        return by_type["full_attention"], by_type["sliding_attention"]
    glob = rope_from_hf({**hf, "rope_theta": hf.get("rope_theta", 1_000_000.0)})
    local = RopeConfig(theta=hf_field(hf, "rope_local_base_freq", float, 10_000.0, minimum=0.0))
    return glob, local


def read_config(family: Family, hf: dict[str, Any]) -> ModelConfig:
    defaults = _DEFAULTS[family.name]
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ACTIVATION
    if act != ACTIVATION:
        raise ConfigError(f"hidden_activation={act!r} is not supported (only {ACTIVATION!r})")
    if hf_field(hf, "use_bidirectional_attention", bool, False):
        raise ConfigError("use_bidirectional_attention=True is not supported (causal decoding only)")
    common = read_common({**hf, "head_dim": hf.get("head_dim", defaults["head_dim"])})
    num_layers = common["num_layers"]
    common["tie_word_embeddings"] = hf_field(hf, "tie_word_embeddings", bool, True)
    common["max_position_embeddings"] = hf_field(hf, "max_position_embeddings", int,
                                                 defaults["max_position_embeddings"], minimum=1)
    rope, local_rope = _ropes(family, hf)
    common["rope"] = rope
    window_hf = {**hf, "sliding_window": hf.get("sliding_window") or defaults["sliding_window"]}
    pattern = hf_field(hf, "sliding_window_pattern", int, defaults["window_pattern"], minimum=1)
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    windows = windows_from_layer_types(window_hf, layer_types, num_layers)
    biased = hf_field(hf, "attention_bias", bool, False)
    # Gemma 3's config carries attn_logit_softcapping but HF transformers' Gemma 3 layer does not
    # apply it; it is read for Gemma 2 only, as there.
    attn_softcap = (_optional_float(hf, "attn_logit_softcapping", defaults["attn_logit_softcapping"])
                    if family.name == "gemma2" else None)
    scalar = hf_field(hf, "query_pre_attn_scalar", float, float(defaults["query_pre_attn_scalar"]), minimum=0.0)
    if scalar <= 0:
        raise ConfigError(f"query_pre_attn_scalar={scalar!r} must be > 0")
    return ModelConfig(
        model_type=family.name, **common, qkv_bias=biased, o_bias=biased, qk_norm=family.name == "gemma3_text",
        layer_windows=windows, attention_scale=float(scalar**-0.5), embedding_scale=float(common["hidden_size"] ** 0.5),
        logit_softcap=_optional_float(hf, "final_logit_softcapping", defaults["final_logit_softcapping"]),
        attn_softcap=attn_softcap, local_rope=local_rope)


def write_config(family: Family, cfg: ModelConfig) -> dict[str, Any]:
    if cfg.embedding_scale != float(cfg.hidden_size**0.5):
        raise ConfigError(f"embedding_scale={cfg.embedding_scale!r}: {family.name} scales by sqrt(hidden_size)")
    if cfg.attention_scale is None:
        raise ConfigError(f"{family.name} needs attention_scale (query_pre_attn_scalar ** -0.5)")
    if cfg.qkv_bias != cfg.o_bias:
        raise ConfigError("attention_bias biases q, k, v and o together")
    if family.name != "gemma2" and cfg.attn_softcap is not None:
        raise ConfigError(f"attn_softcap={cfg.attn_softcap!r}: {family.name} does not soft-cap attention scores")
    scalar = round(cfg.attention_scale**-2, 9)  # an int in HF's config class
    out = write_common(cfg, family)
    del out["hidden_act"]
    windows = sorted(set(cfg.layer_windows) - {0})
    if len(windows) > 1:
        raise ConfigError(f"layer_windows {cfg.layer_windows}: {family.name} has one sliding window")
    out.update(
        hidden_activation=family.activation, attention_bias=cfg.o_bias,
        query_pre_attn_scalar=int(scalar) if scalar.is_integer() else scalar, final_logit_softcapping=cfg.logit_softcap,
        sliding_window=windows[0] if windows else _DEFAULTS[family.name]["sliding_window"],
        layer_types=["sliding_attention" if w else "full_attention" for w in cfg.layer_windows])
    if family.name == "gemma2":
        out["attn_logit_softcapping"] = cfg.attn_softcap
    else:
        local = cfg.local_rope or cfg.rope
        out["rope_parameters"] = {"full_attention": rope_to_hf(cfg.rope), "sliding_attention": rope_to_hf(local)}
    return out


# What llama.cpp fixes per GGUF architecture rather than reading (src/models/gemma2.cpp, gemma3.cpp):
# the layer period of the window pattern (one global layer in `pattern`, the last; a newer llama.cpp
# reads attention.sliding_window_pattern, none of its converters writes it), the window when the file
# has none (Gemma 2; Gemma 3 needs the key), and the layer count of the 27B model, whose query scale
# is (hidden / heads) ** -0.5 instead of head_dim ** -0.5 (llama.cpp's LLM_TYPE_27B).
_GGUF = {"gemma2": dict(pattern=2, window=4096, layers_27b=46),
         "gemma3_text": dict(pattern=6, window=None, layers_27b=62)}


def gguf_config(family: Family, cfg: ModelConfig, key) -> ModelConfig:
    """A gemma2 / gemma3 GGUF file's config, as llama.cpp reads it (where HF transformers' GGUF
    loader reads it otherwise, llama.cpp is followed: it wrote the file and runs it):
      - the query scale is not in the file: llama.cpp takes head_dim ** -0.5, or (hidden / heads) ** -0.5
        for the 27B models it recognises by their layer count (_GGUF). These are the published
        query_pre_attn_scalar values (head_dim = 256 for the smaller models; hidden / heads for the
        27B ones, 144 for Gemma 2's and 168 for Gemma 3's), but a model whose query_pre_attn_scalar is
        neither loses it; HF's GGUF loader takes its config default (256) instead;
      - windows: attention.sliding_window on every layer but one in `pattern` (HF's layer_types
        spelled the same way: layer i is global when (i + 1) % pattern == 0);
      - Gemma 2: both soft-caps from attn_logit_softcapping / final_logit_softcapping (llama.cpp's
        defaults, 50 and 30, when absent; HF's GGUF loader reads neither and takes the same defaults),
        one RoPE (rope.freq_base_swa, if present, must equal rope.freq_base);
      - Gemma 3: the local layers' RoPE base from rope.freq_base_swa (10000, llama.cpp's fixed value,
        when absent; HF's GGUF loader always takes 10000) at scale 1; no final soft-cap even when
        final_logit_softcapping is present (llama.cpp's sliding-window graph applies none).
    The norms' (1 + w) weights are stored as their gains: jaxinfer.checkpoints.gguf subtracts the 1
    (Norm.from_gain)."""
    fixed = _GGUF[family.name]
    pattern = key("attention.sliding_window_pattern", fixed["pattern"])
    if not isinstance(pattern, int) or pattern < 1:
        raise ConfigError(f"attention.sliding_window_pattern={pattern!r} is not a period of layers (an int >= 1)")
    window = int(key("attention.sliding_window") if fixed["window"] is None else
                 key("attention.sliding_window", fixed["window"]))
    windows = tuple(window if (i + 1) % pattern else 0 for i in range(cfg.num_layers))
    query = cfg.hidden_size // cfg.num_heads if cfg.num_layers == fixed["layers_27b"] else cfg.head_dim
    out = dataclasses.replace(cfg, layer_windows=windows, attention_scale=float(query**-0.5),
                              embedding_scale=float(cfg.hidden_size**0.5))
    if family.name == "gemma2":
        local = float(key("rope.freq_base_swa", cfg.rope.theta))
        if local != cfg.rope.theta:
            raise ConfigError(f"rope.freq_base_swa={local} differs from rope.freq_base={cfg.rope.theta}: a Gemma 2 "
                              "with a RoPE of its own on the local layers is not supported")
        return dataclasses.replace(out, attn_softcap=float(key("attn_logit_softcapping", 50.0)),
                                   logit_softcap=float(key("final_logit_softcapping", 30.0)))
    return dataclasses.replace(out, local_rope=RopeConfig(theta=float(key("rope.freq_base_swa", 10000.0))))


def check_config(family: Family, cfg: ModelConfig) -> None:
    if cfg.qk_norm != (family.name == "gemma3_text"):
        raise ConfigError(f"{family.name}: q/k norms are {'required' if not cfg.qk_norm else 'not part of it'}")


def _gemma(name: str, architecture: str, gguf_architecture: str) -> Family:
    return Family(name=name, architectures=(architecture,), params=PARAMS, sites=llama.SITES, layer=layer,
                  read_config=read_config, write_config=write_config, check_config=check_config,
                  norm=Norm("rms_plus_1"), activation=ACTIVATION, gguf_architectures=(gguf_architecture,),
                  gguf_config=gguf_config)


GEMMA2 = register(_gemma("gemma2", "Gemma2ForCausalLM", "gemma2"))
GEMMA3 = register(_gemma("gemma3_text", "Gemma3ForCausalLM", "gemma3"))
