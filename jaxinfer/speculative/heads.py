"""Trained drafting heads (Medusa, EAGLE): their params, the functions that run them, and their
files. A drafter directory holds `drafter.json` (the method and the shapes it was made for) and
`drafter.safetensors` (the params, flattened with "/" between keys).

Medusa (Cai et al. 2024): head i maps the target's final-norm hidden state f_t at position t to a
guess of the token i + 1 places after the target's own next token:
    h_i = f_t + silu(f_t @ w_i + b_i),   logits_i = lm_head(h_i)        (the target's LM head)
EAGLE (Li et al. 2024): one decoder layer at the feature level. Input at position t is the pair
(f_t, embedding of token t + 1); the layer (causal attention over earlier pairs) gives the next
feature, final-normed with the target's norm and read through the target's LM head:
    x_t = [f_t ; e(x_{t+1})] @ fc,   f^_{t+1} = norm(layer(x_<=t)),   logits = lm_head(f^_{t+1})

Params pytrees (D hidden, H heads; the EAGLE layer is one layer of the target's family, its params
as the family's spec lists them with L = 1, its norm the family's norm):
  medusa  w (H, D, D), b (H, D)
  eagle   fc (2D, D), layer {attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down, ...}
Either may carry a truncated draft vocabulary, draft_vocab (W,) int32: the tokens the heads may
draft (e.g. the W most frequent), read through those W columns of the LM head only (a large
vocabulary's LM head dominates a small drafter's cost); every other token gets probability 0.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxinfer.models import decoder as model_lib
from jaxinfer.models.config import ModelConfig

CONFIG_FILE, PARAMS_FILE = "drafter.json", "drafter.safetensors"


def eagle_layer_config(cfg: ModelConfig) -> ModelConfig:
    """The target's config with one layer (the EAGLE layer's shapes and RoPE)."""
    return dataclasses.replace(cfg, num_layers=1, layer_windows=cfg.layer_windows[:1])


def init_medusa(cfg: ModelConfig, num_heads: int, key: jax.Array, dtype=jnp.float32) -> dict:
    """Zero-initialised residual blocks: every head starts as the target's own next-token guess."""
    D = cfg.hidden_size
    del key
    return {"w": jnp.zeros((num_heads, D, D), dtype), "b": jnp.zeros((num_heads, D), dtype)}


def init_eagle(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    k_fc, k_layer = jax.random.split(key)
    D = cfg.hidden_size
    layer = model_lib.init_params(eagle_layer_config(cfg), k_layer, dtype)["layers"]
    fc = 0.02 * jax.random.normal(k_fc, (2 * D, D), jnp.float32)
    fc = fc.at[:D].add(jnp.eye(D))  # start near "the feature itself"
    return {"fc": fc.astype(dtype), "layer": jax.tree.map(lambda a: a[0], layer)}


def with_draft_head(target_params, cfg: ModelConfig, heads: dict) -> dict:
    """Heads with a draft vocabulary get draft_head (D, W): its columns of the target's LM head."""
    if "draft_vocab" not in heads:
        return heads
    head = model_lib.head_weight(target_params, cfg)
    return {**heads, "draft_head": head[:, heads["draft_vocab"]]}


def draft_logits(target_params, cfg: ModelConfig, heads: dict, h: jax.Array) -> jax.Array:
    """h (..., D) -> (..., V) float32 logits through the target's LM head (soft-capped as the
    target's are), or, with a draft vocabulary (with_draft_head), through its columns only, every
    other token at -inf."""
    if "draft_vocab" not in heads:
        return model_lib.lm_head(target_params, cfg, h)
    sub = jnp.einsum("...D,DW->...W", h, heads["draft_head"], preferred_element_type=jnp.float32)  # (..., W)
    sub = model_lib.softcap(cfg, sub)
    return jnp.full((*h.shape[:-1], cfg.vocab_size), -jnp.inf, jnp.float32).at[..., heads["draft_vocab"]].set(sub)


def medusa_hidden(heads: dict, f: jax.Array) -> jax.Array:
    """f (..., D) -> (..., H, D): every head's hidden state."""
    h = f[..., None, :] + jax.nn.silu(jnp.einsum("...D,HDE->...HE", f, heads["w"]) + heads["b"])
    return h.astype(f.dtype)


def medusa_logits(target_params, cfg: ModelConfig, heads: dict, f: jax.Array) -> jax.Array:
    """f (..., D) -> (..., H, V): every head's logits."""
    return draft_logits(target_params, cfg, heads, medusa_hidden(heads, f))


def eagle_inputs(target_params, heads: dict, features: jax.Array, next_tokens: jax.Array) -> jax.Array:
    """The layer's input: [f_t ; e(x_{t+1})] @ fc, (..., D)."""
    e = target_params["embed"][next_tokens]
    return jnp.concatenate([features, e.astype(features.dtype)], axis=-1) @ heads["fc"]


def eagle_features(target_params, cfg: ModelConfig, out: jax.Array) -> jax.Array:
    """The layer's output -> the predicted next feature (final-normed with the target's norm)."""
    return model_lib.final_norm(target_params, cfg, out)


def save_heads(path: str | os.PathLike, method: str, params: dict, cfg: ModelConfig, dtype=np.float32,
               **info) -> None:
    """Write a drafter directory (params stored in `dtype`; loading casts them to the target's)."""
    os.makedirs(path, exist_ok=True)
    flat = {"/".join(str(k.key) for k in p): np.asarray(v) if np.issubdtype(np.asarray(v).dtype, np.integer)
            else np.asarray(v, np.float32).astype(dtype) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    save_file(flat, os.path.join(path, PARAMS_FILE))
    meta = {"method": method, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, **info}
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def load_heads(path: str | os.PathLike, method: str, cfg: ModelConfig, dtype) -> tuple[dict, dict]:
    """(params, drafter.json) of a drafter directory, checked against the method and the target."""
    meta_path, params_path = os.path.join(path, CONFIG_FILE), os.path.join(path, PARAMS_FILE)
    if not (os.path.exists(meta_path) and os.path.exists(params_path)):
        raise ValueError(f"draft={os.fspath(path)!r} has no {CONFIG_FILE} and {PARAMS_FILE}: not a drafter directory")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("method") != method:
        raise ValueError(f"draft={os.fspath(path)!r} holds {meta.get('method')!r} heads, not {method!r} heads")
    for field in ("hidden_size", "vocab_size"):
        if meta.get(field) != getattr(cfg, field):
            raise ValueError(f"draft={os.fspath(path)!r} was made for {field}={meta.get(field)}, the target has "
                             f"{getattr(cfg, field)}")
    params: dict = {}
    for name, value in load_file(params_path).items():
        *parents, leaf = name.split("/")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value, value.dtype if np.issubdtype(value.dtype, np.integer) else dtype)
    if "draft_vocab" in params and not (params["draft_vocab"].ndim == 1 and 0 < params["draft_vocab"].size
                                        and 0 <= int(params["draft_vocab"].min())
                                        and int(params["draft_vocab"].max()) < cfg.vocab_size):
        raise ValueError(f"draft={os.fspath(path)!r}: draft_vocab must be token ids below {cfg.vocab_size}")
    return params, meta
