"""DeepSeek-V2 / V3 (DeepseekV2ForCausalLM, DeepseekV3ForCausalLM): multi-head latent attention (MLA).

Each token's keys and values come from one latent of kv_lora_rank values (C) and one rotated key of
qk_rope_head_dim values (R) shared by every head; its queries from the hidden state, or from a latent
of q_lora_rank values (V3, V2: q_lora_rank set; V2-Lite: none). Per head the query and key are
qk_nope + qk_rope = head_dim wide, the value v_head_dim (Hv) wide. One layer, x (B, T, D):

  h = norm(x, attn_norm)
  q = h @ wq,  or  norm(h @ wq_a, q_a_norm) @ wq_b                    (B, T, N, head_dim)
  c, k_pe = split(h @ wkv_a, [C, R])                                   the latent and the shared key
  k_nope, v = split(norm(c, kv_a_norm) @ wkv_b, [head_dim - R, Hv])    per head
  q_pe, k_pe = rope(q[..., -R:]), rope(k_pe)    rotated in interleaved pairs (x0, x1), (x2, x3), ...
  x = x + attend([q_nope, q_pe], [k_nope, k_pe], v) @ wo
  h = norm(x, mlp_norm);  x = x + (silu(h @ w_gate) * (h @ w_up)) @ w_down

The pairs are rotated as HF's DeepSeek code rotates them (V2: as complex numbers; V3: de-interleaved,
then rotate_half): here each is de-interleaved (evens, then odds) and rotated half-split, so queries
and keys come out in the same order, and their products are the same sums.
The softmax scale is head_dim ** -0.5, times YaRN's mscale(factor, mscale_all_dim) squared when the
rope scaling sets mscale_all_dim (HF's yarn_apply_mscale): ModelConfig.attention_scale.

This is the expanded form: `attend` sees N query heads and N key / value heads (num_kv_heads =
num_heads), the values zero-padded from Hv to head_dim so that they fit the per-head paged cache
(their extra columns attend to zero), and the padding cut off before wo. Every engine feature that
works on per-head pages (chunked prefill, prefix caching, preemption, int8 / fp8 KV) works on it as
it is; it caches N * 2 * head_dim values per token per layer where the latent form would cache
C + R. The projections down to the latents (wq_a, wkv_a) are `replicated` under tensor parallelism:
each shard's heads read the whole latent.

Not yet: the latent paged cache and the absorbed decode; the MoE layers (DeepSeek's routed and
shared experts, group-limited routing, V3's sigmoid scores): a config whose layers from
first_k_dense_replace on are MoE layers is refused naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer.models import llama
from jaxinfer.models.config import (
    ConfigError,
    ModelConfig,
    hf_field,
    read_common,
    write_common,
    yarn_mscale,
)
from jaxinfer.models.family import ACTIVATIONS, Family, Param, Site, register
from jaxinfer.models.formats import dense_weight
from jaxinfer.models.kv_cache import Latent
from jaxinfer.models.layers import apply_rope


def deinterleave(x: jax.Array) -> jax.Array:
    """(..., R) pairs (x0, x1), (x2, x3), ... -> (..., R) evens then odds: HF's interleaved rotary
    layout as rotate_half's (the order V3's apply_rotary_pos_emb_interleave puts them in)."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def attention(family: Family, cfg: ModelConfig, lp, x, cos, sin, attend, project):
    """MLA in the expanded form: x (B, T, D) -> (its output after wo (B, T, D), attend's state)."""
    B, T, _ = x.shape
    N, H, R, Hv, C = cfg.num_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    norm, eps = family.norm, cfg.rms_norm_eps
    h = norm(x, lp["attn_norm"], eps)  # (B, T, D)
    if cfg.q_lora_rank:
        q = project("wq_b", norm(project("wq_a", h, lp), lp["q_a_norm"], eps), lp)
    else:
        q = project("wq", h, lp)
    q = q.reshape(B, T, N, H)
    latent = project("wkv_a", h, lp)  # (B, T, C + R)
    c = norm(latent[..., :C], lp["kv_a_norm"], eps)  # (B, T, C)
    kv = project("wkv_b", c, lp).reshape(B, T, N, H - R + Hv)
    q_pe = apply_rope(deinterleave(q[..., H - R:]), cos, sin)  # (B, T, N, R)
    k_pe = apply_rope(deinterleave(latent[..., None, C:]), cos, sin)  # (B, T, 1, R): one for every head
    q = jnp.concatenate([q[..., :H - R], q_pe], axis=-1)
    k = jnp.concatenate([kv[..., :H - R], jnp.broadcast_to(k_pe, (B, T, N, R))], axis=-1)
    v = jnp.pad(kv[..., H - R:], ((0, 0), (0, 0), (0, 0), (0, H - Hv)))  # (B, T, N, H): zeros past Hv
    w_kv = dense_weight(lp["wkv_b"], x.dtype).reshape(C, N, H - R + Hv)
    rows = jnp.concatenate([c, k_pe[:, :, 0]], axis=-1)  # (B, T, C + R): a latent cache's row
    o, state = attend(q, k, v, latent=Latent(rows, w_kv[..., :H - R], w_kv[..., H - R:]))  # (B, T, N, H)
    return project("wo", o[..., :Hv].reshape(B, T, N * Hv), lp), state


