"""AWQ: activation-aware weight quantisation (Lin et al. 2023, arXiv:2306.00978).

A few input channels carry much larger activations than the rest, and the weight rows they meet
matter most. AWQ multiplies those rows by s > 1 before round-to-nearest (so their relative
rounding error shrinks) and divides the input by s, folding 1/s into whatever produces the input:
the family's sites (jaxinfer.models.family.Site) say which, for the Llama-style families

  (wq, wk, wv)     after attn_norm   1/s folded into attn_norm's gain (the family's Norm: w or 1 + w)
  wo               after wv          1/s folded into wv's output columns (and bv); only when
                                     num_kv_heads == num_heads, as AutoAWQ does (with GQA one v
                                     column feeds several wo rows, so a per-row s cannot fold)
  (w_gate, w_up)   after mlp_norm    1/s folded into mlp_norm's gain
  w_down           after w_up        1/s folded into w_up's output columns

s = stat**alpha with stat the mean |x| per input channel, normalised so sqrt(max(s) min(s)) = 1;
alpha is searched on a grid over [0, 1] for the least output error of the RTN-quantised W * s:

  err(alpha) = || X W - (X / s) Q(W * s) ||^2 = sum_n d_n^T (X^T X) d_n,   d = W - Q(W * s) / s,

computed exactly over every calibration token from the Gram matrix X^T X (calibration.InputStats),
with the columns of a group's projections side by side. AutoAWQ measures the error after the
whole attention block / MLP instead; here it is the group's projection outputs.

Then AWQ's weight clipping: per group of input rows and output column, shrink the largest |w| by
a grid of ratios (1, 0.95, ..., 0.55), clip, RTN, and keep the ratio with the least error of that
group's partial output, d_g^T (X_g^T X_g) d_g with the original w in d. Last, RTN with the scheme.

A mixture of experts' experts (QuantScheme(experts=True); `scale_experts`), as AutoAWQ scales
Mixtral's: every expert's gate and up read the mlp-normed hidden state, which the router (and
Qwen2-MoE's shared expert) read too, so they get one s, searched for the least error summed over
the experts, each on the Gram matrix of its own routed rows (calibration.LayerInputs.experts); 1/s
folds into mlp_norm and s into the rows of every reader (experts, router, shared expert), so the
float layer is unchanged. An expert's down projection gets its own s, folded into that expert's up
columns (not for gpt-oss, whose clamped SwiGLU is not linear in up: its down projections are only
clipped). Each expert is then clipped on its own Gram matrix and RTN-quantised.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinfer.models import family as family_lib
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.formats import MXFP4Weight, QuantizedWeight, check_scheme
from jaxinfer.quant import rtn
from jaxinfer.quant.calibration import InputStats, LayerInputs, Params
from jaxinfer.quant.spec import QuantScheme

SCALE_GRID = 20  # alphas 0, 1/19, ..., 1
CLIP_GRID = 20  # clip ratios 1 - i / CLIP_GRID ...
MAX_SHRINK = 0.5  # ... for i < MAX_SHRINK * CLIP_GRID: 1.0 down to 0.55
STAT_FLOOR = 1e-4  # s = max(stat, STAT_FLOOR)**alpha keeps dead channels from a zero scale


def check_weight(w: jax.Array, bits: int, group_size: int | None, pad: bool, name: str) -> None:
    """ValueError naming the weight when the scheme cannot describe w (K, N), as RTN would raise."""
    K = w.shape[-2]
    g = group_size or K
    check_scheme(bits, g, K + (-K % g if pad else 0), name)


def fake_quantize(
    w: jax.Array,  # (K, N)
    bits: int,
    group_size: int | None,
    *,
    symmetric: bool = True,
    pad: bool = False,
    scale_dtype=None,
) -> jax.Array:  # (K, N) float32
    """dequantize(rtn.quantize_weight(w, ...)) without packing: the weight RTN would serve."""
    K, N = w.shape
    g = group_size or K
    wp = rtn.pad_rows(w, g) if pad and group_size else w  # (Kp, N)
    Kp = wp.shape[0]
    groups = wp.reshape(Kp // g, g, N).astype(jnp.float32)
    scale, zero = rtn.group_params(groups, bits, symmetric, scale_dtype or w.dtype)  # (Kp // g, N)
    q = rtn.quantize_values(groups, scale[:, None, :], zero[:, None, :], bits)
    return ((q - zero[:, None, :]) * scale[:, None, :]).reshape(Kp, N)[:K]


def _output_error(d: jax.Array, gram: jax.Array) -> jax.Array:
    """sum over tokens and columns of (x d)^2 = sum_n d_n^T gram d_n; d (K, N), gram (K, K)."""
    return jnp.sum(d * jnp.einsum("KJ,JN->KN", gram, d, precision=jax.lax.Precision.HIGHEST))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "pad", "scale_dtype", "grid"))
def _scale_search(w, gram, stat, *, bits, group_size, symmetric, pad, scale_dtype, grid):
    """The s (K,) whose alpha on the grid gives the least output error. w (K, N), gram (K, K), stat (K,)."""
    w = w.astype(jnp.float32)
    stat = jnp.maximum(stat, STAT_FLOOR)
    alphas = jnp.linspace(0.0, 1.0, grid)  # (A,)

    def error(alpha):
        s = stat**alpha
        s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))  # (K,)
        wq = fake_quantize(w * s[:, None], bits, group_size, symmetric=symmetric, pad=pad,
                           scale_dtype=scale_dtype) / s[:, None]
        return _output_error(w - wq, gram)

    errors = jax.lax.map(error, alphas)  # (A,)
    s = stat ** alphas[jnp.argmin(errors)]
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def search_scale(weights: list[jax.Array], stats: InputStats, bits: int, group_size: int | None, *,
                 symmetric: bool = True, pad: bool = False, scale_dtype=None, grid: int = SCALE_GRID) -> jax.Array:
    """AWQ's per-input-channel scale s (K,) for projections (K, N_i) that share one input."""
    w = jnp.concatenate([jnp.asarray(x, jnp.float32) for x in weights], axis=1)  # (K, sum N_i)
    scale_dtype = jnp.dtype(scale_dtype or weights[0].dtype).name
    return _scale_search(w, stats.gram, stats.abs_mean, bits=bits, group_size=group_size, symmetric=symmetric,
                         pad=pad, scale_dtype=scale_dtype, grid=grid)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "pad", "scale_dtype", "grid",
                                             "max_shrink"))
