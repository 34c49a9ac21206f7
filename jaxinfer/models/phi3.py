"""Phi-3 (Phi3ForCausalLM): the Llama-style layer and parameters, stored as HF stores them, fused.

HF's Phi-3 holds q, k and v in one tensor (`self_attn.qkv_proj`, rows q then k then v) and the
MLP's gate and up in another (`mlp.gate_up_proj`, gate rows then up rows). The family names each
param's rows of the fused tensor (Param.hf_part): the loaders split them into the Llama-style
projections (wq, wk, wv, w_gate, w_up), and the writers stack them back, so everything past the
loader (the layer, sharding, quantisation, LoRA on the split projections) is the Llama-style
family's. A config.json asking for what the layer does not compute is refused naming the field:
LongRoPE / "su" scaling (rope_type), a partial rotary dimension (partial_rotary_factor, Phi-3.5 /
Phi-4-mini). `sliding_window` applies to every layer (as HF's Phi-3 attention applies it).
AWQ / GPTQ checkpoints and PEFT adapters of the fused projections are not read yet.
GGUF files (general.architecture=phi3): llama.cpp's converter writes the fused tensors as they are
(`attn_qkv`, and `ffn_up` holding gate then up, which llama.cpp's SwiGLU splits the same way), so
the GGUF names split by the same hf_part rows; the sliding window is off there (gguf_config).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxinfer.models import llama
from jaxinfer.models.config import ConfigError, ModelConfig, hf_field
from jaxinfer.models.family import Family, register


def _q(c: ModelConfig) -> int:
    return c.num_heads * c.head_dim


def _kv(c: ModelConfig) -> int:
    return c.num_kv_heads * c.head_dim


# param -> (the fused HF tensor it lives in, llama.cpp's name for the same tensor, its rows of it)
FUSED = {
    "wq": ("self_attn.qkv_proj.weight", "attn_qkv.weight", lambda c: (0, _q(c))),
    "wk": ("self_attn.qkv_proj.weight", "attn_qkv.weight", lambda c: (_q(c), _q(c) + _kv(c))),
    "wv": ("self_attn.qkv_proj.weight", "attn_qkv.weight", lambda c: (_q(c) + _kv(c), _q(c) + 2 * _kv(c))),
    "w_gate": ("mlp.gate_up_proj.weight", "ffn_up.weight", lambda c: (0, c.intermediate_size)),
    "w_up": ("mlp.gate_up_proj.weight", "ffn_up.weight", lambda c: (c.intermediate_size, 2 * c.intermediate_size)),
}

PARAMS = tuple(
    dataclasses.replace(p, hf=FUSED[p.name][0], gguf=FUSED[p.name][1],
                        hf_part=lambda c, rows=FUSED[p.name][2]: (0, *rows(c), 1))
    if p.name in FUSED else p for p in llama.PARAMS)

_VARIANT = llama.Variant("none", windows="all")


def read_config(family: Family, hf: dict[str, Any]) -> ModelConfig:
    rope = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if hf_field({"partial_rotary_factor": factor}, "partial_rotary_factor", float) != 1.0:
        raise ConfigError(f"partial_rotary_factor={factor!r} is not supported (rotary over the whole head only)")
    return _VARIANT.read_config(family, hf)


def gguf_config(family: Family, cfg: ModelConfig, key) -> ModelConfig:
    """A phi3 GGUF file's config: the shared keys, and no sliding window. llama.cpp reads
    `phi3.attention.sliding_window` and then turns the window off for every layer ("Phi SWA is
    currently disabled", llama.cpp PR 13676), and HF transformers' GGUF loader does not read it: both
    attend over the whole context, so the file loads that way (HF's Phi-3 on the original
    config.json windows every layer: the two differ on prompts longer than the window)."""
    del family, key
    return dataclasses.replace(cfg, layer_windows=(0,) * cfg.num_layers)


PHI3 = register(Family(name="phi3", architectures=("Phi3ForCausalLM",), params=PARAMS, sites=llama.SITES,
                       layer=llama.layer, read_config=read_config, write_config=_VARIANT.write_config,
                       check_config=_VARIANT.check_config, gguf_architectures=("phi3",), gguf_config=gguf_config))
