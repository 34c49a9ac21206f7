"""LoRA adapters in PEFT's format: load one, check it against a base model, write one, draw one.

A PEFT LoRA adapter is a directory as `peft`'s `save_pretrained` writes it:
  adapter_config.json        r, lora_alpha, use_rslora, target_modules, layers_to_transform, ...
  adapter_model.safetensors  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight (r, in),
                             ...lora_B.weight (out, r), for each projection it adapts
(module paths are the family's: Param.peft in jaxinfer.models.family, q/k/v/o under self_attn and
gate/up/down under mlp for Llama, Mistral, Qwen2 and Qwen3). The adapter adds to a projection
  y = x @ W + scale * (x @ A^T) @ B^T,   scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora),
which `LoraAdapter` holds in the (in, out) layout of jaxinfer's params: a = A^T (in, r), b = B^T
(r, out), float32 on the host. target_modules may be short names ("q_proj"), full module paths
("model.layers.0.self_attn.q_proj", matched as PEFT does: equal, or a suffix after a dot), a
regular expression (one string, matched in full) or "all-linear".

Options jaxinfer does not implement raise `AdapterError` naming them (DoRA, biases, modules_to_save,
embedding or LM-head targets, per-module rank or alpha patterns, ...), as does a file that is
missing or unreadable, a tensor that is unexpected or mis-shaped, and (`check_fits`) an adapter
whose modules, layers or shapes do not fit the base model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxinfer.models import decoder as model_lib
from jaxinfer.models import family as family_lib
from jaxinfer.models.config import ModelConfig, read_json_object
from jaxinfer.models.llama import LLAMA

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The Llama-style families' projections -> their PEFT module paths under a decoder layer (a model's
# own: its family's Param.peft).
MODULES = {name: LLAMA.param(name).peft for name in LLAMA.projections}
PROJECTIONS = tuple(MODULES)
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # lora_alpha beyond it (or not finite) scales the delta to inf
_TENSOR = re.compile(  # module path, A | B (an adapter name before .weight in old files)
    r"base_model\.model\.(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight")


def _layer_modules() -> list[tuple[re.Pattern, str, dict[str, str]]]:
    """For each registered family: (its layer prefix as a pattern with the layer as group 1, the
    prefix itself, {PEFT module path under a layer: projection})."""
    out = []
    for family in map(family_lib.get, family_lib.names()):
        prefix = re.escape(family.hf_layer_prefix).replace(re.escape("{layer}"), r"(\d+)")
        out.append((re.compile(prefix + "(.+)"), family.hf_layer_prefix,
                    {family.param(p).peft: p for p in family.projections if family.param(p).peft}))
    return out


def _module_projection(module: str) -> tuple[int, str, str] | None:
    """(layer, projection, module path with a {layer} field) of a full PEFT module path, read by the
    registered families' names; None when no family has such a projection."""
    for pattern, prefix, projections in _layer_modules():
        m = pattern.fullmatch(module)
        if m and m.group(2) in projections:
            return int(m.group(1)), projections[m.group(2)], prefix + m.group(2)
    return None


def model_modules(cfg: ModelConfig) -> dict[str, str]:
    """{projection: module path with a {layer} field} of a base model (its family's names); the
    projections inside a fused tensor (Phi-3's qkv_proj, gate_up_proj) have none and are not adapted."""
    family = cfg.family
    return {p: family.hf_layer_prefix + family.param(p).peft for p in family.adaptable(cfg) if family.param(p).peft}


def _short_names() -> set[str]:
    """The last component of every registered projection's module path (q_proj, ...)."""
    return {path.split(".")[-1] for _, _, projections in _layer_modules() for path in projections}


def _not_adaptable() -> set[str]:
    """Modules PEFT could target that jaxinfer does not adapt: the embeddings and LM heads."""
    return {p.hf.removesuffix(".weight") for family in map(family_lib.get, family_lib.names())
            for p in family.params if p.role in ("embedding", "head")}


def _order(projection: str) -> int:
    """A projection's place in the registered families' params (adapters list theirs in this order)."""
    names = list(dict.fromkeys(p for family in map(family_lib.get, family_lib.names()) for p in family.projections))
    return names.index(projection) if projection in names else len(names)