def _clip(w, gram, *, bits, group_size, symmetric, pad, scale_dtype, grid, max_shrink):
    K, N = w.shape
    g = group_size or K
    wp = rtn.pad_rows(w.astype(jnp.float32), g) if pad and group_size else w.astype(jnp.float32)  # (Kp, N)
    Kp = wp.shape[0]
    G = Kp // g
    gp = jnp.pad(gram, ((0, Kp - K), (0, Kp - K)))  # padded rows meet zero activations
    blocks = jnp.diagonal(gp.reshape(G, g, G, g), axis1=0, axis2=2).transpose(2, 0, 1)  # (G, g, g)
    groups = wp.reshape(G, g, N)
    amax = jnp.max(jnp.abs(groups), axis=1)  # (G, N)

    def error(ratio):
        limit = amax * ratio  # (G, N)
        clipped = jnp.clip(groups, -limit[:, None, :], limit[:, None, :])
        scale, zero = rtn.group_params(clipped, bits, symmetric, scale_dtype)
        q = rtn.quantize_values(clipped, scale[:, None, :], zero[:, None, :], bits)
        d = groups - (q - zero[:, None, :]) * scale[:, None, :]  # (G, g, N)
        return jnp.einsum("Gin,Gij,Gjn->Gn", d, blocks, d, precision=jax.lax.Precision.HIGHEST)  # (G, N)

    ratios = 1.0 - jnp.arange(int(max_shrink * grid)) / grid  # (R,)
    errors = jax.lax.map(error, ratios)  # (R, G, N)
    limit = amax * ratios[jnp.argmin(errors, axis=0)]  # (G, N)
    clipped = jnp.clip(groups, -limit[:, None, :], limit[:, None, :]).reshape(Kp, N)[:K]
    return clipped.astype(w.dtype)


def search_clip(w: jax.Array, stats: InputStats, bits: int, group_size: int | None, *, symmetric: bool = True,
                pad: bool = False, scale_dtype=None, grid: int = CLIP_GRID,
                max_shrink: float = MAX_SHRINK) -> jax.Array:
    """w (K, N) with every group's range clipped to the ratio of its max |w| (from 1 down to
    1 - max_shrink) whose RTN output error over the calibration inputs is least."""
    scale_dtype = jnp.dtype(scale_dtype or w.dtype).name
    return _clip(w, stats.gram, bits=bits, group_size=group_size, symmetric=symmetric, pad=pad,
                 scale_dtype=scale_dtype, grid=grid, max_shrink=max_shrink)


