"""Tensor parallelism on jax.sharding: the device mesh, partition rules for every array a model
runs with, their placement, multi-host start-up, and the per-shard form of the Pallas kernels.

XLA's SPMD partitioner does all the communication. The params and the KV cache are placed once
with a NamedSharding each; the jitted programs take them as placed and the partitioner inserts an
all-reduce after each row-parallel projection and gathers what the sampler reads (the logits).
The layout is Megatron-LM's, by each parameter's role in its family's spec (jaxinfer.models.family;
the Llama-style names in brackets):

  mesh axes        "dp" (independent replicas: params and cache are replicated over it; the engine
                   runs one replica, dp=1), "ep" (expert parallel, below) and "tp" (tensor parallel)
  column-parallel  projections (L, D, out) [wq wk wv w_gate w_up]: out split over tp; their biases
                   (L, out) [bq bk bv] likewise
  row-parallel     projections (L, in, D) [wo w_down]: in split; their biases (L, D) [bo] replicated
                   (added after the all-reduce)
  vocab-parallel   the embedding (V, D) rows and the LM head (D, V) columns, V zero-padded up to a
                   multiple of tp (decoder.lm_head cuts the logits back to V)
  replicated       every norm
  KV cache         k, v (L, K, P, page, H) and int8 / fp8 scales (L, K, P, page): split over K
  QuantizedWeight  column-parallel: qweight, scales, zeros, mins split over N (perm replicated);
                   row-parallel: qweight rows and the scales / zeros / mins groups split together, so
                   every shard holds whole groups (the groups must split evenly over tp; per-channel
                   int8's single scale row is replicated); perm (GPTQ act order) replicated: the
                   input is permuted whole, which gathers it across the shards
  LoRA slots       column-parallel projection: A replicated, B split on its output;
                   row-parallel projection: A split on its input, B replicated

Expert parallelism (ep > 1, a mixture-of-experts model): the experts' weights (L, E, ...) and their
biases are split on E over "ep" as well as on F over "tp"; everything else is replicated over ep
(each ep group runs the attention and the router on every token, as one engine replica does). The
MoE layer then runs its experts per ep shard under shard_map (`ep_mesh`; jaxinfer.models.moe):
every shard sees all the tokens (they are replicated, so no all-to-all dispatch is needed), computes
the (token, expert) pairs routed to its E / ep experts, and one psum over "ep" sums the shards'
outputs. ep must divide num_experts; ep x tp devices are used.

KV heads fewer than tp (the tiny model's 2 at tp=4, Llama-3-70B's 8 at tp=16): each KV head is
stored tp / K times, as vLLM does, so every device holds one KV head; the params whose output is
laid out over KV heads (Param.heads == "kv": wk, wv, their packed forms, bk, bv) and the LoRA B of
such projections are widened the same way. tp must then be a multiple of K.
The placed model's config says K * replicas KV heads (the model as it runs); `logical_config`
gives back the checkpoint's. Any other tp that does not divide num_heads, num_kv_heads or
intermediate_size is refused with a ValueError naming the field, before anything is compiled.

With attention="pallas" or matmul="pallas" (or lora_impl="pallas") the kernels run per shard under
shard_map: a pallas_call is opaque to the partitioner. Each shard sees its own heads (attention),
its output columns (column-parallel matmuls) or its input rows, whose partial products are summed
with psum (row-parallel). `tp_mesh()` reads the mesh the caller set with `jax.set_mesh`; without
one, or with tp=1, the kernels run as they are.

Multi-host: `initialize(coordinator, num_processes, process_id)` calls jax.distributed.initialize
(arguments or JAX's own environment), after which jax.devices() lists every host's devices and
the same engine code runs in each process (one controller per host); host values are read back
with `to_host`, which works on arrays that span other hosts' devices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer.models import family as family_lib
from jaxinfer.models.act_formats import SimWeight, W8A8Weight
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.formats import MXFP4Weight, QuantizedWeight
from jaxinfer.models.kv_cache import KV_DTYPES, PagedKVCache
from jaxinfer.models.mesh import ep_mesh, per_ep_shard, per_shard, tp_mesh, use_mesh  # noqa: F401  (re-exported)

AXES = ("dp", "ep", "tp")


def _role(name: str) -> str | None:
    """A layer param's split, by name across the registered families: "column", "row",
    "column_bias" (a column projection's bias), or None (replicated)."""
    return family_lib.parallel_style(name)


def _widened(name: str) -> bool:
    """Whether a layer param's output is laid out over KV heads (stored tp / K times when tp > K)."""
    p = family_lib.lookup_param(name)
    return p is not None and p.layer and p.heads == "kv"


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a model's params live: the mesh, how many times each KV head is stored (tp > K), and
    the vocabulary rows of embed / lm_head after padding."""

    mesh: Mesh
    kv_replicas: int = 1
    padded_vocab: int = 0

    @property
    def tp(self) -> int:
        return self.mesh.shape["tp"]

    @property
    def ep(self) -> int:
        return self.mesh.shape.get("ep", 1)


def _check_degree(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


def make_mesh(tp: int = 1, dp: int = 1, devices=None, ep: int = 1) -> Mesh:
    """A ("dp", "ep", "tp") mesh over the first dp * ep * tp devices (jax.devices(): every host's,
    after `initialize`). A device's tp neighbours are adjacent in the list (one host's NVLink
    group), then its ep neighbours."""
    devices = jax.devices() if devices is None else list(devices)
    for name, value in (("tp", tp), ("ep", ep), ("dp", dp)):
        _check_degree(name, value)
    if dp * ep * tp > len(devices):
        raise ValueError(f"tp={tp} x ep={ep} x dp={dp} needs {dp * ep * tp} devices; {len(devices)} are present "
                         f"({devices[0].platform})")
    grid = np.asarray(devices[: dp * ep * tp], dtype=object).reshape(dp, ep, tp)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def kv_replicas(cfg: ModelConfig, tp: int) -> int:
    """How many times each KV head is stored at this tp (1 unless tp > num_kv_heads); raises
    ValueError naming the field a tp does not divide."""
    _check_degree("tp", tp)
    for name, value in (("num_heads", cfg.num_heads), ("intermediate_size", cfg.intermediate_size)):
        if value % tp:
            raise ValueError(f"tp={tp} does not divide {name}={value}")
    K = cfg.num_kv_heads
    if K % tp == 0:
        return 1
    if tp % K:
        raise ValueError(f"tp={tp} neither divides num_kv_heads={K} nor is a multiple of it (KV heads are "
                         "replicated only when tp is a multiple of their number)")
    return tp // K


def check_ep(cfg: ModelConfig, ep: int) -> None:
    """Raises ValueError when the model's experts cannot split over ep (a dense model, or an expert
    count ep does not divide)."""
    _check_degree("ep", ep)
    if ep > 1 and not cfg.num_experts:
        raise ValueError(f"ep={ep}: expert parallelism needs a mixture-of-experts model ({cfg.family.name} has no "
                         "experts)")
    if cfg.num_experts % ep:
        raise ValueError(f"ep={ep} does not divide num_experts={cfg.num_experts}")


def check(cfg: ModelConfig, tp: int, num_devices: int | None = None, ep: int = 1) -> int:
    """Every tp / ep check, before anything is placed or compiled: the model's dimensions, and
    tp x ep against the devices present. Returns the KV-head replicas."""
    replicas = kv_replicas(cfg, tp)
    check_ep(cfg, ep)
    num_devices = jax.device_count() if num_devices is None else num_devices
    if tp * ep > num_devices:
        what = f"tp={tp}" if ep == 1 else f"tp={tp} x ep={ep}"
        raise ValueError(f"{what} is more than the {num_devices} devices present")
    return replicas


def logical_config(model) -> ModelConfig:
    """The config of the checkpoint a model was loaded from (KV heads not replicated)."""
    placement = getattr(model, "placement", None)
    if placement is None or placement.kv_replicas == 1:
        return model.config
    return dataclasses.replace(model.config, num_kv_heads=model.config.num_kv_heads // placement.kv_replicas)


# Partition rules --------------------------------------------------------------------------------


def _experts_on(spec: P, ep: int) -> P:
    """A stacked expert array's spec (L, E, ...) with E split over "ep" when ep > 1."""
    if ep == 1:
        return spec
    full = (*spec, *[None] * (2 - len(spec)))
    return P(full[0], "ep", *full[2:])