def layer(family: Family, cfg: ModelConfig, lp, x, cos, sin, attend, project):
    """One decoder layer: MLA, then the dense SwiGLU MLP."""
    a, state = attention(family, cfg, lp, x, cos, sin, attend, project)
    x = x + a
    h = family.norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    mlp = ACTIVATIONS[family.activation](project("w_gate", h, lp)) * project("w_up", h, lp)
    return x + project("w_down", mlp, lp), state


def _q_out(c: ModelConfig) -> int:
    return c.num_heads * c.head_dim


_LLAMA = {p.name: p for p in llama.PARAMS}
_KEPT = ("embed", "attn_norm", "mlp_norm", "w_gate", "w_up", "w_down", "final_norm", "lm_head")
PARAMS = (
    *(dataclasses.replace(_LLAMA[n], gguf=None) for n in _KEPT),
    dataclasses.replace(_LLAMA["wq"], gguf=None, rotary=False, present=lambda c: not c.q_lora_rank),
    Param("wq_a", "replicated", lambda c: (c.hidden_size, c.q_lora_rank), "self_attn.q_a_proj.weight",
          calibration="attn", present=lambda c: c.q_lora_rank > 0),
    Param("q_a_norm", "norm", lambda c: (c.q_lora_rank,), "self_attn.q_a_layernorm.weight",
          present=lambda c: c.q_lora_rank > 0),
    Param("wq_b", "column", lambda c: (c.q_lora_rank, _q_out(c)), "self_attn.q_b_proj.weight",
          calibration="q_latent", heads="query", present=lambda c: c.q_lora_rank > 0),
    Param("wkv_a", "replicated", lambda c: (c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim),
          "self_attn.kv_a_proj_with_mqa.weight", calibration="attn"),
    Param("kv_a_norm", "norm", lambda c: (c.kv_lora_rank,), "self_attn.kv_a_layernorm.weight"),
    Param("wkv_b", "column", lambda c: (c.kv_lora_rank, c.num_heads * (c.head_dim - c.qk_rope_head_dim + c.v_head_dim)),
          "self_attn.kv_b_proj.weight", calibration="kv_latent", heads="query"),
    dataclasses.replace(_LLAMA["wo"], gguf=None, shape=lambda c: (c.num_heads * c.v_head_dim, c.hidden_size)),
    # wq's and wo's biases keep the names' meaning across families; attention_bias is refused
    *(dataclasses.replace(_LLAMA[n], gguf=None, present=lambda c: False) for n in ("bq", "bo")),
)

