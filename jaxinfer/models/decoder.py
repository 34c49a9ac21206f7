"""The functional decoder of every registered model family (jaxinfer.models.family: Llama 2/3,
Mistral, Qwen2/2.5, Qwen3 built in).

No classes hold state: `init_params` builds a params pytree, `forward` maps params and tokens
(and optionally a KV cache, passed in and returned) to logits; `forward_paged` does the same for
one flat step over a paged cache. The layers are stacked on a leading axis and run with
`lax.scan`, so compile time does not grow with depth; params whose layers are a list of per-layer
dicts (`unstack_layers`, EngineConfig(layer_loop="unroll")) run them unrolled.

One decoder layer (`layer`, the family's layer function) serves every caller. Its projections go through a hook,
`project(name, x, lp) -> y`: by default `dense_projection(impl)`, the one matmul dispatch point;
calibration records each projection's input through it, and adapters add their deltas through it.
Which attention and matmul implementations run is one static, hashable `Impl`.

Axis legend:
  B batch            T tokens in this call    S cache slots (positions) per sequence
  L layers           D hidden size            F MLP hidden size
  N query heads      K kv heads               H head dim          V vocab size

Params pytree (weights stored as (in, out) so a projection is `x @ w`), as the family lists them;
for the Llama-style families (jaxinfer.models.llama):
  embed       (V, D)
  layers      attn_norm (L, D); wq (L, D, N*H); wk, wv (L, D, K*H); wo (L, N*H, D);
              bq (L, N*H), bk, bv (L, K*H) if cfg.qkv_bias; bo (L, D) if cfg.o_bias;
              q_norm, k_norm (L, H) if cfg.qk_norm;
              mlp_norm (L, D); w_gate, w_up (L, D, F); w_down (L, F, D)
  final_norm  (D,)
  lm_head     (D, V) unless cfg.tie_word_embeddings (then embed.T is used)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.models import attention, latent_attention, matmul
from jaxinfer.models import family as family_lib
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.family import rms_norm  # noqa: F401  (the Llama-style norm; callers reach it here)
from jaxinfer.models.formats import dense_weight
from jaxinfer.models.kv_cache import (
    KV_DTYPES,
    BatchDescriptor,
    KVCache,
    PagedKVCache,
    fake_quantize,
)
from jaxinfer.models.layers import rope_tables
from jaxinfer.sharding import parallel_style, use_mesh
from pallas_kernels.common import fp8_supported

Params = dict[str, Any]


class ForwardOutput(NamedTuple):
    logits: jax.Array  # (B, T', V) float32; T' = T, or the number of `logits_at` columns
    hidden: jax.Array  # (B, T', D) final-norm hidden states at the same positions ((B, T, D) with all_hidden)
    cache: KVCache | PagedKVCache | None
    aux: jax.Array | None = None  # (A, B, T, D) the hidden states entering each of aux_layers, every token


def param_shapes(cfg: ModelConfig) -> Params:
    """The shape of every parameter, as a pytree of tuples with the structure of the params."""
    return family_lib.of(cfg).param_shapes(cfg)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random params: weights ~ N(0, std), norms at a gain of 1, biases 0 (HF's initialisation)."""
    family = family_lib.of(cfg)
    roles = {p.name: p.role for p in family.params}
    shapes = family.param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
        role = roles[str(path[-1].key)]
        if role == "norm":
            leaves.append(jnp.full(shape, family.norm.identity, dtype))
        elif role in ("bias", "expert_bias"):
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def auto_impl(name: str) -> str:
    """An implementation name with "auto" resolved: the Pallas kernels on a GPU, the XLA path
    elsewhere (on a CPU the kernels only run interpreted, for tests)."""
    if name != "auto":
        return name
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def attention_impl_for(name: str, kv_dtype: str | None) -> str:
    """The attention implementation that runs for `name` over a KV cache of kv_dtype: "auto"
    resolved (auto_impl), except that Triton reads float8_e4m3fn only from sm_89 (Ada, Hopper) on,
    so fp8 pages on an older GPU fall back to the XLA path under "auto" and are refused under
    "pallas" (a clear error at construction, not inside the first step's trace)."""
    impl = auto_impl(name)
    if kv_dtype != "fp8" or impl != "pallas" or jax.default_backend() != "gpu" or fp8_supported():
        return impl
    if name != "auto":
        raise ValueError("kv_dtype='fp8' with attention='pallas' needs a GPU of compute capability >= 8.9 (Ada, "
                         "Hopper): use kv_dtype='int8', or attention='auto' or 'xla' (the XLA path reads fp8 pages)")
    return "xla"