def _quantized_spec(name: str, w: QuantizedWeight, tp: int, ep: int = 1) -> QuantizedWeight:
    """The specs of a stacked (L, ...) packed weight's fields, shaped like the weight (an expert
    weight (L, E, ...): the same after its expert axis, which is split over ep)."""
    if _role(name) in ("expert_column", "expert_row"):
        inner = _quantized_spec({"expert_column": "wq", "expert_row": "wo"}[_role(name)], w, tp)
        return jax.tree.map(lambda s: _experts_on(P(None, *s), ep), inner, is_leaf=lambda s: isinstance(s, P))
    if _role(name) is None:  # a replicated projection
        return jax.tree.map(lambda _: P(), w)
    if _role(name) == "column":
        cols = P(None, None, "tp")
        return w.replace(qweight=cols, scales=cols, zeros=cols if w.zeros is not None else None,
                         perm=P() if w.perm is not None else None, mins=cols if w.mins is not None else None)
    groups = w.scales.shape[-2]
    if groups % tp == 0:
        grouped = P(None, "tp", None)
    elif groups == 1 and w.bits == 8:  # per-channel int8: rows split freely, the one scale row replicated
        grouped = P()
    elif groups == 1:
        raise ValueError(f"layers.{name}: per-channel int{w.bits} cannot split its input rows over tp={tp} (4-bit "
                         "packing pairs rows across the whole column): quantise with a group size")
    else:
        raise ValueError(f"layers.{name}: {groups} groups of {w.group_size} input rows do not split evenly over "
                         f"tp={tp}: quantise with a group size that leaves a multiple of {tp} groups")
    return w.replace(qweight=P(None, "tp", None), scales=grouped, zeros=grouped if w.zeros is not None else None,
                     perm=P() if w.perm is not None else None, mins=grouped if w.mins is not None else None)