def awq_quantize(w: jax.Array, stats: InputStats, bits: int, group_size: int | None = None, *,
                 symmetric: bool = True, pad: bool = False, scale_dtype=None, clip: bool = True,
                 name: str = "weight") -> tuple[QuantizedWeight, jax.Array]:
    """AWQ one projection w (K, N) given its input statistics: (Q(clip(w * s)), s), so that
    x @ w ~ (x / s) @ dequantize(Q): the caller folds 1/s into whatever produces x."""
    check_weight(w, bits, group_size, pad, name)
    kw = dict(symmetric=symmetric, pad=pad, scale_dtype=scale_dtype)
    s = search_scale([w], stats, bits, group_size, **kw)
    ws = (w * s[:, None]).astype(w.dtype)
    if clip:
        ws = search_clip(ws, stats.scaled(s), bits, group_size, **kw)
    return rtn.quantize_weight(ws, bits, group_size, name=name, **kw), s


# --- a decoder layer ----------------------------------------------------------------------------


def scale_layer(cfg: ModelConfig, lp: Params, stats: LayerInputs, scheme: QuantScheme) -> tuple[Params, LayerInputs]:
    """Search AWQ's scales for one layer's projection groups (the family's sites) and fold them in
    (the float layer computes the same function, up to rounding). Returns the new layer params and
    the statistics of the inputs the scaled projections now see."""
    family = cfg.family
    for name in _projections(cfg, lp):
        check_weight(lp[name], scheme.bits, scheme.group_size, scheme.pad, f"layers.{name}")
    kw = dict(symmetric=scheme.symmetric, pad=scheme.pad, scale_dtype=scheme.scale_dtype)
    lp = dict(lp)
    new_stats = {}

    def rows(name, s):
        lp[name] = (lp[name] * s[:, None]).astype(lp[name].dtype)

    def divide(name, s):  # a bias, or (with s[None, :]) a projection's columns
        lp[name] = (lp[name] / s).astype(lp[name].dtype)

    for site in family.sites:
        names = [n for n in family.site_projections(site.name) if n in lp]
        st = stats.sites[site.name]
        if (site.grouped and cfg.num_kv_heads != cfg.num_heads) or site.fold is None:
            new_stats[site.name] = st
            continue
        s = search_scale([lp[n] for n in names], st, scheme.bits, scheme.group_size, **kw)
        new_stats[site.name] = st.scaled(s)
        for name in names:
            rows(name, s)
        fold = family.param(site.fold)
        if fold.role == "norm":
            lp[fold.name] = family.norm.map_gain(lp[fold.name], lambda gain, s=s: gain / s)
        else:
            divide(fold.name, s[None, :])
            if fold.bias in lp:
                divide(fold.bias, s)
    return lp, LayerInputs(sites=new_stats, family=stats.family, experts=stats.experts)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "pad", "scale_dtype", "grid"))
def _experts_scale_search(w, grams, stat, *, bits, group_size, symmetric, pad, scale_dtype, grid):
    """_scale_search for E experts sharing one s: w (E, K, N), grams (E, K, K), stat (K,)."""
    w = w.astype(jnp.float32)
    stat = jnp.maximum(stat, STAT_FLOOR)
    alphas = jnp.linspace(0.0, 1.0, grid)
    quantize = jax.vmap(functools.partial(fake_quantize, bits=bits, group_size=group_size, symmetric=symmetric,
                                          pad=pad, scale_dtype=scale_dtype))

    def error(alpha):
        s = stat**alpha
        s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
        wq = quantize(w * s[:, None]) / s[:, None]
        return jnp.sum(jax.vmap(_output_error)(w - wq, grams))

    errors = jax.lax.map(error, alphas)
    s = stat ** alphas[jnp.argmin(errors)]
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def _expert_weights(lp: Params, role: str) -> list[str]:
    return [n for n in lp if family_lib.parallel_style(n) == role and not isinstance(lp[n], MXFP4Weight)]