# The inputs the projections share: 1/s folds into the norm before each (wo's input comes out of
# the attention from wkv_b's value columns, which share their rows with the key columns: no fold).
SITES = (
    Site("attn", lambda c: c.hidden_size, fold="attn_norm"),
    Site("q_latent", lambda c: c.q_lora_rank, fold="q_a_norm"),
    Site("kv_latent", lambda c: c.kv_lora_rank, fold="kv_a_norm"),
    Site("attn_out", lambda c: c.num_heads * c.v_head_dim, fold=None),
    Site("mlp", lambda c: c.hidden_size, fold="mlp_norm"),
    Site("mlp_act", lambda c: c.intermediate_size, fold="w_up"),
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """What tells V2 and V3 apart in config.json (for the parts built so far): V3 may say its
    rotary pairs are not interleaved (rope_interleave), V2's always are."""

    reads_interleave: bool

    def read_config(self, family: Family, hf: dict[str, Any]) -> ModelConfig:
        act = hf.get("hidden_act", family.activation)
        if act != family.activation:
            raise ConfigError(f"hidden_act={act!r} is not supported (only {family.activation!r})")
        for name in ("attention_bias", "mlp_bias"):
            if hf_field(hf, name, bool, False):
                raise ConfigError(f"{name}=True is not supported")
        if self.reads_interleave and not hf_field(hf, "rope_interleave", bool, True):
            raise ConfigError("rope_interleave=False is not supported (the rotary pairs are read interleaved)")
        num_layers = hf_field(hf, "num_hidden_layers", int, minimum=1)
        routed = hf_field(hf, "n_routed_experts", int, 0, minimum=0)
        first_dense = hf_field(hf, "first_k_dense_replace", int, 0, minimum=0)
        if routed and first_dense < num_layers:
            raise ConfigError(f"first_k_dense_replace={first_dense} < num_hidden_layers={num_layers}: DeepSeek's MoE "
                              f"layers (n_routed_experts={routed}) are not supported yet, only dense layers")
        num_heads = hf_field(hf, "num_attention_heads", int, minimum=1)
        if hf_field(hf, "num_key_value_heads", int, num_heads, minimum=1) != num_heads:
            raise ConfigError(f"num_key_value_heads={hf['num_key_value_heads']!r} is not num_attention_heads="
                              f"{num_heads} (MLA expands its latent to every head)")
        nope = hf_field(hf, "qk_nope_head_dim", int, minimum=1)
        rope_dim = hf_field(hf, "qk_rope_head_dim", int, minimum=2)
        common = read_common({**hf, "head_dim": nope + rope_dim})
        rope = common["rope"]
        scale = None
        if rope.type == "yarn" and rope.mscale_all_dim:
            scale = (nope + rope_dim) ** -0.5 * yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
        return ModelConfig(model_type=family.name, **common, attention_scale=scale,
                           kv_lora_rank=hf_field(hf, "kv_lora_rank", int, minimum=1),
                           q_lora_rank=hf_field(hf, "q_lora_rank", int, 0, minimum=0),
                           qk_rope_head_dim=rope_dim, v_head_dim=hf_field(hf, "v_head_dim", int, minimum=1))

    def write_config(self, family: Family, cfg: ModelConfig) -> dict[str, Any]:
        for name in ("embedding_scale", "logit_softcap", "attn_softcap"):
            if getattr(cfg, name) is not None:
                raise ConfigError(f"{name}={getattr(cfg, name)!r}: {family.name}'s config.json has no field for it")
        out = write_common(cfg, family)
        out.update(head_dim=cfg.qk_rope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                   qk_nope_head_dim=cfg.head_dim - cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                   kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank or None, attention_bias=False,
                   first_k_dense_replace=cfg.num_layers, n_routed_experts=None, n_shared_experts=None)
        if self.reads_interleave:
            out["rope_interleave"] = True
        return out

    def check_config(self, family: Family, cfg: ModelConfig) -> None:
        if not cfg.kv_lora_rank or cfg.num_kv_heads != cfg.num_heads:
            raise ConfigError(f"a {family.name} config needs kv_lora_rank > 0 and num_kv_heads = num_heads")


def _family(name: str, architecture: str, variant: Variant) -> Family:
    return Family(name=name, architectures=(architecture,), params=PARAMS, sites=SITES, layer=layer,
                  read_config=variant.read_config, write_config=variant.write_config,
                  check_config=variant.check_config)


DEEPSEEK_V2 = register(_family("deepseek_v2", "DeepseekV2ForCausalLM", Variant(reads_interleave=False)))
DEEPSEEK_V3 = register(_family("deepseek_v3", "DeepseekV3ForCausalLM", Variant(reads_interleave=True)))