def _mxfp4_spec(name: str, w: MXFP4Weight, tp: int, ep: int = 1) -> MXFP4Weight:
    """A stacked (L, E, N, K // 32, 16) MXFP4 expert weight: split on N (expert_column) or on its
    blocks of K (expert_row), like the dense expert weight it stands for, and on E over ep."""
    if _role(name) == "expert_column":
        blocks, scales = P(None, None, "tp", None, None), P(None, None, "tp", None)
    elif w.scales.shape[-1] % tp:
        raise ValueError(f"layers.{name}: {w.scales.shape[-1]} MXFP4 blocks of input rows do not split evenly over "
                         f"tp={tp}")
    else:
        blocks, scales = P(None, None, None, "tp", None), P(None, None, None, "tp")
    return w.replace(blocks=_experts_on(blocks, ep), scales=_experts_on(scales, ep))


_LAYER_SPECS = {"column": P(None, None, "tp"), "row": P(None, "tp", None), "column_bias": P(None, "tp"),
                "expert_column": P(None, None, None, "tp"), "expert_row": P(None, None, "tp", None)}
_TOP_SPECS = {"embedding": P("tp", None), "head": P(None, "tp")}


def param_specs(params: dict, tp: int, ep: int = 1) -> dict:
    """A PartitionSpec for every array of a (padded, widened) params pytree, in its structure, by
    each param's role (norms, row biases and a LoRA layer index replicated; the experts' weights
    and biases split on E over ep)."""
    layers = {}
    for name, w in params["layers"].items():
        if isinstance(w, QuantizedWeight):
            layers[name] = _quantized_spec(name, w, tp, ep)
        elif isinstance(w, MXFP4Weight):
            layers[name] = _mxfp4_spec(name, w, tp, ep)
        elif family_lib.has_expert_axis(name):
            layers[name] = _experts_on(_LAYER_SPECS.get(_role(name), P()), ep)
        else:
            layers[name] = _LAYER_SPECS.get(_role(name), P())
    specs = {"layers": layers}
    for name in params:
        if name != "layers":
            p = family_lib.lookup_param(name)
            specs[name] = _TOP_SPECS.get(p.role if p is not None else None, P())
    return specs


