"""Model-family specs: everything a family is, stated once, and the registry that finds it.

A `Family` lists its parameters (`Param`: name, shape as a function of the config, role, HF / GGUF
/ PEFT names, the calibration input of each projection), the inputs projections share (`Site`:
where AWQ and SmoothQuant fold their per-channel factors), its norm, its activation, its layer
function and how it reads and writes HF's config.json. The decoder, the loaders (safetensors,
GGUF, AutoAWQ/GPTQ), sharding, LoRA, quantisation, the memory planner and the drafting heads read
it; none of them keeps a table of parameter names of its own. A new family is one file that builds
a Family and calls `register` (jaxinfer/models/llama.py is the example): the registry finds it by
HF `model_type` or `architectures` and by GGUF `general.architecture`.

Roles, and what each means to the code that reads them:
  embedding   (V, D) token embedding: gathered by row; vocab-parallel (rows split over tp)
  head        (D, V) LM head (absent when the config ties it to the embedding); columns split over tp
  norm        a norm's weight, scaled as the family's `Norm` says; replicated
  column      a projection (in, out) whose output is split over tp (q, k, v, gate, up)
  row         a projection (in, out) whose input is split over tp, all-reduced after (o, down)
  replicated  a projection (in, out) every tp shard holds whole (MLA's down-projections to its
              latents, which each shard's heads read in full)
  bias        a projection's bias (out,): split like a column projection's output, replicated
              after a row projection (added once, after the all-reduce)
  router      (D, E) a mixture-of-experts router: replicated; not a projection (never quantised or adapted)
  sink        (N,) a logit per query head (attention sinks, gpt-oss): split over tp by head
  expert_column, expert_row
              (E, in, out) one weight per expert, multiplied by the MoE layer's grouped matmul:
              split over tp like a column / row projection on its last two axes; not projections
              (no calibration input: quantisation and LoRA leave them as they are). HF stores one
              tensor per expert (the param's hf name holds an {expert} field), or all of them
              stacked (E, ...) in one (gpt-oss). Split over ep on E (expert parallelism).
  expert_bias (E, out) one bias per expert (gpt-oss), added by the MoE layer: split over ep on E like
              the expert weights, replicated over tp
Projections are stored (in, out), HF stores them (out, in): loaders transpose `column`, `row`,
`head`, `router` and expert tensors (unless the param says HF stores it (in, out): hf_in_out). Layer parameters are stacked over layers, (L, *shape(cfg)), for lax.scan. The
decoder names the top-level ones (TOP_LEVEL): embed, final_norm and (untied) lm_head.

The numbers a family's config.json carries per model (sliding windows per layer, an attention
scale, an embedding scale, a soft-cap on the logits) are ModelConfig fields that its read_config
sets and the decoder applies. (Soft-capping the attention scores, as Gemma 2 does, is not among
them: the attention implementations would have to apply it.)

A parameter name means one thing in every registered family (its role, bias, head layout): code
that sees params without a config (sharding a params pytree, the default projection hook) looks a
name up across families, and `register` refuses a family that would give a name a second meaning.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax

from jaxinfer.models.norms import (  # noqa: F401  (re-exported: the families name them here)
    ACTIVATIONS,
    NORM_KINDS,
    Norm,
    rms_norm,
)

if TYPE_CHECKING:
    from jaxinfer.models.config import ModelConfig

ROLES = ("embedding", "head", "norm", "column", "row", "replicated", "bias", "router", "sink", "expert_column", "expert_row",
         "expert_bias")
EXPERT_ROLES = ("expert_column", "expert_row")
TOP_LEVEL = {"embed": "embedding", "final_norm": "norm", "lm_head": "head"}  # name -> role
PROJECTION_ROLES = ("column", "row", "replicated")


# --- parameters and calibration sites ----------------------------------------------------------


def _always(cfg: ModelConfig) -> bool:
    del cfg
    return True


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of a family.

    name         key in params["layers"] (layer=True) or params (top level)
    role         one of ROLES (module docstring)
    shape        cfg -> one layer's shape (or the whole shape at the top level); projections (in, out)
    hf           HF tensor name; a layer parameter's after the family's hf_layer_prefix
    gguf         llama.cpp tensor name (a layer parameter's after "blk.{i}."), None: not in GGUF files.
                 Params that share one HF tensor (hf_part) share it: llama.cpp keeps HF's fused tensors
                 whole (Phi-3's attn_qkv, ffn_up). An expert param's names the (E, out, in) tensor
                 llama.cpp's converter stacks a layer's experts into
    layer        stacked over layers (False: top level)
    present      cfg -> whether this config has it (optional biases, q/k norms, an untied LM head)
    bias         a projection's bias parameter, if it has one
    calibration  a projection's input: the name of the family's Site that feeds it
    heads        "query" or "kv" where the output axis is heads x head_dim ("kv": stored tp / K times
                 when tp > K, see jaxinfer.sharding); None otherwise
    rotary       its output is rotated by RoPE (llama.cpp's converter reorders these rows for "llama")
    hf_part      cfg -> (axis, start, stop, step): the param is that strided slice, along `axis`, of
                 the HF tensor `hf`, which holds several params (Phi-3's qkv_proj and gate_up_proj:
                 blocks of rows; gpt-oss's experts' gate_up_proj: interleaved columns); loaders
                 split it, writers put the params back; None: the whole tensor
    hf_in_out    HF stores it as the params do, (in, out) (gpt-oss's stacked expert tensors): not
                 transposed on load
    adaptable    a LoRA adapter may adapt it (False: a weight a path reads whole rather than through the
                 projection hook: MLA's wkv_b, whose per-head parts the absorbed attention multiplies)
    layers       cfg -> the layers that have it (a range), stacked over those only; None: every layer.
                 A model whose layers differ (DeepSeek's dense first layers, then experts) runs its
                 layers unrolled (jaxinfer.models.decoder.unstack_layers)
    """

    name: str
    role: str
    shape: Callable[[ModelConfig], tuple[int, ...]]
    hf: str
    gguf: str | None = None
    layer: bool = True
    present: Callable[[ModelConfig], bool] = _always
    bias: str | None = None
    calibration: str | None = None
    heads: str | None = None
    rotary: bool = False
    hf_part: Callable[[ModelConfig], tuple[int, int, int, int]] | None = None
    hf_in_out: bool = False
    adaptable: bool = True
    layers: Callable[[ModelConfig], range] | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"param {self.name!r}: role={self.role!r} is not one of {ROLES}")
        if self.heads not in (None, "query", "kv"):
            raise ValueError(f"param {self.name!r}: heads={self.heads!r} is not None, 'query' or 'kv'")
        if self.is_projection != (self.calibration is not None):
            raise ValueError(f"param {self.name!r}: a projection (and only a projection) names its calibration input")

    @property
    def is_projection(self) -> bool:
        return self.role in PROJECTION_ROLES

    def layers_of(self, cfg: ModelConfig) -> range:
        """The layers a layer param is stacked over (its stack index j is layer layers_of(cfg)[j])."""
        return range(cfg.num_layers) if self.layers is None else self.layers(cfg)

    @property
    def transpose(self) -> bool:
        """HF stores it (out, in): transposed on load."""
        return self.role in (*PROJECTION_ROLES, *EXPERT_ROLES, "head", "router") and not self.hf_in_out

    @property
    def per_expert(self) -> bool:
        """One HF tensor per expert (the hf name's {expert} field), stacked on the param's axis 0."""
        return self.role in EXPERT_ROLES and "{expert}" in self.hf

    @property
    def peft(self) -> str | None:
        """The module path PEFT (and AutoAWQ / GPTQ) names a projection by, under a layer (None
        also for a projection stored inside a fused tensor: adapters and packed checkpoints of it
        are not read)."""
        return self.hf.removesuffix(".weight") if self.is_projection and self.hf_part is None else None