def scale_experts(cfg: ModelConfig, lp: Params, stats: LayerInputs, scheme: QuantScheme) -> tuple[Params, LayerInputs]:
    """Search and fold the experts' scales (module docstring); the statistics the scaled weights
    now see come back with the new params."""
    family = cfg.family
    kw = dict(bits=scheme.bits, group_size=scheme.group_size, symmetric=scheme.symmetric, pad=scheme.pad)
    lp, sites, experts = dict(lp), dict(stats.sites), dict(stats.experts)
    inputs = _expert_weights(lp, "expert_column")
    if inputs:
        st = experts["experts_in"]
        stat = jnp.sum(st.abs_sum, axis=0) / jnp.maximum(jnp.sum(st.count), 1)  # mean |x| over routed rows
        scale_dtype = jnp.dtype(scheme.scale_dtype or lp[inputs[0]].dtype).name
        s = _experts_scale_search(jnp.concatenate([lp[n] for n in inputs], axis=-1), st.gram, stat,
                                  scale_dtype=scale_dtype, grid=SCALE_GRID, **kw)
        readers = inputs + [n for n in lp if family_lib.lookup_param(n) is not None and
                            (family_lib.lookup_param(n).role == "router" or
                             family_lib.lookup_param(n).calibration == "moe_in")]
        for name in readers:  # every weight that reads the mlp-normed state: (E,) K, N rows times s
            lp[name] = (lp[name] * s[:, None]).astype(lp[name].dtype)
        lp["mlp_norm"] = family.norm.map_gain(lp["mlp_norm"], lambda gain: gain / s)
        experts["experts_in"] = st.scaled(s)
        if "moe_in" in sites:
            sites["moe_in"] = sites["moe_in"].scaled(s)
    for down in _expert_weights(lp, "expert_row"):
        if cfg.swiglu_limit is not None:  # gpt-oss: the clamp makes the unit non-linear in up
            continue
        st = experts["experts_act"]
        per_expert = [jax.tree.map(lambda a, e=e: a[e], st) for e in range(cfg.num_experts)]
        s = jnp.stack([search_scale([lp[down][e]], per_expert[e], **kw, scale_dtype=scheme.scale_dtype)
                       for e in range(cfg.num_experts)])  # (E, F)
        lp[down] = (lp[down] * s[:, :, None]).astype(lp[down].dtype)
        lp["experts_up"] = (lp["experts_up"] / s[:, None, :]).astype(lp["experts_up"].dtype)
        if "experts_up_bias" in lp:
            lp["experts_up_bias"] = (lp["experts_up_bias"] / s).astype(lp["experts_up_bias"].dtype)
        experts["experts_act"] = st.scaled(s)
    return lp, LayerInputs(sites=sites, family=stats.family, experts=experts)


def _quantize_experts(cfg: ModelConfig, lp: Params, stats: LayerInputs, scheme: QuantScheme, clip: bool) -> Params:
    """Every expert weight clipped on its own expert's Gram matrix, then RTN as one (E, ...) weight."""
    kw = dict(symmetric=scheme.symmetric, pad=scheme.pad, scale_dtype=scheme.scale_dtype)
    for role, site in (("expert_column", "experts_in"), ("expert_row", "experts_act")):
        for name in _expert_weights(lp, role):
            w = lp[name]
            if clip:
                w = jnp.stack([search_clip(w[e], jax.tree.map(lambda a, e=e: a[e], stats.experts[site]),
                                           scheme.bits, scheme.group_size, **kw) for e in range(cfg.num_experts)])
            lp[name] = rtn.quantize_weight(w, scheme.bits, scheme.group_size, name=f"layers.{name}", **kw)
    return lp


def _projections(cfg: ModelConfig, lp: Params) -> list[str]:
    return [n for n in cfg.family.projections if n in lp]


def quantize_layer(cfg: ModelConfig, lp: Params, stats: LayerInputs, scheme: QuantScheme, *,
                   clip: bool = True) -> Params:
    """AWQ one decoder layer: fold the searched scales, clip, then RTN every projection (and with
    scheme.experts every expert)."""
    lp, stats = scale_layer(cfg, lp, stats, scheme)
    if scheme.experts:
        lp, stats = scale_experts(cfg, lp, stats, scheme)
    kw = dict(symmetric=scheme.symmetric, pad=scheme.pad, scale_dtype=scheme.scale_dtype)
    for name in _projections(cfg, lp):
        w = lp[name]
        if clip:
            w = search_clip(w, stats.for_weight(name), scheme.bits, scheme.group_size, **kw)
        lp[name] = rtn.quantize_weight(w, scheme.bits, scheme.group_size, name=f"layers.{name}", **kw)
    return _quantize_experts(cfg, lp, stats, scheme, clip) if scheme.experts else lp