def cache_specs(cache: PagedKVCache) -> PagedKVCache:
    """K and V pages and their scales split over the KV heads (axis 1); a latent cache (multi-head
    latent attention: one row per token that every head reads) whole on every shard."""
    return jax.tree.map(lambda x: P() if cache.latent else P(None, "tp"), cache)


def lora_specs(weights):
    """jaxinfer.lora.LoraWeights: A of a column-parallel projection replicated and its B split on
    the output; the reverse for a row-parallel one; the scales replicated."""
    a = {p: P(None, None, "tp", None) if _role(p) == "row" else P() for p in weights.a}
    b = {p: P(None, None, None, "tp") if _role(p) == "column" else P() for p in weights.b}
    return type(weights)(a=a, b=b, scale={p: P() for p in weights.scale})


def parallel_style(name: str) -> str | None:
    """How a projection is split: "column", "row", or None (not a projection)."""
    style = _role(name)
    return style if style in ("column", "row") else None


# Placement --------------------------------------------------------------------------------------


def _is_spec(x) -> bool:
    return isinstance(x, P)


def put(tree, specs, mesh: Mesh):
    """Place host or device values on the mesh, each array as its spec says. Built from host copies
    shard by shard, so it works across processes (each passes the same values)."""

    def one(x, spec):
        if x is None:
            return None
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec), lambda index: host[index])

    return jax.tree.map(one, tree, specs, is_leaf=lambda x: x is None)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _widen_heads(x, head_dim: int, replicas: int):
    """(..., K * H) -> (..., K * replicas * H): KV head j becomes heads j * replicas .. + replicas - 1."""
    x = np.asarray(x)
    *lead, KH = x.shape
    heads = x.reshape(*lead, KH // head_dim, head_dim)
    return np.repeat(heads, replicas, axis=-2).reshape(*lead, KH * replicas)


def widen_kv(params: dict, cfg: ModelConfig, replicas: int) -> dict:
    """params with the params laid out over KV heads (wk, wv (dense or packed: every field along
    N), bk, bv) widened `replicas` times."""
    if replicas == 1:
        return params
    layers = dict(params["layers"])
    for name in [n for n in layers if _widened(n)]:
        w = layers[name]
        if isinstance(w, QuantizedWeight):
            widen = lambda x: None if x is None else _widen_heads(x, cfg.head_dim, replicas)  # noqa: E731
            layers[name] = w.replace(qweight=widen(w.qweight), scales=widen(w.scales), zeros=widen(w.zeros),
                                     mins=widen(w.mins))
        else:
            layers[name] = _widen_heads(w, cfg.head_dim, replicas)
    return {**params, "layers": layers}


def pad_vocab(params: dict, padded: int) -> dict:
    """embed (V, D) and lm_head (D, V) zero-padded to `padded` vocabulary rows / columns."""
    out = dict(params)
    embed = np.asarray(params["embed"])
    out["embed"] = np.pad(embed, ((0, padded - embed.shape[0]), (0, 0)))
    if "lm_head" in params:
        head = np.asarray(params["lm_head"])
        out["lm_head"] = np.pad(head, ((0, 0), (0, padded - head.shape[1])))
    return out


def shard_model(model, mesh: Mesh):
    """The model with its params placed on the mesh (a new Model; `model` is unchanged): checked,
    KV heads widened where tp > K, the vocabulary padded, every array put as `param_specs` says.
    A model already placed on this mesh comes back as it is."""
    placement = getattr(model, "placement", None)
    if placement is not None:
        if placement.mesh == mesh:
            return model
        raise ValueError(f"the model is placed on a mesh of tp={placement.tp}, ep={placement.ep}; place the unplaced "
                         "model instead")
    tp, ep = mesh.shape["tp"], mesh.shape.get("ep", 1)
    unruled = {f"layers.{n}": w for n, w in model.params["layers"].items() if isinstance(w, W8A8Weight | SimWeight)}
    unruled |= {n: w for n, w in model.params.items() if n != "layers" and isinstance(w, W8A8Weight | SimWeight)}
    if unruled:
        name, w = next(iter(unruled.items()))
        raise ValueError(f"{name} is a {type(w).__name__}: W8A8 and simulated weights have no partition rules; serve "
                         "them without a mesh (tp = ep = 1)")
    replicas = check(model.config, tp, mesh.size, ep)
    cfg = dataclasses.replace(model.config, num_kv_heads=model.config.num_kv_heads * replicas)
    padded = math.ceil(model.config.vocab_size / tp) * tp
    params = pad_vocab(widen_kv(model.params, model.config, replicas), padded)
    specs = param_specs(params, tp, ep)  # checks packed weights' groups before anything is placed
    return dataclasses.replace(model, config=cfg, params=put(params, specs, mesh),
                               placement=Placement(mesh, replicas, padded))


def zeros_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype, kv_dtype: str | None,
                mesh: Mesh) -> PagedKVCache:
    """PagedKVCache.zeros made shard by shard on the mesh (no device ever holds the whole cache)."""
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype={kv_dtype!r} is not one of None, {', '.join(map(repr, KV_DTYPES))}")
    make = lambda: PagedKVCache.zeros(cfg, num_pages, page_size, dtype, kv_dtype)  # noqa: E731
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(jax.eval_shape(make)))
    return jax.jit(make, out_shardings=shardings)()


