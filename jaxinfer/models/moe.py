"""Mixture-of-experts families: Mixtral, Qwen2-MoE and Qwen3-MoE.

The attention half of each layer is the Llama-style one (jaxinfer.models.llama.attention);
the MLP is replaced by E experts, each a SwiGLU of its own, and a router:

  h = norm(x, mlp_norm)                         (N tokens, D)
  p = softmax(h @ router)  in float32           (N, E)
  top-k experts per token, their p renormalised over the k when norm_topk_prob (Mixtral always)
  x = x + sum over the token's k experts e of  p_e * down_e(act(gate_e(h)) * up_e(h))

No token is dropped (no capacity factor): every (token, expert) pair is computed. The pairs are
sorted by expert and each projection is one grouped matmul over the E groups, through the
layer's projection hook with the group sizes (decoder.Project: `jax.lax.ragged_dot` on the XLA
path, `pallas_kernels.grouped_matmul` under matmul="pallas"), then the outputs are weighted and
summed back per token.
`reference_moe` is the same layer as a dense loop over experts (every token through every
expert, masked), the definition the grouped path is checked against.

The expert weights are per-expert params (family roles expert_column / expert_row: stacked
(L, E, in, out), split over tp on their F axis like the dense MLP's, and over ep on E); the router
is replicated. Neither is a projection: LoRA and the projections' AWQ / SmoothQuant folds apply to
the attention projections only, and these families have no MLP calibration sites. The experts are
quantised when asked (QuantScheme(experts=True): one QuantizedWeight (L, E, K, N) per expert
weight): by RTN, or by AWQ / GPTQ on each expert's own routed calibration rows (jaxinfer.quant;
AWQ's shared scale for the experts' input folds into mlp_norm and every reader of it). The grouped
matmul dequantises them in its program on the XLA path, tile by tile inside the Pallas grouped
kernel under matmul="pallas". Qwen2-MoE adds a shared expert beside them (every token, gated by
sigmoid(h @ shared_expert_gate)): its projections are ordinary projections, quantised and
adaptable, on an input site with no fold of their own (the router and experts read it too: only
the experts' AWQ scale, which scales every reader, folds there). Not yet: a layer mix of dense and
sparse MLPs in these families (decoder_sparse_step / mlp_only_layers; DeepSeek's dense
first layers are in jaxinfer.models.deepseek, on Param.layers).
GGUF files: qwen3moe and qwen2moe, and Mixtral, which llama.cpp writes as general.architecture=llama
with experts (the llama family's gguf_config hands such a file to this one; its wq / wk rows carry
llama's rotary reordering). Variant.gguf_config reads the expert keys; a layer's experts are one
stacked tensor there, kept packed when Q8_0 / Q4_0 / Q4_1 (jaxinfer.checkpoints.gguf).
Expert parallelism: under a mesh with an "ep" axis the experts run per ep shard (`moe`).
gpt-oss (jaxinfer.models.gpt_oss) reuses this layer with biases, a biased router and a clamped SwiGLU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxinfer.models import llama
from jaxinfer.models.config import ConfigError, ModelConfig, first_field, hf_field
from jaxinfer.models.family import (
    ACTIVATIONS,
    Family,
    Param,
    Site,
    has_expert_axis,
    register,
)
from jaxinfer.models.mesh import ep_mesh, per_ep_shard

Params = dict[str, Any]


def route(cfg: ModelConfig, router: jax.Array, h: jax.Array, bias: jax.Array | None = None,
          ) -> tuple[jax.Array, jax.Array]:
    """h (N, D) -> (weights (N, k) in h's dtype, experts (N, k) int32): each token's top-k experts
    by softmax probability (float32) of h @ router (+ bias), renormalised over the k when
    cfg.norm_topk_prob (the same as a softmax over the k logits alone: gpt-oss)."""
    logits = jnp.dot(h, router, preferred_element_type=jnp.float32)  # (N, E)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(h.dtype), experts.astype(jnp.int32)


def glu(family: Family, cfg: ModelConfig, gate: jax.Array, up: jax.Array) -> jax.Array:
    """An expert's gated unit: act(gate) * up, or gpt-oss's clamped SwiGLU (cfg.swiglu_limit)."""
    if cfg.swiglu_limit is None:
        return ACTIVATIONS[family.activation](gate) * up
    limit = cfg.swiglu_limit
    gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha))


EXPERT_BIASES = ("experts_gate_bias", "experts_up_bias", "experts_down_bias")  # gpt-oss's


def _biased(lp: Params, name: str, y: jax.Array, experts: jax.Array) -> jax.Array:
    """y (rows, out) plus the bias of each row's expert (experts (rows,)), where the layer has one."""
    return y if name not in lp else y + lp[name][experts].astype(y.dtype)


def _expert_sum(family: Family, cfg: ModelConfig, lp: Params, x: jax.Array, weights: jax.Array,
                experts: jax.Array, project, local: tuple[jax.Array, int] | None = None) -> jax.Array:
    """(N, D) float32: each token's routed experts' outputs (x (N, D), weights / experts (N, k)),
    weighted and summed. local = (first, count): only the pairs routed to experts first .. first +
    count - 1, whose weights lp holds as experts 0 .. count - 1 (one ep shard's); the other pairs
    are sorted after every group and contribute 0."""
    k, E = cfg.experts_per_token, cfg.num_experts
    flat = experts.reshape(-1)  # (N k,)
    if local is not None:
        first, E = local
        flat = flat - first
        mine = (flat >= 0) & (flat < E)
        flat = jnp.where(mine, flat, E)  # another shard's pair: after every group
    order = jnp.argsort(flat, stable=True)  # pairs grouped by expert
    token = order // k  # (N k,) the token of each sorted pair
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # (E,) pairs per expert
    xs = x[token]  # (N k, D)
    pair_expert = flat[order] if any(n in lp for n in EXPERT_BIASES) else None  # (N k,) each sorted pair's expert
    gate = _biased(lp, "experts_gate_bias", project("experts_gate", xs, lp, group_sizes=sizes), pair_expert)  # (N k, F)
    up = _biased(lp, "experts_up_bias", project("experts_up", xs, lp, group_sizes=sizes), pair_expert)
    y = project("experts_down", glu(family, cfg, gate, up), lp, group_sizes=sizes)
    y = _biased(lp, "experts_down_bias", y, pair_expert).astype(jnp.float32)  # (N k, D)
    if local is not None:  # rows past the groups are not products of this shard's experts: dropped
        y = jnp.where(mine[order][:, None], y, 0.0)
    y = y * weights.reshape(-1)[order][:, None].astype(jnp.float32)
    return jnp.zeros(x.shape, jnp.float32).at[token].add(y)


def default_router(cfg: ModelConfig, lp: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The families here: `route` by lp's router (and router bias)."""
    return route(cfg, lp["router"], x, lp.get("router_bias"))


def moe(family: Family, cfg: ModelConfig, lp: Params, h: jax.Array, project, router=default_router) -> jax.Array:
    """The experts' output (..., D) for normed inputs h (..., D): grouped matmuls over the
    (token, expert) pairs sorted by expert, through `project` with the group sizes (decoder.Project:
    jax.lax.ragged_dot, or the Pallas grouped matmul under matmul="pallas"); the experts' biases
    (gpt-oss), by each pair's expert, after.
    Under an ep mesh (jaxinfer.sharding: the experts split on E over "ep") the same runs per ep
    shard on every token, over the pairs routed to the shard's experts, and a psum over "ep" adds
    the shards' outputs (the tokens are replicated: no dispatch). `router(cfg, lp, x)` -> (weights,
    experts) (N, k) chooses each token's experts (another family's rule: DeepSeek's)."""
    shape, D = h.shape, h.shape[-1]
    x = h.reshape(-1, D)  # (N, D)
    weights, experts = router(cfg, lp, x)  # (N, k)
    if ep_mesh() is None:
        out = _expert_sum(family, cfg, lp, x, weights, experts, project)
    else:
        split = {n: w for n, w in lp.items() if has_expert_axis(n)}  # (E, ...) each, split over "ep"

        def shard(x, weights, experts, split):
            count = cfg.num_experts // jax.lax.axis_size("ep")
            local = (jax.lax.axis_index("ep") * count, count)
            out = _expert_sum(family, cfg, split, x, weights, experts, project, local)
            return jax.lax.psum(out, "ep")

        out = per_ep_shard(shard, (P(), P(), P(), P("ep")), P())(x, weights, experts, split)
    return out.astype(h.dtype).reshape(shape)


def reference_moe(family: Family, cfg: ModelConfig, lp: Params, h: jax.Array, router=default_router) -> jax.Array:
    """`moe` as a dense loop over experts: every token through every expert, each output weighted
    by the token's routing weight for that expert (0 when it was not chosen)."""
    shape, D = h.shape, h.shape[-1]
    x = h.reshape(-1, D)
    weights, experts = router(cfg, lp, x)
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(cfg.num_experts):
        w = jnp.sum(jnp.where(experts == e, weights, 0), axis=-1).astype(jnp.float32)  # (N,)
        b = {name: lp[name][e] if name in lp else 0 for name in EXPERT_BIASES}
        gate, up = x @ lp["experts_gate"][e] + b["experts_gate_bias"], x @ lp["experts_up"][e] + b["experts_up_bias"]
        y = glu(family, cfg, gate, up) @ lp["experts_down"][e] + b["experts_down_bias"]
        out = out + w[:, None] * y.astype(jnp.float32)
    return out.astype(h.dtype).reshape(shape)


def shared_expert(family: Family, cfg: ModelConfig, lp: Params, h: jax.Array, project) -> jax.Array:
    """Qwen2-MoE's shared expert: every token through one more SwiGLU, scaled by
    sigmoid(h @ shared_expert_gate)."""
    act = ACTIVATIONS[family.activation]
    y = project("shared_down", act(project("shared_gate", h, lp)) * project("shared_up", h, lp), lp)
    gate = jax.nn.sigmoid(jnp.dot(h, lp["shared_expert_gate"], preferred_element_type=jnp.float32))  # (..., 1)
    return (gate * y.astype(jnp.float32)).astype(h.dtype)


def layer(family: Family, cfg: ModelConfig, lp, x, cos, sin, attend, project):
    """One MoE decoder layer: Llama-style attention, then the experts (and the shared expert)."""
    a, state = llama.attention(family, cfg, lp, x, cos, sin, attend, project)
    x = x + a
    h = family.norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    out = moe(family, cfg, lp, h, project)
    if cfg.shared_expert_size:
        out = out + shared_expert(family, cfg, lp, h, project)
    return x + out, state


def router_and_experts(prefix: str, gate: str, up: str, down: str) -> tuple[Param, ...]:
    """The router and the per-expert weights under an HF MoE block's names (and llama.cpp's: one
    tensor per layer holds all its experts)."""
    return (
        Param("router", "router", lambda c: (c.hidden_size, c.num_experts), f"{prefix}.gate.weight",
              "ffn_gate_inp.weight"),
        Param("experts_gate", "expert_column", lambda c: (c.num_experts, c.hidden_size, c.intermediate_size),
              f"{prefix}.experts.{{expert}}.{gate}.weight", "ffn_gate_exps.weight"),
        Param("experts_up", "expert_column", lambda c: (c.num_experts, c.hidden_size, c.intermediate_size),
              f"{prefix}.experts.{{expert}}.{up}.weight", "ffn_up_exps.weight"),
        Param("experts_down", "expert_row", lambda c: (c.num_experts, c.intermediate_size, c.hidden_size),
              f"{prefix}.experts.{{expert}}.{down}.weight", "ffn_down_exps.weight"),
    )


_DENSE_MLP = ("w_gate", "w_up", "w_down")
_ATTENTION = tuple(p for p in llama.PARAMS if p.name not in _DENSE_MLP)
SITES = tuple(s for s in llama.SITES if s.name in ("attn", "attn_out"))  # the experts are not calibrated


def _has_shared(c: ModelConfig) -> bool:
    return c.shared_expert_size > 0


# Qwen2-MoE's shared expert: projections (quantised, adapted); their input also feeds the router and
# the experts, so that site has no fold of its own (the experts' AWQ scale, scaling every reader, folds there).
SHARED_PARAMS = (
    Param("shared_gate", "column", lambda c: (c.hidden_size, c.shared_expert_size),
          "mlp.shared_expert.gate_proj.weight", "ffn_gate_shexp.weight", present=_has_shared, calibration="moe_in"),
    Param("shared_up", "column", lambda c: (c.hidden_size, c.shared_expert_size),
          "mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight", present=_has_shared, calibration="moe_in"),
    Param("shared_down", "row", lambda c: (c.shared_expert_size, c.hidden_size),
          "mlp.shared_expert.down_proj.weight", "ffn_down_shexp.weight", present=_has_shared,
          calibration="shared_act"),
    Param("shared_expert_gate", "router", lambda c: (c.hidden_size, 1), "mlp.shared_expert_gate.weight",
          "ffn_gate_inp_shexp.weight", present=_has_shared),
)
SHARED_SITES = (Site("moe_in", lambda c: c.hidden_size, fold=None),
                Site("shared_act", lambda c: c.shared_expert_size, fold="shared_up"))


@dataclasses.dataclass(frozen=True)
class Variant:
    """What tells the MoE families apart in config.json: the Llama-style attention variant, the
    expert count's field, the experts' intermediate size's field, whether norm_topk_prob is read
    (Qwen-MoE) or always on (Mixtral), and whether there is a shared expert (Qwen2-MoE)."""

    attention: llama.Variant
    experts_field: str
    intermediate_field: str
    norm_topk_field: bool
    shared: bool = False  # a shared expert (Qwen2-MoE)
    renormalise: bool = True  # norm_topk_prob in a GGUF file, which llama.cpp's graph fixes per architecture
    gguf_expert_size: bool = True  # a GGUF file gives the experts' size as expert_feed_forward_length
    # (False: as feed_forward_length itself, which llama.cpp's llama graph reads for Mixtral)

    def read_config(self, family: Family, hf: dict[str, Any]) -> ModelConfig:
        if hf_field(hf, "decoder_sparse_step", int, 1, minimum=1) != 1 or hf.get("mlp_only_layers"):
            raise ConfigError(f"decoder_sparse_step={hf.get('decoder_sparse_step')!r} / mlp_only_layers="
                              f"{hf.get('mlp_only_layers')!r}: a mix of dense and MoE layers is not supported")
        shared = hf_field(hf, "shared_expert_intermediate_size", int, 0, minimum=0) if self.shared else 0
        if self.shared and not shared:
            raise ConfigError("shared_expert_intermediate_size: Qwen2-MoE's shared expert is required")
        F = hf_field(hf, self.intermediate_field, int, minimum=1)
        cfg = self.attention.read_config(family, {**hf, "intermediate_size": F})
        # transformers >= 5 writes Qwen3-MoE's expert count as num_local_experts (published files: num_experts)
        field = first_field(hf, self.experts_field, "num_local_experts")
        return dataclasses.replace(
            cfg, num_experts=hf_field(hf, field, int, minimum=1),
            experts_per_token=hf_field(hf, "num_experts_per_tok", int, minimum=1),
            norm_topk_prob=hf_field(hf, "norm_topk_prob", bool, False) if self.norm_topk_field else True,
            shared_expert_size=shared)

    def write_config(self, family: Family, cfg: ModelConfig) -> dict[str, Any]:
        if not self.norm_topk_field and not cfg.norm_topk_prob:
            raise ConfigError(f"{family.name} always renormalises the top-k probabilities (norm_topk_prob)")
        out = self.attention.write_config(family, cfg)
        out.update({self.experts_field: cfg.num_experts, self.intermediate_field: cfg.intermediate_size,
                    "num_experts_per_tok": cfg.experts_per_token})
        if self.norm_topk_field:
            out["norm_topk_prob"] = cfg.norm_topk_prob
        if self.shared:
            out["shared_expert_intermediate_size"] = cfg.shared_expert_size
        return out

    def gguf_config(self, family: Family, cfg: ModelConfig, key) -> ModelConfig:
        """The experts from a GGUF file's `{arch}.expert_*` keys, as llama.cpp reads them: the expert
        count and the experts per token (both required, > 0), the experts' intermediate size
        (expert_feed_forward_length; without it llama.cpp takes feed_forward_length / experts per
        token; Mixtral's, in a llama file, is feed_forward_length itself: `gguf_expert_size`), the
        shared expert's (expert_shared_feed_forward_length, else feed_forward_length).
        No key says norm_topk_prob: llama.cpp's graph hard-codes it per architecture, the top-k
        probabilities renormalised for qwen3moe and Mixtral (llama.cpp's llama graph) and not for
        qwen2moe (`renormalise`)."""
        experts, used = (int(key(name)) for name in ("expert_count", "expert_used_count"))
        if experts < 1 or used < 1:
            raise ConfigError(f"expert_count={experts}, expert_used_count={used}: {family.name} needs both > 0")
        size = (int(key("expert_feed_forward_length", cfg.intermediate_size // used)) if self.gguf_expert_size
                else cfg.intermediate_size)
        shared = int(key("expert_shared_feed_forward_length", cfg.intermediate_size)) if self.shared else 0
        return dataclasses.replace(cfg, intermediate_size=size, num_experts=experts, experts_per_token=used,
                                   norm_topk_prob=self.renormalise, shared_expert_size=shared)

    def check_config(self, family: Family, cfg: ModelConfig) -> None:
        if not cfg.num_experts:
            raise ConfigError(f"{family.name} needs num_experts")
        self.attention.check_config(family, cfg)


def _moe(name: str, architecture: str, prefix: str, names: tuple[str, str, str], variant: Variant,
         gguf_architecture: str | None = None, gguf_reordered_rope: bool = False) -> Family:
    shared = (SHARED_PARAMS, SHARED_SITES) if variant.shared else ((), ())
    return Family(name=name, architectures=(architecture,), params=_ATTENTION + router_and_experts(prefix, *names) +
                  shared[0], sites=SITES + shared[1], layer=layer, read_config=variant.read_config,
                  write_config=variant.write_config, check_config=variant.check_config,
                  gguf_architectures=() if gguf_architecture is None else (gguf_architecture,),
                  gguf_reordered_rope=gguf_reordered_rope, gguf_config=variant.gguf_config)


# No gguf_architectures: llama.cpp writes Mixtral as "llama", whose family's hook sends files with
# experts here (llama.gguf_config); they carry llama's rotary reordering of wq / wk.
MIXTRAL = register(_moe("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"),
                        Variant(llama.Variant("none", windows="all"), "num_local_experts", "intermediate_size",
                                norm_topk_field=False, gguf_expert_size=False), gguf_reordered_rope=True))
QWEN3_MOE = register(_moe("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
                          Variant(llama.Variant("attention_bias", qk_norm=True, windows="layer_types"),
                                  "num_experts", "moe_intermediate_size", norm_topk_field=True), "qwen3moe"))
QWEN2_MOE = register(_moe("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
                          Variant(llama.Variant("qkv", windows="layer_types"), "num_experts", "moe_intermediate_size",
                                  norm_topk_field=True, shared=True, renormalise=False), "qwen2moe"))