# Options that must be absent or empty (false, None, {}, []): option -> what it is.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "rank_pattern": "rank_pattern (a rank per module)",
    "alpha_pattern": "alpha_pattern (an alpha per module)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)",
    "layer_replication": "layer_replication",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "exclude_modules": "exclude_modules",
    "use_qalora": "QA-LoRA",
    "target_parameters": "target_parameters (LoRA on parameters, not modules)",
    "trainable_token_indices": "trainable_token_indices (embedding targets)",
    "alora_invocation_tokens": "aLoRA (activated LoRA)",
    "megatron_config": "megatron_config",
}


class AdapterError(ValueError):
    """An adapter that cannot be read, or does not fit the base model; the message names the problem."""


@dataclasses.dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A LoRA adapter on the host, in jaxinfer's (in, out) layout.

      weights  {(projection, layer): (a (in, r), b (r, out))} float32, for every module it adapts
      modules  {projection: its module path with a {layer} field} as the adapter names it
               ("model.layers.{layer}.self_attn.q_proj"); None: the Llama-style names (MODULES)
    target_modules and layers_to_transform are as the config gives them (checked against a base
    model by `check_fits`); name is the directory's name unless given.
    """

    rank: int
    alpha: float
    use_rslora: bool
    weights: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]
    target_modules: tuple[str, ...] | str
    layers_to_transform: tuple[int, ...] | None = None
    name: str = ""
    modules: dict[str, str] | None = None

    def module(self, projection: str) -> str:
        """The module path of one of its projections, with a {layer} field."""
        if self.modules is not None:
            return self.modules[projection]
        return LLAMA.hf_layer_prefix + MODULES[projection]

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def projections(self) -> list[str]:
        """The projections it adapts in at least one layer, in the registered families' order."""
        return sorted({name for name, _ in self.weights}, key=_order)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def peft_name(projection: str, layer: int, which: str, adapter: LoraAdapter | None = None) -> str:
    """The tensor name PEFT writes for a projection's lora_A or lora_B ("A" / "B") in a layer (the
    adapter's module names; without one, the Llama-style names)."""
    module = adapter.module(projection) if adapter is not None else LLAMA.hf_layer_prefix + MODULES[projection]
    return f"base_model.model.{module.format(layer=layer)}.lora_{which}.weight"


# Loading -----------------------------------------------------------------------------------------