def zeros(shape, dtype, mesh: Mesh, spec=P()) -> jax.Array:
    """An array of zeros made on the mesh as `spec` says."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=NamedSharding(mesh, spec))()


def widen_adapter(adapter, head_dim: int, replicas: int):
    """A jaxinfer.lora.LoraAdapter with the B of wk / wv widened like the weights they adapt."""
    if replicas == 1:
        return adapter
    weights = {(p, layer): (a, _widen_heads(b, head_dim, replicas) if _widened(p) else b)
               for (p, layer), (a, b) in adapter.weights.items()}
    return dataclasses.replace(adapter, weights=weights)


def nbytes_per_device(tree) -> dict:
    """Bytes each device holds of a pytree of placed arrays, measured from their shards."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return per_device


# Multi-host -------------------------------------------------------------------------------------


def initialize(coordinator: str = "", num_processes: int | None = None, process_id: int | None = None) -> None:
    """jax.distributed.initialize: one process (controller) per host, then jax.devices() lists every
    host's devices. Empty arguments are read from JAX's environment (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID) or a cluster JAX detects (SLURM, ...)."""
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator or None, num_processes=num_processes,
                               process_id=process_id)


def to_host(x: jax.Array) -> np.ndarray:
    """A device array's value on this host, also when it spans other hosts' devices."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def place_model(model, tp: int, ep: int = 1):
    """The model on a mesh of the first tp x ep devices (checked before anything is placed or
    compiled), or as it is: tp = ep = 1 and unplaced, or already placed on such a mesh."""
    placement = getattr(model, "placement", None)
    if placement is not None:
        if (placement.tp, placement.ep) != (tp, ep):
            raise ValueError(f"tp={tp}, ep={ep}, but the model is placed on tp={placement.tp}, ep={placement.ep}")
        return model
    if tp * ep == 1 or getattr(model, "params", None) is None:
        return model
    check(model.config, tp, ep=ep)
    return shard_model(model, make_mesh(tp, ep=ep))
