"""The Llama-style families: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3.

They share one parameter list, one layer and one config reader; what differs between them is data
(`Variant`): which projections have biases, whether q and k are normalised (Qwen3), how config.json
says which layers attend through a sliding window, and whether llama.cpp's converter reorders the
rotary rows of wq / wk. A family that differs in its norm or activation only (a GeGLU, (1 + w)
RMSNorm variant) is `dataclasses.replace(LLAMA, name=..., architectures=..., norm=..., activation=...)`
registered under its own names; one with another layer brings its own layer function.

One layer (x (B, T, D) -> (B, T, D); every projection through `project`, see jaxinfer.models.decoder):
  h = norm(x, attn_norm);  q, k, v = h @ wq (+ bq), h @ wk (+ bk), h @ wv (+ bv)
  q, k = norm(q, q_norm), norm(k, k_norm) per head (Qwen3);  q, k = rope(q), rope(k)
  x = x + attend(q, k, v) @ wo (+ bo)
  h = norm(x, mlp_norm);  x = x + (act(h @ w_gate) * (h @ w_up)) @ w_down
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxinfer.models import family as family_lib
from jaxinfer.models.config import (
    ConfigError,
    ModelConfig,
    hf_field,
    read_common,
    windows_from_layer_types,
    write_common,
)
from jaxinfer.models.family import ACTIVATIONS, Family, Param, Site, register
from jaxinfer.models.layers import apply_rope


def layer(family: Family, cfg: ModelConfig, lp, x, cos, sin, attend, project):
    """One decoder layer: x (B, T, D) -> (B, T, D). `attend(q, k, v) -> (o, state)` sees this
    layer's queries and new keys/values (rotated) and returns the attention output and whatever
    it updated (a cache, or None); `project(name, x, lp)` runs every projection."""
    a, state = attention(family, cfg, lp, x, cos, sin, attend, project)
    x = x + a
    h = family.norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    mlp = ACTIVATIONS[family.activation](project("w_gate", h, lp)) * project("w_up", h, lp)  # (B, T, F)
    return x + project("w_down", mlp, lp), state


def attention(family: Family, cfg: ModelConfig, lp, x, cos, sin, attend, project):
    """The attention half of a layer, before the residual: x (B, T, D) -> (its output after wo
    (B, T, D), attend's state). Other families' layers reuse it (Gemma, the MoE families)."""
    B, T, _ = x.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    norm, eps = family.norm, cfg.rms_norm_eps
    h = norm(x, lp["attn_norm"], eps)  # (B, T, D)
    q = project("wq", h, lp).reshape(B, T, N, H)
    k = project("wk", h, lp).reshape(B, T, K, H)
    v = project("wv", h, lp).reshape(B, T, K, H)
    if cfg.qk_norm:
        q = norm(q, lp["q_norm"], eps)
        k = norm(k, lp["k_norm"], eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o, state = attend(q, k, v, lp["sinks"]) if "sinks" in lp else attend(q, k, v)  # (B, T, N, H)
    return project("wo", o.reshape(B, T, N * H), lp), state


def _q_out(c: ModelConfig) -> int:
    return c.num_heads * c.head_dim


def _kv_out(c: ModelConfig) -> int:
    return c.num_kv_heads * c.head_dim


PARAMS = (
    Param("embed", "embedding", lambda c: (c.vocab_size, c.hidden_size), "model.embed_tokens.weight",
          "token_embd.weight", layer=False),
    Param("attn_norm", "norm", lambda c: (c.hidden_size,), "input_layernorm.weight", "attn_norm.weight"),
    Param("wq", "column", lambda c: (c.hidden_size, _q_out(c)), "self_attn.q_proj.weight", "attn_q.weight",
          bias="bq", calibration="attn", heads="query", rotary=True),
    Param("wk", "column", lambda c: (c.hidden_size, _kv_out(c)), "self_attn.k_proj.weight", "attn_k.weight",
          bias="bk", calibration="attn", heads="kv", rotary=True),
    Param("wv", "column", lambda c: (c.hidden_size, _kv_out(c)), "self_attn.v_proj.weight", "attn_v.weight",
          bias="bv", calibration="attn", heads="kv"),
    Param("wo", "row", lambda c: (_q_out(c), c.hidden_size), "self_attn.o_proj.weight", "attn_output.weight",
          bias="bo", calibration="attn_out"),
    Param("bq", "bias", lambda c: (_q_out(c),), "self_attn.q_proj.bias", "attn_q.bias",
          present=lambda c: c.qkv_bias, heads="query", rotary=True),
    Param("bk", "bias", lambda c: (_kv_out(c),), "self_attn.k_proj.bias", "attn_k.bias",
          present=lambda c: c.qkv_bias, heads="kv", rotary=True),
    Param("bv", "bias", lambda c: (_kv_out(c),), "self_attn.v_proj.bias", "attn_v.bias",
          present=lambda c: c.qkv_bias, heads="kv"),
    Param("bo", "bias", lambda c: (c.hidden_size,), "self_attn.o_proj.bias", "attn_output.bias",
          present=lambda c: c.o_bias),
    Param("q_norm", "norm", lambda c: (c.head_dim,), "self_attn.q_norm.weight", "attn_q_norm.weight",
          present=lambda c: c.qk_norm),
    Param("k_norm", "norm", lambda c: (c.head_dim,), "self_attn.k_norm.weight", "attn_k_norm.weight",
          present=lambda c: c.qk_norm),
    Param("mlp_norm", "norm", lambda c: (c.hidden_size,), "post_attention_layernorm.weight", "ffn_norm.weight"),
    Param("w_gate", "column", lambda c: (c.hidden_size, c.intermediate_size), "mlp.gate_proj.weight",
          "ffn_gate.weight", calibration="mlp"),
    Param("w_up", "column", lambda c: (c.hidden_size, c.intermediate_size), "mlp.up_proj.weight", "ffn_up.weight",
          calibration="mlp"),
    Param("w_down", "row", lambda c: (c.intermediate_size, c.hidden_size), "mlp.down_proj.weight",
          "ffn_down.weight", calibration="mlp_act"),
    Param("final_norm", "norm", lambda c: (c.hidden_size,), "model.norm.weight", "output_norm.weight", layer=False),
    Param("lm_head", "head", lambda c: (c.hidden_size, c.vocab_size), "lm_head.weight", "output.weight", layer=False,
          present=lambda c: not c.tie_word_embeddings),
)

# The inputs the projections share, and what produces each: 1/s folds into a norm's gain, into
# wv's output columns (through attention, one factor per kv channel), or into w_up's output columns
# (act(g) * (u / s) = (act(g) * u) / s for any gate activation).
SITES = (
    Site("attn", lambda c: c.hidden_size, fold="attn_norm"),
    Site("attn_out", _q_out, fold="wv", grouped=True),
    Site("mlp", lambda c: c.hidden_size, fold="mlp_norm"),
    Site("mlp_act", lambda c: c.intermediate_size, fold="w_up"),
)

_EXTRAS = ("attention_scale", "embedding_scale", "logit_softcap")  # no Llama-style config.json sets these


@dataclasses.dataclass(frozen=True)
class Variant:
    """What tells the Llama-style families apart in config.json.

    bias     "attention_bias": q, k, v and o biased when config.json says attention_bias (Llama,
             Qwen3); "qkv": q, k, v always biased, o never (Qwen2); "none" (Mistral)
    qk_norm  q and k normalised per head before RoPE (Qwen3)
    windows  "all": one sliding_window for every layer (Mistral); "layer_types": per layer, from
             layer_types or use_sliding_window + max_window_layers (Qwen2/3); None: no windows
    """

    bias: str
    qk_norm: bool = False
    windows: str | None = None

    def read_config(self, family: Family, hf: dict[str, Any]) -> ModelConfig:
        act = hf.get("hidden_act", family.activation)
        if act != family.activation:
            raise ConfigError(f"hidden_act={act!r} is not supported (only {family.activation!r})")
        if hf_field(hf, "mlp_bias", bool, False):
            raise ConfigError("mlp_bias=True is not supported")
        attention_bias = hf_field(hf, "attention_bias", bool, self.bias == "qkv")
        if self.bias == "qkv" and not attention_bias:
            raise ConfigError(f"{family.name} with attention_bias=False is not supported")
        common = read_common(hf)
        biased = self.bias == "attention_bias" and attention_bias
        return ModelConfig(model_type=family.name, **common, qkv_bias=self.bias == "qkv" or biased, o_bias=biased,
                           qk_norm=self.qk_norm, layer_windows=self._windows(hf, common["num_layers"]))

    def _windows(self, hf: dict[str, Any], num_layers: int) -> tuple[int, ...]:
        window = hf_field(hf, "sliding_window", int, 0, minimum=0)
        if self.windows == "all":
            return (window,) * num_layers
        if self.windows == "layer_types":
            layer_types = hf.get("layer_types")
            if layer_types is None:
                if not hf_field(hf, "use_sliding_window", bool, False):
                    return (0,) * num_layers
                first = hf_field(hf, "max_window_layers", int, num_layers, minimum=0)
                layer_types = ["full_attention" if i < first else "sliding_attention" for i in range(num_layers)]
            return windows_from_layer_types(hf, layer_types, num_layers)
        return (0,) * num_layers

    def write_config(self, family: Family, cfg: ModelConfig) -> dict[str, Any]:
        for name in _EXTRAS:
            if getattr(cfg, name) is not None:
                raise ConfigError(f"{name}={getattr(cfg, name)!r}: {family.name}'s config.json has no field for it")
        out = write_common(cfg, family)
        if self.bias == "attention_bias":
            out["attention_bias"] = cfg.o_bias
        if any(cfg.layer_windows):
            if self.windows != "all" or len(set(cfg.layer_windows)) != 1:
                raise ConfigError("to_hf_dict writes sliding windows for mistral (one window) only")
            out["sliding_window"] = cfg.layer_windows[0]
        return out

    def check_config(self, family: Family, cfg: ModelConfig) -> None:
        """What a config read from elsewhere (a GGUF file) must have to be of this family."""
        if self.bias == "qkv" and not cfg.qkv_bias:
            raise ConfigError(f"a {family.name} model without q/k/v biases (param bq, GGUF tensor "
                              f"'blk.0.{family.param('bq').gguf}') is not supported")
        if self.qk_norm and not cfg.qk_norm:
            raise ConfigError(f"missing q/k norms (param q_norm, GGUF tensor 'blk.0.{family.param('q_norm').gguf}'): "
                              f"{family.name} normalises q and k")


def llama_style(name: str, architecture: str, variant: Variant, **fields) -> Family:
    """A Family with the Llama-style params, sites and layer, told apart by `variant`."""
    return Family(name=name, architectures=(architecture,), params=PARAMS, sites=SITES, layer=layer,
                  read_config=variant.read_config, write_config=variant.write_config,
                  check_config=variant.check_config, **fields)


def gguf_config(family: Family, cfg: ModelConfig, key) -> ModelConfig:
    """A `llama` GGUF file's config. llama.cpp's converter writes Llama, Mistral and Mixtral under
    general.architecture=llama, and its loader tells Mixtral apart by the experts alone
    (llama.expert_count > 0: its llama graph then runs the MoE FFN): such a file is a "mixtral"
    config, whose family's own hook reads the experts' keys. The hook decides rather than the GGUF
    loader so that the loader keeps no table of which architecture hides which family; the Mixtral
    family is found in the registry by name, since jaxinfer.models.moe imports this module."""
    if not int(key("expert_count", 0)):
        return cfg
    mixtral = family_lib.get("mixtral")
    return mixtral.gguf_config(mixtral, dataclasses.replace(cfg, model_type=mixtral.name), key)


LLAMA = register(llama_style("llama", "LlamaForCausalLM", Variant("attention_bias"), gguf_architectures=("llama",),
                             gguf_reordered_rope=True, gguf_config=gguf_config))
# llama.cpp writes Mistral models as "llama" (no sliding window in the file): they load as LLAMA.
MISTRAL = register(llama_style("mistral", "MistralForCausalLM", Variant("none", windows="all")))
QWEN2 = register(llama_style("qwen2", "Qwen2ForCausalLM", Variant("qkv", windows="layer_types"),
                             gguf_architectures=("qwen2",)))
QWEN3 = register(llama_style("qwen3", "Qwen3ForCausalLM", Variant("attention_bias", qk_norm=True,
                                                                  windows="layer_types"),
                             gguf_architectures=("qwen3",)))
