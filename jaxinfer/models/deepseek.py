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

The layer is written in the expanded form: `attend` sees N query heads and N key / value heads
(num_kv_heads = num_heads), the values zero-padded from Hv to head_dim (their extra columns attend
to zero; the padding is cut off before wo); that is what a pass without a cache and a contiguous
cache run. It also hands `attend` the layer's `Latent` (jaxinfer.models.kv_cache): each token's
cache row [norm(c), rope(k_pe)] and wkv_b split per head into w_uk and w_uv (dense_weight: a packed
wkv_b dequantised). The engine's paged cache for MLA is a latent cache (C + R values per token and
layer, against N x 2 x head_dim expanded), and attention over it runs in the absorbed or the expanded
form per phase (jaxinfer.models.latent_attention, EngineConfig.mla_decode / mla_prefill). The projections
down to the latents (wq_a, wkv_a) are `replicated` under tensor parallelism: each shard's heads read
the whole latent, and the latent cache is whole on every shard.

The MLP: the first first_k_dense_replace layers a dense SwiGLU, the others DeepSeek's experts
(jaxinfer.models.moe's grouped matmuls, routed by `route`) plus shared experts (a SwiGLU every token
goes through, no gate). Their params are stacked over the layers that have them (Param.layers), so
the layers run unrolled (decoder.unstack_layers). Not built: GGUF files of these families, AWQ / GPTQ
checkpoints of them, and V3's multi-token-prediction layer (HF's model does not run it either).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer.models import llama, moe
from jaxinfer.models.config import (
    ConfigError,
    ModelConfig,
    first_field,
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


def route(cfg: ModelConfig, lp, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (N, D) -> (weights (N, k), experts (N, k) int32), as HF's DeepSeek routers choose: scores
    softmax (V2) or sigmoid (V3) of x @ router in float32; the choice by the scores (plus V3's
    correction) among the topk_groups best of expert_groups groups (a group's score: its best
    expert's, V2; its best two's sum, V3); the weights the chosen experts' scores, renormalised over
    the k when norm_topk_prob (V3), times routed_scaling."""
    logits = jnp.dot(x, lp["router"], preferred_element_type=jnp.float32)  # (N, E)
    scores = jax.nn.softmax(logits, axis=-1) if cfg.router_scoring == "softmax" else jax.nn.sigmoid(logits)
    choice = scores + lp["router_correction"].astype(jnp.float32) if "router_correction" in lp else scores
    G, E = cfg.expert_groups, cfg.num_experts
    if G > 1:
        grouped = choice.reshape(-1, G, E // G)
        group_score = (jax.lax.top_k(grouped, 2)[0].sum(-1) if cfg.router_scoring == "sigmoid"
                       else jnp.max(grouped, axis=-1))  # (N, G)
        best = jax.lax.top_k(group_score, cfg.topk_groups)[1]  # (N, topk_groups)
        kept = jnp.any(best[:, :, None] == jnp.arange(G)[None, None, :], axis=1)  # (N, G)
        choice = jnp.where(jnp.repeat(kept, E // G, axis=-1), choice, -jnp.inf)
    experts = jax.lax.top_k(choice, cfg.experts_per_token)[1]  # (N, k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return (weights * cfg.routed_scaling).astype(x.dtype), experts.astype(jnp.int32)


def layer(family: Family, cfg: ModelConfig, lp, x, cos, sin, attend, project):
    """One decoder layer: MLA, then a dense SwiGLU MLP (the first first_k_dense layers) or the
    routed experts (jaxinfer.models.moe, routed by `route`) plus the shared experts."""
    a, state = attention(family, cfg, lp, x, cos, sin, attend, project)
    x = x + a
    h = family.norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    act = ACTIVATIONS[family.activation]
    if "router" not in lp:
        return x + project("w_down", act(project("w_gate", h, lp)) * project("w_up", h, lp), lp), state
    out = moe.moe(family, cfg, lp, h, project, router=route)
    if cfg.shared_expert_size:
        out = out + project("shared_down", act(project("shared_gate", h, lp)) * project("shared_up", h, lp), lp)
    return x + out, state


def _q_out(c: ModelConfig) -> int:
    return c.num_heads * c.head_dim


def _dense_layers(c: ModelConfig) -> range:
    return range(c.first_k_dense if c.num_experts else c.num_layers)


def _expert_layers(c: ModelConfig) -> range:
    return range(c.first_k_dense, c.num_layers)


def _experts(c: ModelConfig) -> bool:
    return c.num_experts > 0


_LLAMA = {p.name: p for p in llama.PARAMS}
_MOE = {p.name: p for p in (*moe.router_and_experts("mlp", "gate_proj", "up_proj", "down_proj"), *moe.SHARED_PARAMS)}
_KEPT = ("embed", "attn_norm", "mlp_norm", "final_norm", "lm_head")
_EXPERT = lambda name, hf, shape: dataclasses.replace(  # noqa: E731
    _MOE[name], hf=f"mlp.experts.{{expert}}.{hf}.weight", gguf=None, shape=shape, present=_experts, layers=_expert_layers)
_SHARED = lambda name, hf, shape: dataclasses.replace(  # noqa: E731
    _MOE[name], hf=f"mlp.shared_experts.{hf}.weight", gguf=None, shape=shape, calibration="moe_in",
    present=lambda c: c.shared_expert_size > 0, layers=_expert_layers)
PARAMS = (
    *(dataclasses.replace(_LLAMA[n], gguf=None) for n in _KEPT),
    *(dataclasses.replace(_LLAMA[n], gguf=None, present=lambda c: bool(_dense_layers(c)), layers=_dense_layers)
      for n in ("w_gate", "w_up", "w_down")),
    dataclasses.replace(_MOE["router"], hf="mlp.gate.weight", gguf=None, present=_experts, layers=_expert_layers),
    Param("router_correction", "bias", lambda c: (c.num_experts,), "mlp.gate.e_score_correction_bias",
          present=lambda c: _experts(c) and c.router_scoring == "sigmoid", layers=_expert_layers),
    _EXPERT("experts_gate", "gate_proj", lambda c: (c.num_experts, c.hidden_size, c.expert_size)),
    _EXPERT("experts_up", "up_proj", lambda c: (c.num_experts, c.hidden_size, c.expert_size)),
    _EXPERT("experts_down", "down_proj", lambda c: (c.num_experts, c.expert_size, c.hidden_size)),
    _SHARED("shared_gate", "gate_proj", lambda c: (c.hidden_size, c.shared_expert_size)),
    _SHARED("shared_up", "up_proj", lambda c: (c.hidden_size, c.shared_expert_size)),
    _SHARED("shared_down", "down_proj", lambda c: (c.shared_expert_size, c.hidden_size)),
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
          "self_attn.kv_b_proj.weight", calibration="kv_latent", heads="query", adaptable=False),
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
    # the shared experts' input, which the router and routed experts read too (moe.SHARED_SITES)
    Site("moe_in", lambda c: c.hidden_size, fold=None),
    Site("shared_act", lambda c: c.shared_expert_size, fold="shared_up"),
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """What tells V2 and V3 apart in config.json: V3 may say its rotary pairs are not interleaved
    (rope_interleave; V2's always are); V2 routes by softmax scores, greedily or among the best
    groups by their best expert (topk_method "greedy" / "group_limited_greedy"), V3 by sigmoid scores
    with a learned correction, among the best groups by their best two ("noaux_tc", whatever the
    field says: HF's DeepseekV3TopkRouter reads no topk_method)."""

    reads_interleave: bool
    topk_methods: tuple[str, ...]
    defaults: dict  # HF's config class defaults for the MoE fields

    def read_config(self, family: Family, hf: dict[str, Any]) -> ModelConfig:
        act = hf.get("hidden_act", family.activation)
        if act != family.activation:
            raise ConfigError(f"hidden_act={act!r} is not supported (only {family.activation!r})")
        for name in ("attention_bias", "mlp_bias"):
            if hf_field(hf, name, bool, False):
                raise ConfigError(f"{name}=True is not supported")
        if self.reads_interleave and not hf_field(hf, "rope_interleave", bool, True):
            raise ConfigError("rope_interleave=False is not supported (the rotary pairs are read interleaved)")
        experts = self._experts(hf)
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
                           qk_rope_head_dim=rope_dim, v_head_dim=hf_field(hf, "v_head_dim", int, minimum=1), **experts)

    def _experts(self, hf: dict[str, Any]) -> dict[str, Any]:
        """The MoE fields of a config.json (HF's defaults for V2 / V3 where a field is absent): none when
        first_k_dense_replace covers every layer. ConfigError naming a field these layers cannot run."""
        d = self.defaults
        num_layers = hf_field(hf, "num_hidden_layers", int, minimum=1)
        routed = hf_field(hf, first_field(hf, "n_routed_experts", "num_local_experts", "num_experts"), int,
                          d["n_routed_experts"], minimum=1)
        first_dense = hf_field(hf, "first_k_dense_replace", int, d["first_k_dense_replace"], minimum=0)
        if first_dense >= num_layers:
            return {}
        if hf_field(hf, "moe_layer_freq", int, 1, minimum=1) != 1:
            raise ConfigError(f"moe_layer_freq={hf['moe_layer_freq']!r} is not supported (experts in every layer "
                              "from first_k_dense_replace on)")
        size = hf_field(hf, "moe_intermediate_size", int, d["moe_intermediate_size"], minimum=1)
        method = d["topk_method"] if len(self.topk_methods) == 1 else hf.get("topk_method") or d["topk_method"]
        if method not in self.topk_methods:
            raise ConfigError(f"topk_method={method!r} is not supported (supported: {', '.join(self.topk_methods)})")
        grouped = method != "greedy"
        return dict(num_experts=routed, first_k_dense=first_dense, expert_size=size,
                    experts_per_token=hf_field(hf, "num_experts_per_tok", int, d["num_experts_per_tok"], minimum=1),
                    shared_expert_size=size * hf_field(hf, "n_shared_experts", int, d["n_shared_experts"], minimum=1),
                    router_scoring="sigmoid" if method == "noaux_tc" else "softmax",
                    expert_groups=hf_field(hf, "n_group", int, 1, minimum=1) if grouped else 1,
                    topk_groups=hf_field(hf, "topk_group", int, 1, minimum=1) if grouped else 1,
                    routed_scaling=hf_field(hf, "routed_scaling_factor", float, d["routed_scaling_factor"], minimum=0.0),
                    # V2's routers take the scores as they are (HF's DeepseekV2TopkRouter reads no norm_topk_prob)
                    norm_topk_prob=method == "noaux_tc" and hf_field(hf, "norm_topk_prob", bool, True))

    def write_config(self, family: Family, cfg: ModelConfig) -> dict[str, Any]:
        for name in ("embedding_scale", "logit_softcap", "attn_softcap"):
            if getattr(cfg, name) is not None:
                raise ConfigError(f"{name}={getattr(cfg, name)!r}: {family.name}'s config.json has no field for it")
        out = write_common(cfg, family)
        out.update(head_dim=cfg.qk_rope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                   qk_nope_head_dim=cfg.head_dim - cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                   kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank or None, attention_bias=False)
        if not cfg.num_experts:
            out.update(first_k_dense_replace=cfg.num_layers)
        else:
            method = ("noaux_tc" if cfg.router_scoring == "sigmoid" else
                      "group_limited_greedy" if cfg.expert_groups > 1 else "greedy")
            out.update(first_k_dense_replace=cfg.first_k_dense, n_routed_experts=cfg.num_experts,
                       moe_intermediate_size=cfg.expert_size, num_experts_per_tok=cfg.experts_per_token,
                       n_shared_experts=cfg.shared_expert_size // cfg.expert_size, topk_method=method,
                       n_group=cfg.expert_groups, topk_group=cfg.topk_groups,
                       routed_scaling_factor=cfg.routed_scaling, norm_topk_prob=cfg.norm_topk_prob)
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


_V2_DEFAULTS = dict(n_routed_experts=64, first_k_dense_replace=0, moe_intermediate_size=1407, topk_method="greedy",
                    num_experts_per_tok=None, n_shared_experts=2, routed_scaling_factor=1.0)
_V3_DEFAULTS = dict(n_routed_experts=256, first_k_dense_replace=3, moe_intermediate_size=2048, topk_method="noaux_tc",
                    num_experts_per_tok=8, n_shared_experts=1, routed_scaling_factor=2.5)
DEEPSEEK_V2 = register(_family("deepseek_v2", "DeepseekV2ForCausalLM", Variant(
    reads_interleave=False, topk_methods=("greedy", "group_limited_greedy"), defaults=_V2_DEFAULTS)))
DEEPSEEK_V3 = register(_family("deepseek_v3", "DeepseekV3ForCausalLM", Variant(
    reads_interleave=True, topk_methods=("noaux_tc",), defaults=_V3_DEFAULTS)))