@dataclasses.dataclass(frozen=True)
class Site:
    """An input that projections share (the projections whose Param.calibration names it).

    features  cfg -> its width
    fold      the parameter that produces it and can take a per-channel factor 1/s exactly, so the
              projections' rows can take s (AWQ, SmoothQuant): a norm (its gain), or a projection
              (its output columns and its bias) whose output reaches this input linearly; None
              when the input also feeds something that cannot take s (a router and experts beside a
              shared expert): its projections are quantised unscaled
    grouped   the fold's columns reach the input through attention: a kv head's v column feeds
              the query heads of its group, so one factor serves the whole group
    """

    name: str
    features: Callable[[ModelConfig], int]
    fold: str | None
    grouped: bool = False


# The layer function: layer(family, cfg, lp, x (B, T, D), cos, sin, attend, project) -> (x, attend's state).
LayerFn = Callable[..., tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family (module docstring). The functions take the family as their first argument,
    so one function serves families that differ in data only.

    name                 ModelConfig.model_type (HF's model_type)
    architectures        HF config.json `architectures` it serves
    params               every parameter (top level and per layer)
    sites                the shared projection inputs, in layer order
    layer                the layer function (see LayerFn; jaxinfer.models.llama.layer)
    read_config          (family, config.json dict) -> ModelConfig; ConfigError naming what it cannot run
    write_config         (family, ModelConfig) -> config.json dict that read_config reads back
    norm, activation     its Norm; its MLP gate's activation by HF's hidden_act name (ACTIVATIONS)
    gguf_architectures   llama.cpp `general.architecture` values it serves
    gguf_reordered_rope  llama.cpp's converter reorders the rows of `rotary` params within each head
    gguf_config          (family, cfg, key) -> ModelConfig: the family's config from a GGUF file, given
                         the Llama-style cfg that jaxinfer.checkpoints.gguf read from the keys every
                         architecture shares and key(name[, default]), which reads `{arch}.{name}`
                         (without a default: a CheckpointError naming the key when it is absent); the
                         family's own keys (experts, soft-caps, windows) and what llama.cpp hard-codes
                         for it; the config's model_type may name another registered family, which
                         the file then loads as (a llama file with experts: Mixtral). None: the
                         shared keys say everything
    check_config         (family, ModelConfig) -> None, raising ValueError for a config read elsewhere
                         (a GGUF file) that the family cannot be; None: nothing to check
    hf_layer_prefix      HF name prefix of layer i's tensors, formatted with layer=i
    """

    name: str
    architectures: tuple[str, ...]
    params: tuple[Param, ...]
    sites: tuple[Site, ...]
    layer: LayerFn
    read_config: Callable[[Family, dict], ModelConfig]
    write_config: Callable[[Family, ModelConfig], dict]
    norm: Norm = Norm()
    activation: str = "silu"
    gguf_architectures: tuple[str, ...] = ()
    gguf_reordered_rope: bool = False
    gguf_config: Callable[[Family, ModelConfig, Callable[..., Any]], ModelConfig] | None = None
    check_config: Callable[[Family, ModelConfig], None] | None = None
    hf_layer_prefix: str = "model.layers.{layer}."

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"family {self.name!r}: activation={self.activation!r} is not one of {tuple(ACTIVATIONS)}")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.name!r} names a param twice: {names}")
        by_name = {p.name: p for p in self.params}
        top = {p.name: p.role for p in self.params if not p.layer}
        required = {k: v for k, v in TOP_LEVEL.items() if k != "lm_head"}
        if required.items() - top.items() or top.items() - TOP_LEVEL.items():
            raise ValueError(f"family {self.name!r}: the top-level params must be embed (embedding), final_norm "
                             f"(norm) and optionally lm_head (head), got {top}")
        sites = {s.name for s in self.sites}
        for p in self.params:
            if p.calibration is not None and p.calibration not in sites:
                raise ValueError(f"family {self.name!r}: {p.name}'s calibration input {p.calibration!r} is not a site")
            if p.bias is not None and (p.bias not in by_name or by_name[p.bias].role != "bias"):
                raise ValueError(f"family {self.name!r}: {p.name}'s bias {p.bias!r} is not a bias param")
        for s in self.sites:
            if s.fold is not None and s.fold not in by_name:
                raise ValueError(f"family {self.name!r}: site {s.name!r} folds into {s.fold!r}, not a param")

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"family {self.name!r} has no param {name!r}")

    @property
    def projections(self) -> tuple[str, ...]:
        """The layer projections (every column / row param), in params order."""
        return tuple(p.name for p in self.params if p.is_projection)

    def adaptable(self, cfg: ModelConfig) -> tuple[str, ...]:
        """The projections a LoRA adapter may adapt in this config: present, adaptable, in every layer
        (not DeepSeek's dense-only or expert-layer-only MLP projections)."""
        return tuple(p.name for p in self.present(cfg)
                     if p.is_projection and p.adaptable and len(p.layers_of(cfg)) == cfg.num_layers)

    def site_projections(self, site: str) -> tuple[str, ...]:
        """The projections that read one site's input."""
        return tuple(p.name for p in self.params if p.calibration == site)

    def present(self, cfg: ModelConfig) -> tuple[Param, ...]:
        """The params this config has."""
        return tuple(p for p in self.params if p.present(cfg))

    def param_shapes(self, cfg: ModelConfig) -> dict:
        """The shape of every parameter of this config, as a pytree of tuples shaped like the params."""
        shapes: dict[str, Any] = {"layers": {}}
        for p in self.present(cfg):
            if p.layer:
                shapes["layers"][p.name] = (len(p.layers_of(cfg)), *p.shape(cfg))
            else:
                shapes[p.name] = tuple(p.shape(cfg))
        return shapes

    def uniform(self, cfg: ModelConfig) -> bool:
        """Whether every layer has the same params (so the layers can run under one scan)."""
        return all(len(p.layers_of(cfg)) == cfg.num_layers for p in self.present(cfg) if p.layer)

    def layer_params(self, cfg: ModelConfig, layer: int) -> dict[str, int]:
        """The layer params layer `layer` has, each with its index in the param's stack."""
        out = {}
        for p in self.present(cfg):
            if p.layer and layer in p.layers_of(cfg):
                out[p.name] = p.layers_of(cfg).index(layer)
        return out

    def num_params(self, cfg: ModelConfig) -> int:
        shapes = self.param_shapes(cfg)
        return sum(math.prod(s) for s in shapes["layers"].values()) + sum(
            math.prod(s) for k, s in shapes.items() if k != "layers")

    def hf_name(self, p: Param, layer: int | None = None) -> str:
        """The HF tensor name of a parameter (of layer `layer` for a layer parameter)."""
        return self.hf_layer_prefix.format(layer=layer) + p.hf if p.layer else p.hf


# --- the registry ------------------------------------------------------------------------------

_FAMILIES: dict[str, Family] = {}
_BY_ARCHITECTURE: dict[str, str] = {}
_BY_GGUF: dict[str, str] = {}
_PARAMS: dict[str, tuple[Param, str]] = {}  # param name -> (its meaning, the family that first gave it)


def _meaning(p: Param) -> tuple:
    """What the name-only readers (sharding, the projection hook) take from a param."""
    return (p.role, p.layer, p.bias, p.heads)


def register(family: Family) -> Family:
    """Add a family to the registry. ValueError when one of its names already belongs to another
    family: its name (model_type; registering the same Family object again is a no-op), an
    architecture, a GGUF architecture, or a param name with another meaning. (A family is never
    replaced: programs compiled for a config of it would keep the old arithmetic.)"""
    if _FAMILIES.get(family.name, family) is not family:
        raise ValueError(f"model_type {family.name!r} is already a registered family")
    for arch in family.architectures:
        if _BY_ARCHITECTURE.get(arch, family.name) != family.name:
            raise ValueError(f"architecture {arch!r} is already served by family {_BY_ARCHITECTURE[arch]!r}")
    for arch in family.gguf_architectures:
        if _BY_GGUF.get(arch, family.name) != family.name:
            raise ValueError(f"GGUF architecture {arch!r} is already served by family {_BY_GGUF[arch]!r}")
    for p in family.params:
        known, owner = _PARAMS.get(p.name, (None, family.name))
        if known is not None and owner != family.name and _meaning(known) != _meaning(p):
            raise ValueError(f"family {family.name!r}: param {p.name!r} means (role, layer, bias, heads) = "
                             f"{_meaning(p)}, but {_meaning(known)} in family {owner!r}: give it another name")
    _FAMILIES[family.name] = family
    _BY_ARCHITECTURE.update(dict.fromkeys(family.architectures, family.name))
    _BY_GGUF.update(dict.fromkeys(family.gguf_architectures, family.name))
    for p in family.params:
        _PARAMS.setdefault(p.name, (p, family.name))
    return family


def names() -> tuple[str, ...]:
    """Every registered family's name (HF model_type), in registration order."""
    return tuple(_FAMILIES)


def get(name: str) -> Family:
    """The family of a model_type; ValueError naming the registered ones otherwise."""
    if name not in _FAMILIES:
        raise ValueError(f"model_type={name!r} is not a registered family (registered: {', '.join(_FAMILIES)})")
    return _FAMILIES[name]


def of(cfg: ModelConfig) -> Family:
    """The family of a config."""
    return get(cfg.model_type)


def by_architecture(arch: str) -> Family | None:
    name = _BY_ARCHITECTURE.get(arch)
    return None if name is None else _FAMILIES[name]


def by_gguf_architecture(arch: str) -> Family | None:
    name = _BY_GGUF.get(arch)
    return None if name is None else _FAMILIES[name]


def gguf_architectures() -> tuple[str, ...]:
    return tuple(_BY_GGUF)


def lookup_param(name: str) -> Param | None:
    """The param of this name in any registered family (its role, bias and head layout are the same
    in all of them); None for a name no family has (an adapter's layer index, ...)."""
    known = _PARAMS.get(name)
    return None if known is None else known[0]


def bias_of(name: str) -> str | None:
    """The bias param of a projection, by name (None: no bias, or not a projection)."""
    p = lookup_param(name)
    return None if p is None else p.bias


def has_expert_axis(name: str) -> bool:
    """A layer param stored (L, E, ...), one slice per expert: the experts' weights and biases."""
    p = lookup_param(name)
    return p is not None and p.role in (*EXPERT_ROLES, "expert_bias")


def parallel_style(name: str) -> str | None:
    """How a layer param is split over tp, by name: "column", "row", "column_bias" (a bias of a
    column projection, or attention sinks), "expert_column" / "expert_row" (per-expert weights), or
    None (replicated)."""
    p = lookup_param(name)
    if p is None or not p.layer:
        return None
    if p.role == "replicated":
        return None
    if p.is_projection or p.role in EXPERT_ROLES:
        return p.role
    if p.role == "sink":  # (L, N): split by head like a column projection's bias
        return "column_bias"
    if p.role == "bias":
        for q, _ in _PARAMS.values():
            if q.bias == name:
                return "column_bias" if q.role == "column" else None
    return None
