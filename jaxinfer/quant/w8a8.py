"""W8A8: int8 or FP8 (e4m3) weights meeting int8 / FP8 activations, with SmoothQuant for int8
(Xiao et al. 2023, arXiv:2211.10438).

Weights get one scale per output channel (or, fp8 "-pt", one per matrix); activations one scale
per token computed on the fly, or (fp8 "-static") one calibrated scale per projection: the largest
|x| its input reached on the calibration windows, over 448. The format and its matmul are in
`jaxinfer.models.act_formats`; naive W8A8 (no smoothing) is the control SmoothQuant is measured against.

SmoothQuant: per-token int8 activations lose the small channels of a token whose few outlier
channels set its scale. Dividing input channel j by s_j (and multiplying weight row j by s_j)
moves that range into the weights, which have a scale per output channel to absorb it:

  s_j = max|x_j|**alpha / max_n |W_jn|**(1 - alpha)      (alpha: migration strength, default 0.5)

with max|x_j| over the calibration tokens and max_n |W_jn| over the projections sharing the input.
1/s is folded into whatever produces the input (the family's sites, jaxinfer.models.family.Site),
so the float model is unchanged (up to rounding); for the Llama-style families:

  (wq, wk, wv)     after attn_norm   1/s folded into attn_norm's gain (the family's Norm: w or 1 + w)
  wo               after wv          1/s folded into wv's output columns (and bv). With GQA one v
                                     column feeds the wo rows of every query head in its group, so
                                     s is shared by that group: max|x| and max|W| are taken over
                                     the group's rows (exact for any num_kv_heads)
  (w_gate, w_up)   after mlp_norm    1/s folded into mlp_norm's gain
  w_down           after w_up        1/s folded into w_up's output columns: act(g) * (u / s) = (act(g) * u) / s

The paper folds at the norms only (its Llama recipe smooths q/k/v and gate/up); the two folds
through wv and w_up are exact as well (a column scale is free under per-channel weight scales),
and `w_down`'s input is where Llama-family models keep their largest activations.
Calibration runs layer by layer (calibration.run_layers): each layer's maxima are measured on the
inputs the already-quantised layers below it produce.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.checkpoints.model import Model
from jaxinfer.models.act_formats import QMAX, W8A8Weight, quantize_columns
from jaxinfer.models.config import ModelConfig
from jaxinfer.quant.calibration import LayerInputs, Params
from jaxinfer.quant.spec import W8A8Scheme, projections

SCALE_FLOOR = 1e-5  # a channel that never fires (or an all-zero weight row) keeps s = 1


def smoothing_factors(act_max: jax.Array, w_max: jax.Array, alpha: float) -> jax.Array:
    """s (K,) = act_max**alpha / w_max**(1 - alpha), 1 where either maximum is (near) zero."""
    act_max, w_max = act_max.astype(jnp.float32), w_max.astype(jnp.float32)
    live = (act_max > SCALE_FLOOR) & (w_max > SCALE_FLOOR)
    s = jnp.maximum(act_max, SCALE_FLOOR) ** alpha / jnp.maximum(w_max, SCALE_FLOOR) ** (1.0 - alpha)
    return jnp.where(live, jnp.maximum(s, SCALE_FLOOR), 1.0)


def _row_max(weights: list[jax.Array]) -> jax.Array:
    """max |W_jn| over every column of the projections (K, N_i) sharing one input: (K,)."""
    return jnp.max(jnp.stack([jnp.max(jnp.abs(w.astype(jnp.float32)), axis=-1) for w in weights]), axis=0)


def _per_kv(v: jax.Array, cfg: ModelConfig) -> jax.Array:
    """(N * H,) over query-head channels -> (K * H,): the max over the query heads of each kv head."""
    K, H = cfg.num_kv_heads, cfg.head_dim
    return jnp.max(v.reshape(K, cfg.num_heads // K, H), axis=1).reshape(K * H)


def _to_query_heads(s: jax.Array, cfg: ModelConfig) -> jax.Array:
    """(K * H,) -> (N * H,): each kv head's factors repeated for the query heads of its group."""
    K, H = cfg.num_kv_heads, cfg.head_dim
    return jnp.broadcast_to(s.reshape(K, 1, H), (K, cfg.num_heads // K, H)).reshape(cfg.num_heads * H)


def smooth_layer(cfg: ModelConfig, lp: Params, stats: LayerInputs, alpha: float) -> tuple[Params, dict]:
    """Fold SmoothQuant's factors into one decoder layer (float weights): the new params, which
    compute the same function, and the factors by input site (the family's sites; a grouped site's
    per kv channel: attn, attn_out per kv channel, mlp, mlp_act for the Llama-style families)."""
    family = cfg.family
    s = {}
    for site in family.sites:
        act_max = stats.sites[site.name].abs_max
        w_max = _row_max([lp[n] for n in family.site_projections(site.name) if n in lp])
        if site.grouped:
            act_max, w_max = _per_kv(act_max, cfg), _per_kv(w_max, cfg)
        s[site.name] = smoothing_factors(act_max, w_max, alpha)
    lp = dict(lp)

    def scale(name, factor):  # rows (factor[:, None]), columns (factor[None, :]), or a bias (factor)
        lp[name] = (lp[name].astype(jnp.float32) * factor).astype(lp[name].dtype)

    for site in family.sites:
        if site.fold is None:  # nothing can take 1/s: the site stays unsmoothed
            s[site.name] = jnp.ones_like(s[site.name])
            continue
        factor = s[site.name]
        for name in [n for n in family.site_projections(site.name) if n in lp]:
            scale(name, (_to_query_heads(factor, cfg) if site.grouped else factor)[:, None])
        fold = family.param(site.fold)
        if fold.role == "norm":
            lp[fold.name] = family.norm.map_gain(lp[fold.name],
                                                 lambda gain, f=factor: gain.astype(jnp.float32) * (1.0 / f))
        else:
            scale(fold.name, 1.0 / factor[None, :])
            if fold.bias in lp:
                scale(fold.bias, 1.0 / factor)
    return lp, s


def quantize_weight(w: jax.Array, scheme: W8A8Scheme, act_max: jax.Array | None = None) -> W8A8Weight:
    """A dense weight (..., K, N) as a W8A8Weight; act_max (..., K), the calibration maxima of its
    input, sets the static activation scale (fp8 "-static" only)."""
    qweight, scales = quantize_columns(w, scheme.dtype, per_tensor=scheme.per_tensor)
    act_scale = None
    if scheme.static_act:
        if act_max is None:
            raise ValueError(f"scheme {scheme.name} needs the calibration maxima of each projection's input")
        amax = jnp.max(act_max.astype(jnp.float32), axis=-1)
        act_scale = jnp.where(amax > 0, amax / QMAX[scheme.dtype], 1.0)
    return W8A8Weight(qweight=qweight, scales=scales, act_scale=act_scale)


def quantize_params(params: dict, scheme: W8A8Scheme) -> dict:
    """Every projection (stacked over layers) as W8A8: the schemes that need no calibration (naive
    int8, fp8 with dynamic activation scales)."""
    if scheme.needs_calibration:
        raise ValueError(f"scheme {scheme.name} needs calibration data: use quant.quantize_model")
    layers = dict(params["layers"])
    for name in projections(layers):
        layers[name] = quantize_weight(layers[name], scheme)
    return quantize_head({**params, "layers": layers}, scheme)


def quantize_head(params: dict, scheme: W8A8Scheme) -> dict:
    """params with the LM head as a W8A8Weight (D, V) when the scheme says so (`head`): the model's
    own lm_head, or a tied model's embedding transposed; a tied model keeps its float embedding
    table for the lookup, and `decoder.lm_head` multiplies by the packed head."""
    if not scheme.head:
        return params
    head = params.get("lm_head")
    if isinstance(head, W8A8Weight):
        raise ValueError("lm_head is already quantised")
    dense = params["embed"].T if head is None else head
    return {**params, "lm_head": quantize_weight(dense, scheme)}


def quantize_layer(cfg: ModelConfig, lp: Params, stats: LayerInputs, scheme: W8A8Scheme) -> Params:
    """One decoder layer: smoothed first when the scheme says so, then every projection as W8A8."""
    if scheme.smooth_alpha is not None:
        lp, _ = smooth_layer(cfg, lp, stats, scheme.smooth_alpha)
    lp = dict(lp)
    for name in [n for n in cfg.family.projections if n in lp]:
        lp[name] = quantize_weight(lp[name], scheme, stats.for_weight(name).abs_max)
    return lp


def inject_outlier(model: Model, channel: int, factor: float) -> Model:
    """The same float function with hidden channel `channel` `factor` times larger where the
    projections after a norm read it (q/k/v and gate/up): that channel of the norms' gains times
    factor, the matching rows of those projections divided by it. The activation outlier
    SmoothQuant is for, made to order on a model that has none."""
    if not 0 <= channel < model.config.hidden_size:
        raise ValueError(f"channel={channel} is outside the hidden size {model.config.hidden_size}")
    if factor <= 0:
        raise ValueError(f"factor={factor} must be > 0")
    family = model.config.family
    layers = dict(model.params["layers"])
    for site in family.sites:
        if site.fold is None or family.param(site.fold).role != "norm":
            continue
        norm = family.param(site.fold)
        layers[norm.name] = family.norm.map_gain(layers[norm.name], lambda gain: gain.at[:, channel].multiply(factor))
        for name in family.site_projections(site.name):
            layers[name] = layers[name].at[:, channel, :].divide(factor)
    return dataclasses.replace(model, params={**model.params, "layers": layers})