@dataclasses.dataclass(frozen=True)
class Impl:
    """How each op runs (a static jit argument): attention and matmul "xla" (the reference),
    "pallas", or "auto" (resolved on construction: see auto_impl); kv_dtype None, or "int8" / "fp8" to read keys and values as a quantised KV cache
    holds them (a forward without a cache quantises and dequantises them, the same numerics)."""

    attention: str = "xla"
    matmul: str = "xla"
    kv_dtype: str | None = None
    # multi-head latent attention over a latent cache: the form of decode rows and of prefill rows
    # (latent_attention.MLA_FORMS); a model without MLA ignores them
    mla_decode: str = "absorbed"
    mla_prefill: str = "expanded"

    def __post_init__(self):
        if self.kv_dtype not in (None, *KV_DTYPES):
            raise ValueError(f"kv_dtype={self.kv_dtype!r} is not one of None, {', '.join(map(repr, KV_DTYPES))}")
        attention_impl = attention_impl_for(self.attention, self.kv_dtype)
        object.__setattr__(self, "attention", attention_impl)
        object.__setattr__(self, "matmul", auto_impl(self.matmul))
        if self.attention not in attention.IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {tuple(attention.IMPLEMENTATIONS)}")
        if self.matmul not in matmul.IMPLEMENTATIONS:
            raise ValueError(f"matmul={self.matmul!r} is not one of {matmul.IMPLEMENTATIONS}")
        for name in ("mla_decode", "mla_prefill"):
            if getattr(self, name) not in latent_attention.MLA_FORMS:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {latent_attention.MLA_FORMS}")


# project(name, x, lp) -> x @ lp[name] (+ its bias): every projection of a layer goes through one.
# project(name, x, lp, group_sizes=sizes): a mixture of experts' per-expert weight lp[name] (E, in,
# out), x's rows sorted by expert, group_sizes (E,) rows each (matmul.grouped).
Project = Callable[..., jax.Array]


def dense_projection(impl: Impl = Impl()) -> Project:
    """The default hook: the layer's own weight (dense or packed) and its bias (the family's
    Param.bias) through the matmul dispatch point; per-expert weights through matmul.grouped."""

    def project(name: str, x: jax.Array, lp: Params, group_sizes: jax.Array | None = None) -> jax.Array:
        if group_sizes is not None:
            return matmul.grouped(x, lp[name], group_sizes, impl=impl.matmul, parallel=parallel_style(name))
        return matmul.linear(x, lp[name], lp.get(family_lib.bias_of(name)), impl=impl.matmul,
                             parallel=parallel_style(name))

    return project


def layer(cfg: ModelConfig, lp: Params, x, cos, sin, attend, project: Project):
    """One decoder layer of the config's family: x (B, T, D) -> (B, T, D). `attend(q, k, v[, sinks])
    -> (o, state)` sees this layer's queries and new keys/values (rotated), and the layer's attention
    sinks (N,) where the config has them, and returns the attention output and whatever it updated
    (a cache, or None); a multi-head latent attention layer also passes `latent=` (kv_cache.Latent:
    what a latent cache stores and the up-projections), which only a latent cache reads. `project`
    runs every projection. A config's attention_scale is applied to the queries here, so every
    attend sees head_dim ** -0.5 scores."""
    family = family_lib.of(cfg)
    if cfg.attention_scale is not None:
        factor = cfg.attention_scale * cfg.head_dim**0.5
        unscaled = attend

        def attend(q, k, v, sinks=None, latent=None):
            return unscaled(q * jnp.asarray(factor, q.dtype), k, v, sinks, latent=latent)

    return family.layer(family, cfg, lp, x, cos, sin, attend, project)