def load_adapter(path: str | os.PathLike, name: str | None = None) -> LoraAdapter:
    """A PEFT LoRA adapter from a local directory; AdapterError (a ValueError) names what is wrong."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise AdapterError(f"adapter {path!r} is not a directory")
    config_path, weights_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(config_path):
        raise AdapterError(f"no {CONFIG_FILE} in {path}")
    config = read_json_object(config_path, "adapter settings", AdapterError)
    rank, alpha, use_rslora, targets, layers = _read_config(config, config_path)
    if not os.path.exists(weights_path):
        other = " (adapter_model.bin is a pickle: save with safe_serialization=True)" if os.path.exists(
            os.path.join(path, "adapter_model.bin")) else ""
        raise AdapterError(f"no {WEIGHTS_FILE} in {path}{other}")
    weights, modules = _read_weights(weights_path, rank)
    if not weights:
        raise AdapterError(f"{weights_path} holds no LoRA weights")
    return LoraAdapter(rank, alpha, use_rslora, weights, targets, layers,
                       name=name or os.path.basename(path.rstrip("/")), modules=modules)


def _read_config(config: dict, where: str):
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type={config['peft_type']!r} is not 'LORA'")
    for option, what in _UNSUPPORTED.items():
        if config.get(option):
            raise AdapterError(f"{where}: {option}={config[option]!r}: {what} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
    if config.get("layers_pattern") not in (None, "layers", ["layers"]):
        raise AdapterError(f"{where}: layers_pattern={config['layers_pattern']!r} is not supported (only 'layers')")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{where}: r={rank!r} must be an integer >= 1")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not abs(alpha) < _FLOAT32_MAX:
        raise AdapterError(f"{where}: lora_alpha={alpha!r} must be a number of float32 range")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(targets)
        for t in targets:
            _check_target(t, where)
    elif not isinstance(targets, str) or not targets:
        raise AdapterError(f"{where}: target_modules={targets!r} must be a list of module names or a regex")
    layers = config.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    elif layers is not None:
        if not isinstance(layers, list) or not layers or not all(isinstance(i, int) and i >= 0 for i in layers):
            raise AdapterError(f"{where}: layers_to_transform={layers!r} must be a layer index or a non-empty list "
                               "of them (PEFT adapts no module for an empty one)")
        layers = tuple(layers)
    return rank, float(alpha), bool(config.get("use_rslora", False)), targets, layers


def _check_target(target, where: str) -> None:
    """A target_modules entry must name a projection of a registered family (short or full path)."""
    if not isinstance(target, str):
        raise AdapterError(f"{where}: target_modules entry {target!r} is not a module name")
    last = target.split(".")[-1]
    if last in {m.split(".")[-1] for m in _not_adaptable()}:
        raise AdapterError(f"{where}: target_modules entry {target!r}: embedding and LM-head targets are not supported")
    if last not in _short_names():
        raise AdapterError(f"{where}: target_modules entry {target!r} is not one of the projections "
                           f"{', '.join(sorted(_short_names()))} (or a module path ending in one)")


def _read_weights(path: str, rank: int) -> tuple[dict[tuple[str, int], tuple[np.ndarray, np.ndarray]], dict]:
    """{(projection, layer): (a (in, r), b (r, out))}, every tensor's name and shape checked, and
    {projection: module path with a {layer} field} as the file names them."""
    found: dict[tuple[str, int, str], np.ndarray] = {}
    modules: dict[str, str] = {}
    try:
        f = safe_open(path, framework="flax")  # numpy cannot read bfloat16 tensors
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path} is not a readable safetensors file (empty or truncated?): {e}") from None
    with f:
        for key in f.keys():
            m = _TENSOR.fullmatch(key)
            parsed = None if m is None else _module_projection(m.group(1))
            if parsed is None:
                what = ("embedding and LM-head targets are not supported" if re.search(r"embed|lm_head", key)
                        else "not the lora_A / lora_B weight of a projection of a registered model family")
                raise AdapterError(f"{path}: unexpected tensor {key!r}: {what}")
            layer, proj, template = parsed
            if modules.setdefault(proj, template) != template:
                raise AdapterError(f"{path}: {proj} is named both {modules[proj]!r} and {template!r}")
            shape = tuple(f.get_slice(key).get_shape())
            which = m.group(2)
            if len(shape) != 2 or shape[0 if which == "A" else 1] != rank:
                want = "(r, in)" if which == "A" else "(out, r)"
                raise AdapterError(f"{path}: tensor {key!r} has shape {shape}, expected {want} with r={rank}")
            found[proj, layer, which] = np.asarray(f.get_tensor(key).astype(jnp.float32))
    weights = {}
    for (proj, layer, which), x in found.items():
        other = "B" if which == "A" else "A"
        if (proj, layer, other) not in found:
            missing = f"base_model.model.{modules[proj].format(layer=layer)}.lora_{other}.weight"
            raise AdapterError(f"{path}: missing tensor {missing!r} (its lora_{which} is there)")
        if which == "A":
            weights[proj, layer] = (x.T, found[proj, layer, "B"].T)
    for proj in {p for p, _ in weights}:
        shapes = {(a.shape[0], b.shape[1]) for (p, _), (a, b) in weights.items() if p == proj}
        if len(shapes) > 1:
            raise AdapterError(f"{path}: the {modules[proj].format(layer='*')} tensors disagree on (in, out) across "
                               f"layers: {sorted(shapes)}")
    return dict(sorted(weights.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1]))), modules


# Fitting a base model ------------------------------------------------------------------------------


def expected_modules(adapter: LoraAdapter, cfg: ModelConfig) -> set[tuple[str, int]]:
    """The (projection, layer) pairs the adapter's config targets in a base model of this config,
    matched as PEFT matches target_modules against the model's module names."""
    targets = adapter.target_modules
    layers = range(cfg.num_layers) if adapter.layers_to_transform is None else adapter.layers_to_transform
    out = set()
    for proj, path in model_modules(cfg).items():
        for i in layers:
            module = path.format(layer=i)
            if targets == "all-linear":
                hit = True
            elif isinstance(targets, str):
                hit = re.fullmatch(targets, module) is not None
            else:
                hit = any(module == t or module.endswith("." + t) for t in targets)
            if hit:
                out.add((proj, i))
    return out


