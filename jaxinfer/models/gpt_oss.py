"""gpt-oss (GptOssForCausalLM): a mixture of experts with attention sinks.

The layer is the MoE families' (jaxinfer.models.moe: Llama-style attention, then top-k experts),
with what gpt-oss adds, all of it data on the family seam:
  - attention sinks: a learned logit per query head and layer (param `sinks`, ModelConfig.attn_sinks)
    that joins every softmax as one more column with no value, in the XLA path and both Pallas
    kernels (their `sinks=`);
  - sliding-window (128) and full layers alternating (layer_types), q/k/v and o biased;
  - YaRN RoPE (RopeConfig type "yarn": its frequencies and the attention factor on cos / sin);
  - the router biased, each token's top-k logits softmaxed (ModelConfig.norm_topk_prob: the same
    weights as a softmax over all experts renormalised over the k);
  - experts with biases, and the clamped SwiGLU (ModelConfig.swiglu_limit / swiglu_alpha):
    (clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
HF stores the experts stacked, (in, out) as the params are: `mlp.experts.gate_up_proj` (E, D, 2F)
with gate and up interleaved column by column, `down_proj` (E, F, D), and their biases; the loaders
split the interleaved columns (Param.hf_part) and do not transpose (Param.hf_in_out). The
published checkpoints store the experts in MXFP4 (`*_blocks` / `*_scales`): they load packed
(jaxinfer.checkpoints.mxfp4) and are dequantised inside the grouped matmul's program.

GGUF files (general.architecture=gpt-oss): llama.cpp's converter splits gate_up_proj into
ffn_gate_exps / ffn_up_exps (and their biases), each (E, out, in), which load by the same params'
GGUF names (jaxinfer.checkpoints.gguf: a fused HF tensor whose params have GGUF names of their own);
MXFP4 experts stay packed as MXFP4Weight (ggml's blocks with their nibbles reordered); `gguf_config`
says what llama.cpp reads and what it fixes (the window pattern, the SwiGLU clamp).

Not yet: a Pallas kernel that reads MXFP4 tiles directly (the Pallas grouped matmul
takes them dequantised in the same program).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxinfer.models import moe
from jaxinfer.models.config import (
    ConfigError,
    ModelConfig,
    first_field,
    hf_field,
    read_common,
    windows_from_layer_types,
    write_common,
)
from jaxinfer.models.family import Family, Param, register

_EXPERTS = "mlp.experts."


def _part(axis: int, which: int):
    """hf_part of gate (0) or up (1) in gate_up_proj (E, D, 2F) or its bias (E, 2F): every other column."""
    return lambda c: (axis, which, 2 * c.intermediate_size, 2)


def _expert_shape(fan_in, fan_out):
    return lambda c: (c.num_experts, fan_in(c), fan_out(c))


def _d(c: ModelConfig) -> int:
    return c.hidden_size


def _f(c: ModelConfig) -> int:
    return c.intermediate_size


def _expert_bias(size):
    return lambda c: (c.num_experts, size(c))


# llama.cpp names the norm before the MLP post_attention_norm here (gguf's GPT_OSS tensor map).
PARAMS = tuple(dataclasses.replace(p, gguf="post_attention_norm.weight") if p.name == "mlp_norm" else p
               for p in moe._ATTENTION) + (
    Param("sinks", "sink", lambda c: (c.num_heads,), "self_attn.sinks", "attn_sinks.weight",
          present=lambda c: c.attn_sinks),
    Param("router", "router", lambda c: (c.hidden_size, c.num_experts), "mlp.router.weight", "ffn_gate_inp.weight"),
    Param("router_bias", "bias", lambda c: (c.num_experts,), "mlp.router.bias", "ffn_gate_inp.bias"),
    Param("experts_gate", "expert_column", _expert_shape(_d, _f), _EXPERTS + "gate_up_proj", "ffn_gate_exps.weight",
          hf_part=_part(2, 0), hf_in_out=True),
    Param("experts_up", "expert_column", _expert_shape(_d, _f), _EXPERTS + "gate_up_proj", "ffn_up_exps.weight",
          hf_part=_part(2, 1), hf_in_out=True),
    Param("experts_down", "expert_row", _expert_shape(_f, _d), _EXPERTS + "down_proj", "ffn_down_exps.weight",
          hf_in_out=True),
    Param("experts_gate_bias", "expert_bias", _expert_bias(_f), _EXPERTS + "gate_up_proj_bias", "ffn_gate_exps.bias",
          hf_part=_part(1, 0)),
    Param("experts_up_bias", "expert_bias", _expert_bias(_f), _EXPERTS + "gate_up_proj_bias", "ffn_up_exps.bias",
          hf_part=_part(1, 1)),
    Param("experts_down_bias", "expert_bias", _expert_bias(_d), _EXPERTS + "down_proj_bias", "ffn_down_exps.bias"),
)


def read_config(family: Family, hf: dict[str, Any]) -> ModelConfig:
    if not hf_field(hf, "attention_bias", bool, True):
        raise ConfigError("gpt_oss with attention_bias=False is not supported")
    common = read_common(hf)
    layer_types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                            for i in range(common["num_layers"])]
    experts = first_field(hf, "num_local_experts", "num_experts")
    top_k = first_field(hf, "num_experts_per_tok", "experts_per_token")  # published files write both
    return ModelConfig(
        model_type=family.name, **common, qkv_bias=True, o_bias=True, attn_sinks=True,
        layer_windows=windows_from_layer_types(hf, layer_types, common["num_layers"]),
        num_experts=hf_field(hf, experts, int, minimum=1), experts_per_token=hf_field(hf, top_k, int, minimum=1),
        norm_topk_prob=True, swiglu_limit=hf_field(hf, "swiglu_limit", float, 7.0, minimum=0.0),
        swiglu_alpha=hf_field(hf, "swiglu_alpha", float, 1.702))


def write_config(family: Family, cfg: ModelConfig) -> dict[str, Any]:
    out = write_common(cfg, family)
    windows = set(cfg.layer_windows) - {0}
    if len(windows) > 1:
        raise ConfigError(f"gpt_oss has one sliding_window, the config has {sorted(windows)}")
    out.update(attention_bias=True, num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
               swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha,
               sliding_window=windows.pop() if windows else None,
               layer_types=["sliding_attention" if w else "full_attention" for w in cfg.layer_windows])
    return out


def check_config(family: Family, cfg: ModelConfig) -> None:
    missing = [name for name in ("num_experts", "attn_sinks", "swiglu_limit", "qkv_bias", "o_bias", "norm_topk_prob")
               if not getattr(cfg, name)]
    if missing:
        raise ConfigError(f"a gpt_oss config needs {', '.join(missing)}")


# What llama.cpp fixes for gpt-oss rather than reading it (src/models/openai-moe-iswa.cpp and its
# hparams): one sliding-window layer in 2, the first (set_swa_pattern(2)), and the clamped SwiGLU's
# alpha and limit (ggml_swiglu_oai(..., 1.702f, 7.0f)).
GGUF_SWIGLU = dict(swiglu_alpha=1.702, swiglu_limit=7.0)


def gguf_config(family: Family, cfg: ModelConfig, key) -> ModelConfig:
    """A gpt-oss GGUF file's config, as llama.cpp reads it: the experts' counts (required, > 0) and
    size (expert_feed_forward_length, required), the window (attention.sliding_window, required) on
    the even layers, every projection biased and attention sinks (llama.cpp requires their
    tensors), a softmax over each token's top-k router logits (norm_topk_prob), and llama.cpp's
    fixed SwiGLU clamp (GGUF_SWIGLU: a model trained with another swiglu_limit runs with 7 there,
    and here). YaRN comes from the shared rope.scaling keys (jaxinfer.checkpoints.gguf.yarn_rope)."""
    del family
    experts, used = (int(key(name)) for name in ("expert_count", "expert_used_count"))
    if experts < 1 or used < 1:
        raise ConfigError(f"expert_count={experts}, expert_used_count={used}: gpt_oss needs both > 0")
    window = int(key("attention.sliding_window"))
    return dataclasses.replace(
        cfg, intermediate_size=int(key("expert_feed_forward_length")), num_experts=experts, experts_per_token=used,
        layer_windows=tuple(window if i % 2 == 0 else 0 for i in range(cfg.num_layers)), attn_sinks=True,
        norm_topk_prob=True, **GGUF_SWIGLU)


GPT_OSS = register(Family(name="gpt_oss", architectures=("GptOssForCausalLM",), params=PARAMS, sites=moe.SITES,
                          layer=moe.layer, read_config=read_config, write_config=write_config,
                          check_config=check_config, gguf_architectures=("gpt-oss",), gguf_config=gguf_config))