def embed(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Token ids (...) -> their embedding rows (..., D), scaled when the config says so."""
    x = params["embed"][tokens]
    if cfg.embedding_scale is not None:
        x = x * jnp.asarray(cfg.embedding_scale, x.dtype)
    return x


def final_norm(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """The family's norm with params["final_norm"]: the last layer's output (..., D) -> the LM
    head's input."""
    return family_lib.of(cfg).norm(x, params["final_norm"], cfg.rms_norm_eps)


Ropes = tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array] | None]


def layer_ropes(cfg: ModelConfig, positions: jax.Array, dtype) -> Ropes:
    """The RoPE tables the layers rotate by: (cos, sin) of cfg.rope, and of cfg.local_rope (the
    sliding-window layers' own, Gemma 3) or None."""
    local = None if cfg.local_rope is None else rope_tables(cfg, positions, dtype, cfg.local_rope)
    return rope_tables(cfg, positions, dtype), local


def layer_rope(ropes: Ropes, window) -> tuple[jax.Array, jax.Array]:
    """The (cos, sin) of a layer with this window (an int, a traced int or an attention.LayerWindow):
    the local tables for a sliding-window layer when the config has them, else the global ones."""
    tables, local = ropes
    if local is None:
        return tables
    if isinstance(window, int):
        return local if window > 0 else tables
    is_local = attention.window_value(window) > 0
    return jnp.where(is_local, local[0], tables[0]), jnp.where(is_local, local[1], tables[1])


def _decoder(params, cfg, tokens, positions, cache, logits_at, batch, impl, project,
             all_hidden=False, aux_layers: tuple[int, ...] = ()) -> ForwardOutput:
    """Embed, run every layer under lax.scan (cache in the carry), final norm, LM head. With
    all_hidden, the hidden states of every token come back, not only those at logits_at; with
    aux_layers, the hidden states entering those layers too (the residual stream, as HF's
    output_hidden_states gives them: hidden_states[i] for layer i), kept in the scan's carry."""
    dtype = params["embed"].dtype
    project = project or dense_projection(impl)
    x = embed(params, cfg, tokens)  # (B, T, D)
    ropes = layer_ropes(cfg, positions, dtype)
    # A layer's window: a static int when every layer shares it or the layers are unrolled (the
    # Pallas kernels need it so); under the scan over layers with different windows, a LayerWindow.
    windows = tuple(sorted(set(cfg.layer_windows)))
    softcap = cfg.attn_softcap

    aux_ids = jnp.asarray(aux_layers, jnp.int32)  # (A,)

    def body(carry, xs):
        x, cache, aux = carry
        lp, window, index = xs
        if aux_layers:
            aux = jnp.where((aux_ids == index)[:, None, None, None], x[None], aux)  # (A, B, T, D)
        if not isinstance(window, int):
            window = windows[0] if len(windows) == 1 else attention.LayerWindow(window, windows)
        if cache is None:  # (a multi-head latent attention layer's latent: unused, its expanded form is exact)
            def attend(q, k, v, sinks=None, latent=None):
                if impl.kv_dtype:
                    k, v = fake_quantize(k, KV_DTYPES[impl.kv_dtype]), fake_quantize(v, KV_DTYPES[impl.kv_dtype])
                return attention.attend(q, k, v, positions, positions, window, impl=impl.attention,
                                        softcap=softcap, sinks=sinks), None
        else:
            def attend(q, k, v, sinks=None, latent=None):
                if isinstance(cache, PagedKVCache) and cache.latent and latent is not None:
                    return latent_attention.attend_latent(cache, index, q, latent, window, batch, impl=impl.attention,
                                                          softcap=softcap, sinks=sinks,
                                                          mla=(impl.mla_decode, impl.mla_prefill))
                return attention.attend_cached(cache, index, q, k, v, positions, window, batch, impl=impl.attention,
                                               softcap=softcap, sinks=sinks)
        x, cache = layer(cfg, lp, x, *layer_rope(ropes, window), attend, project)
        return (x, cache, aux), None

    aux = jnp.zeros((len(aux_layers), *x.shape), x.dtype) if aux_layers else None
    if not isinstance(params["layers"], (list, tuple)) and not cfg.family.uniform(cfg):
        params = unstack_layers(params, cfg)  # layers that differ: unrolled (the engine unstacks once, up front)
    if isinstance(params["layers"], (list, tuple)):  # one params dict per layer (unstack_layers): unrolled
        carry = (x, cache, aux)
        for i, lp in enumerate(params["layers"]):
            carry, _ = body(carry, (lp, cfg.layer_windows[i], i))
        x, cache, aux = carry
    else:
        window_index = jnp.asarray([windows.index(w) for w in cfg.layer_windows], jnp.int32)
        xs = (params["layers"], window_index, jnp.arange(cfg.num_layers))
        (x, cache, aux), _ = jax.lax.scan(body, (x, cache, aux), xs)

    if all_hidden:
        x = final_norm(params, cfg, x)  # (B, T, D)
    selected = x if logits_at is None else jnp.take_along_axis(x, logits_at[..., None], axis=1)  # (B, T', D)
    if not all_hidden:
        selected = x = final_norm(params, cfg, selected)
    logits = lm_head(params, cfg, selected)
    return ForwardOutput(logits=logits, hidden=x, cache=cache, aux=aux)


