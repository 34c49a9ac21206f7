"""A functional Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3).

No classes hold state: `init_params` builds a params pytree, `forward` maps params and tokens
(and optionally a KV cache, passed in and returned) to logits. The layers are stacked on a
leading axis and run with `lax.scan`, so compile time does not grow with depth.

Axis legend:
  B batch            T tokens in this call    S cache slots (positions) per sequence
  L layers           D hidden size            F MLP hidden size
  N query heads      K kv heads               H head dim          V vocab size

Params pytree (weights stored as (in, out) so a projection is `x @ w`):
  embed       (V, D)
  layers      attn_norm (L, D); wq (L, D, N*H); wk, wv (L, D, K*H); wo (L, N*H, D);
              bq (L, N*H), bk, bv (L, K*H) if cfg.qkv_bias; bo (L, D) if cfg.o_bias;
              q_norm, k_norm (L, H) if cfg.qk_norm;
              mlp_norm (L, D); w_gate, w_up (L, D, F); w_down (L, F, D)
  final_norm  (D,)
  lm_head     (D, V) unless cfg.tie_word_embeddings (then embed.T is used)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxinfer import attention
from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import BatchDescriptor, KVCache, PagedKVCache
from jaxinfer.quant.matmul import linear

Params = dict[str, Any]


class ForwardOutput(NamedTuple):
    logits: jax.Array  # (B, T', V) float32; T' = T, or the number of `logits_at` columns
    hidden: jax.Array  # (B, T', D) final-norm hidden states at the same positions
    cache: KVCache | PagedKVCache | None


def param_shapes(cfg: ModelConfig) -> Params:
    """The shape of every parameter, as a pytree of tuples with the structure of the params."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layers = {
        "attn_norm": (L, D),
        "wq": (L, D, N * H),
        "wk": (L, D, K * H),
        "wv": (L, D, K * H),
        "wo": (L, N * H, D),
        "mlp_norm": (L, D),
        "w_gate": (L, D, F),
        "w_up": (L, D, F),
        "w_down": (L, F, D),
    }
    if cfg.qkv_bias:
        layers.update(bq=(L, N * H), bk=(L, K * H), bv=(L, K * H))
    if cfg.o_bias:
        layers["bo"] = (L, D)
    if cfg.qk_norm:
        layers.update(q_norm=(L, H), k_norm=(L, H))
    shapes: Params = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def _is_norm(name: str) -> bool:
    return name.endswith("norm")


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random params: weights ~ N(0, std), norms 1, biases 0 (HF's initialisation)."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = str(path[-1].key)
        if _is_norm(name):
            leaves.append(jnp.ones(shape, dtype))
        elif name.startswith("b"):
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, cast back, then scaled (the order HF transformers uses)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_tables(cfg: ModelConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin: (B, T, H) for the given positions (half-split layout, as HF's rotate_half)."""
    inv_freq = jnp.asarray(cfg.rope.inv_freq(cfg.head_dim))  # (H/2,)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # (B, T, H)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, T, heads, H); cos, sin: (B, T, H)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _layer(cfg: ModelConfig, lp: Params, x, cos, sin, positions, window, cache, layer, batch, attn_impl,
           matmul_impl):
    """One decoder layer. Without a cache the tokens attend causally to each other; with one,
    their K/V are written into it first and attention reads the cache."""
    B, T, _ = x.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    def project(x, name, bias=None):  # every projection goes through the one matmul dispatch point
        return linear(x, lp[name], lp.get(bias) if bias else None, impl=matmul_impl)

    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)  # (B, T, D)
    q = project(h, "wq", "bq").reshape(B, T, N, H)
    k = project(h, "wk", "bk").reshape(B, T, K, H)
    v = project(h, "wv", "bv").reshape(B, T, K, H)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    if cache is None:
        o = attention.attend(q, k, v, positions, positions, window, impl=attn_impl)  # (B, T, N, H)
    else:
        o, cache = attention.attend_cached(cache, layer, q, k, v, positions, window, batch, impl=attn_impl)
    x = x + project(o.reshape(B, T, N * H), "wo", "bo")

    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    mlp = jax.nn.silu(project(h, "w_gate")) * project(h, "w_up")  # (B, T, F)
    return x + project(mlp, "w_down"), cache


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,  # (B, T) int32
    positions: jax.Array,  # (B, T) int32
    cache: KVCache | PagedKVCache | None = None,
    logits_at: jax.Array | None = None,  # (B, T') int32 indices into T; None = every token
    batch: BatchDescriptor | None = None,  # required with a PagedKVCache (then B = 1, T = N)
    *,
    attn_impl: str = "xla",
    matmul_impl: str = "xla",
) -> ForwardOutput:
    """Run the decoder over tokens at the given positions, optionally reading and writing a cache
    (passed in and returned). Logits are float32. Projection weights may be dense arrays or
    QuantizedWeight pytrees (jaxinfer.quant); matmul_impl picks how the latter are multiplied."""
    dtype = params["embed"].dtype
    x = params["embed"][tokens]  # (B, T, D)
    cos, sin = rope_tables(cfg, positions, dtype)
    windows = jnp.asarray(cfg.layer_windows, jnp.int32)  # (L,)

    # One window shared by every layer is passed as a static int (the Pallas kernels need it so).
    shared_window = cfg.layer_windows[0] if len(set(cfg.layer_windows)) == 1 else None

    def body(carry, xs):
        x, cache = carry
        lp, window, layer = xs
        window = window if shared_window is None else shared_window
        return _layer(cfg, lp, x, cos, sin, positions, window, cache, layer, batch, attn_impl, matmul_impl), None

    layer_ids = jnp.arange(cfg.num_layers)
    (x, cache), _ = jax.lax.scan(body, (x, cache), (params["layers"], windows, layer_ids))

    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[..., None], axis=1)  # (B, T', D)
    hidden = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]  # (D, V)
    logits = jnp.einsum("BTD,DV->BTV", hidden, head, preferred_element_type=jnp.float32)
    return ForwardOutput(logits=logits, hidden=hidden, cache=cache)


_forward_jit = jax.jit(forward, static_argnames=("cfg", "attn_impl", "matmul_impl"))


def forward_logits(model, tokens, *, attn_impl: str = "xla", matmul_impl: str = "xla") -> jax.Array:
    """int32[B, T] -> float32[B, T, V]: one full causal pass, no cache. The reference path."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int32[B, T], got shape {tokens.shape}")
    cfg = model.config
    _check_tokens(tokens, cfg)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return _forward_jit(model.params, cfg, tokens, positions, attn_impl=attn_impl, matmul_impl=matmul_impl).logits


def _check_tokens(tokens, cfg: ModelConfig) -> None:
    if tokens.size == 0:
        raise ValueError("tokens is empty")
    if tokens.shape[-1] > cfg.max_position_embeddings:
        raise ValueError(
            f"tokens has length {tokens.shape[-1]}, over max_position_embeddings={cfg.max_position_embeddings}"
        )
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