def check_fits(adapter: LoraAdapter, cfg: ModelConfig, name: str = "adapter") -> None:
    """Raise AdapterError naming the first thing about the adapter that does not fit this base model:
    a target no projection matches, a layer past the model's, a missing or mis-shaped tensor."""
    if isinstance(adapter.target_modules, str) and adapter.target_modules != "all-linear":
        for module in sorted(_not_adaptable()):
            if re.fullmatch(adapter.target_modules, module):
                raise AdapterError(f"{name}: target_modules={adapter.target_modules!r} matches {module}: "
                                   "embedding and LM-head targets are not supported")
    if adapter.layers_to_transform and max(adapter.layers_to_transform) >= cfg.num_layers:
        raise AdapterError(f"{name}: layers_to_transform={list(adapter.layers_to_transform)} names a layer past "
                           f"the model's {cfg.num_layers}")
    modules = model_modules(cfg)
    for proj in adapter.projections:
        if proj in modules and adapter.module(proj) != modules[proj]:
            raise AdapterError(f"{name}: adapts {adapter.module(proj).format(layer='*')}, but this model's {proj} is "
                               f"{modules[proj].format(layer='*')} ({cfg.model_type})")
    expected = expected_modules(adapter, cfg)
    if not expected:
        raise AdapterError(f"{name}: target_modules={adapter.target_modules!r} matches no projection of this model")
    present = set(adapter.weights)
    extra = sorted(present - expected, key=lambda k: (k[1], _order(k[0])))
    if extra:
        proj, layer = extra[0]
        where = f"layer {layer} is past the model's {cfg.num_layers}" if layer >= cfg.num_layers else \
            f"target_modules={adapter.target_modules!r} and layers_to_transform do not name it"
        raise AdapterError(f"{name}: tensor {peft_name(proj, layer, 'A', adapter)!r} does not fit: {where}")
    missing = sorted(expected - present, key=lambda k: (k[1], _order(k[0])))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        proj, layer = missing[0]
        tensor = f"base_model.model.{modules[proj].format(layer=layer)}.lora_A.weight"
        raise AdapterError(f"{name}: missing tensor {tensor!r}{more}")
    shapes = model_lib.param_shapes(cfg)["layers"]
    for (proj, layer), (a, b) in adapter.weights.items():
        d_in, d_out = shapes[proj][1:]
        if a.shape[0] != d_in or b.shape[1] != d_out:
            raise AdapterError(
                f"{name}: tensors of {cfg.family.param(proj).peft} (layer {layer}) are for a "
                f"({a.shape[0]} -> {b.shape[1]}) "
                f"projection; the model's is ({d_in} -> {d_out}): lora_A {(adapter.rank, a.shape[0])}, expected "
                f"{(adapter.rank, d_in)}; lora_B {(b.shape[1], adapter.rank)}, expected {(d_out, adapter.rank)}")


# Writing and drawing ---------------------------------------------------------------------------------


def save_adapter(adapter: LoraAdapter, path: str | os.PathLike) -> None:
    """Write the adapter as PEFT does (adapter_config.json, adapter_model.safetensors, float32), so
    both `load_adapter` and `peft.PeftModel.from_pretrained` read it."""
    os.makedirs(path, exist_ok=True)
    targets = adapter.target_modules if isinstance(adapter.target_modules, str) else list(adapter.target_modules)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
              "use_rslora": adapter.use_rslora, "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
              "layers_to_transform": None if adapter.layers_to_transform is None else list(adapter.layers_to_transform),
              "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None, "inference_mode": True}
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {}
    for (proj, layer), (a, b) in adapter.weights.items():
        tensors[peft_name(proj, layer, "A", adapter)] = np.ascontiguousarray(a.T, np.float32)
        tensors[peft_name(proj, layer, "B", adapter)] = np.ascontiguousarray(b.T, np.float32)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})


def random_adapter(cfg: ModelConfig, rank: int, projections=None, *, alpha: float | None = None,
                   use_rslora: bool = False, layers: tuple[int, ...] | None = None, std: float = 0.02,
                   seed: int = 0, name: str = "") -> LoraAdapter:
    """An adapter with N(0, std) weights (A and B both: a trained adapter's B is not zero) for a
    base config: `projections` (None: all of its family's) in `layers` (None: all), lora_alpha =
    2 * rank unless given."""
    modules = model_modules(cfg)
    projections = tuple(modules) if projections is None else projections
    rng = np.random.default_rng(seed)
    shapes = model_lib.param_shapes(cfg)["layers"]
    weights = {}
    for proj in projections:
        d_in, d_out = shapes[proj][1:]
        for i in range(cfg.num_layers) if layers is None else layers:
            weights[proj, i] = (rng.normal(0, std, (d_in, rank)).astype(np.float32),
                                rng.normal(0, std, (rank, d_out)).astype(np.float32))
    targets = tuple(modules[p].split(".")[-1] for p in projections)
    return LoraAdapter(rank, float(2 * rank if alpha is None else alpha), use_rslora, weights, targets,
                       None if layers is None else tuple(layers), name=name,
                       modules={p: modules[p] for p in projections})