def head_weight(params: Params, cfg: ModelConfig) -> jax.Array:
    """The LM head as a dense (D, V) matrix: lm_head (dequantised where packed: a tied model
    quantised with a "-head" scheme has one too), or the tied embedding transposed."""
    if "lm_head" in params:
        return dense_weight(params["lm_head"], params["embed"].dtype)
    return params["embed"].T


def lm_head(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Final-norm hidden states (..., D) -> float32 logits (..., V), soft-capped when the config
    says so. A head padded past the vocabulary (split over a tensor-parallel mesh) has its padding
    cut off. A packed head ("-head" W8A8 schemes, tied or not) is multiplied as its format says."""
    head = params.get("lm_head")
    if head is not None and not isinstance(head, jax.Array | np.ndarray):  # packed ("-head" schemes)
        logits = matmul.linear(hidden.astype(jnp.float32), head)
    elif jax.default_backend() == "cpu":  # the tied embedding untransposed: XLA's CPU backend copies a
        # transposed one (bfloat16: converted; float32: a loop fusion with the final norm, cpu_int8.md)
        head, equation = (params["embed"], "...D,VD->...V") if head is None else (head, "...D,DV->...V")
        logits = matmul.dense_f32(hidden, head, equation)
    else:
        head = head_weight(params, cfg)
        logits = jnp.einsum("...D,DV->...V", hidden, head, preferred_element_type=jnp.float32)
    return softcap(cfg, logits[..., : cfg.vocab_size])


def softcap(cfg: ModelConfig, logits: jax.Array) -> jax.Array:
    """The logits soft-capped as the config says, cap * tanh(logits / cap) (unchanged without a cap)."""
    if cfg.logit_softcap is None:
        return logits
    return cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,  # (B, T) int32
    positions: jax.Array,  # (B, T) int32
    cache: KVCache | None = None,
    logits_at: jax.Array | None = None,  # (B, T') int32 indices into T; None = every token
    *,
    impl: Impl = Impl(),
    project: Project | None = None,
    aux_layers: tuple[int, ...] = (),
) -> ForwardOutput:
    """Run the decoder over tokens at the given positions: without a cache the tokens attend
    causally to each other; with a contiguous cache (passed in and returned) their K/V are
    written into it first and attention reads it. Logits are float32. Projection weights may be
    dense arrays or packed formats (jaxinfer.models.formats); impl.matmul picks how those are multiplied.
    aux_layers: the hidden states entering those layers come back too (out.aux (A, B, T, D))."""
    return _decoder(params, cfg, tokens, positions, cache, logits_at, None, impl, project, aux_layers=aux_layers)


def unstack_layers(params: Params, cfg: ModelConfig | None = None) -> Params:
    """params with the stacked layers split into one dict of arrays per layer (new buffers): the
    decoder then runs its layers unrolled, each weight an array of its own. On the CPU that is the
    fast layout: XLA multiplies a bfloat16 weight natively only when it is its own array (a scan
    over a stack converts the whole stack to float32 every call), and even float32 products over a
    scanned stack cost 1.5-3x (benchmarks/results/cpu_dots.md). Compile time grows with depth.
    With cfg, a param stacked over some layers only (Param.layers) goes to those layers' dicts; the
    layout of a model whose layers differ (family.uniform false), which cannot run under one scan."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    if cfg is None or cfg.family.uniform(cfg):
        L = next(iter(jax.tree.leaves(layers))).shape[0]
        return {**params, "layers": [jax.tree.map(lambda a, i=i: jnp.array(a[i]), layers) for i in range(L)]}
    per_layer = []
    for layer in range(cfg.num_layers):
        index = cfg.family.layer_params(cfg, layer)
        per_layer.append({name: jax.tree.map(lambda a, j=index[name]: jnp.array(a[j]), w)
                          for name, w in layers.items() if name in index})
    return {**params, "layers": per_layer}


def forward_paged(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,  # (N,) int32: one flat step, laid out as the BatchDescriptor says
    cache: PagedKVCache,
    batch: BatchDescriptor,
    *,
    impl: Impl = Impl(),
    project: Project | None = None,
    all_hidden: bool = False,
    aux_layers: tuple[int, ...] = (),
) -> ForwardOutput:
    """One mixed step over a paged cache: decode tokens and prompt chunks of many sequences at
    batch.positions, K/V written to batch.slot_mapping. Logits and hidden states (R, V), (R, D) at
    batch.logits_at (with all_hidden, the hidden states (N, D) of every token; with aux_layers, those
    entering each of the layers too, aux (A, N, D)); the updated cache."""
    out = _decoder(params, cfg, tokens[None], batch.positions[None], cache, batch.logits_at[None], batch, impl,
                   project, all_hidden, aux_layers)
    return ForwardOutput(logits=out.logits[0], hidden=out.hidden[0], cache=out.cache,
                         aux=None if out.aux is None else out.aux[:, 0])


_forward_jit = jax.jit(forward, static_argnames=("cfg", "impl"))


def forward_logits(model, tokens, *, attn_impl: str = "xla", matmul_impl: str = "xla") -> jax.Array:
    """int32[B, T] -> float32[B, T, V]: one full causal pass, no cache. The reference path."""
    if isinstance(tokens, str):
        raise ValueError("tokens is a string: tokenise it first (model.tokenizer.encode) and pass int32[B, T]")
    kind = np.asarray(tokens).dtype.kind
    if kind not in "iu":
        raise ValueError(f"tokens must be integer token ids int32[B, T], got dtype {np.asarray(tokens).dtype}")
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int32[B, T], got shape {tokens.shape}")
    cfg = model.config
    _check_tokens(tokens, cfg)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    with use_mesh(model.placement and model.placement.mesh):
        return _forward_jit(model.params, cfg, tokens, positions, impl=Impl(attn_impl, matmul_impl)).logits


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
