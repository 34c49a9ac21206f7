"""LoRA on device: adapter slots, each token's delta through the projection hook, merged weights,
and a forward pass with a different adapter per row.

An engine (or `forward_logits`) holds S slots, `LoraWeights`: every projection's A and B stacked
per layer and slot, the rank zero-padded to R (a power of two >= 16, which the Pallas kernels take
without a copy). Inside a jitted step, `with_adapters` gives each layer's params its index and returns the
projection hook, which reads that layer's rows of the slots and adds each token's delta to the
base projection, which goes through
jaxinfer.models.matmul.linear as always (dense or packed: a LoRA over an int4 base is QLoRA-style serving):

  y = x @ W (+ bias) + scale[l, s] * (x @ A[l, s]) @ B[l, s]     s: the token's slot; -1: no delta

scale[l, s] is the adapter's lora_alpha / r (or / sqrt(r)) where it adapts that projection of layer
l, else 0. `LoraBatch` says which slot each token uses, in a BatchDescriptor's flat layout: decode
tokens one adapter each (BGMV), prompt rows of C tokens one adapter per row (SGMV). lora_impl
"xla" gathers and einsums (pallas_kernels.lora_matmul.reference; a projection that no token's
adapter touches in a layer is skipped with lax.cond), "pallas" runs the BGMV / SGMV kernels
(interpreted on a CPU).

Axes: L layers, S slots, R slot rank, D_in / D_out a projection's input / output features.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinfer.buckets import next_power_of_2
from jaxinfer.checkpoints.model import Model
from jaxinfer.lora.adapter import LoraAdapter, check_fits
from jaxinfer.models import decoder as model_lib
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.formats import QuantizedWeight, dequantize
from jaxinfer.models.kv_cache import BatchDescriptor
from pallas_kernels import lora_matmul as kernel

IMPLEMENTATIONS = ("xla", "pallas")
MIN_SLOT_RANK = 16  # the smallest tensor-core dot


def slot_rank(max_rank: int) -> int:
    """The rank slots are stored at: max_rank rounded up to a power of two >= 16."""
    return next_power_of_2(max_rank, MIN_SLOT_RANK)


@dataclasses.dataclass(frozen=True)
class SlotConfig:
    """The adapter slots a model runner holds: num_slots adapters of rank up to max_rank, applied
    by impl ("xla" | "pallas")."""

    num_slots: int
    max_rank: int
    impl: str = "xla"

    def __post_init__(self):
        for name in ("num_slots", "max_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"lora_impl={self.impl!r} is not one of {IMPLEMENTATIONS}")

    @property
    def rank(self) -> int:
        return slot_rank(self.max_rank)


@struct.dataclass
class LoraWeights:
    """S adapter slots on device, every projection p of the model's family stacked per layer:
      a[p]      (L, S, D_in, R)  model dtype
      b[p]      (L, S, R, D_out) model dtype
      scale[p]  (L, S) float32   the slot's scale where its adapter adapts p in layer l, else 0
    """

    a: dict[str, jax.Array]
    b: dict[str, jax.Array]
    scale: dict[str, jax.Array]

    @classmethod
    def zeros(cls, cfg: ModelConfig, num_slots: int, rank: int, dtype) -> LoraWeights:
        shapes, L, projections = model_lib.param_shapes(cfg)["layers"], cfg.num_layers, cfg.family.adaptable(cfg)
        return cls(a={p: jnp.zeros((L, num_slots, shapes[p][1], rank), dtype) for p in projections},
                   b={p: jnp.zeros((L, num_slots, rank, shapes[p][2]), dtype) for p in projections},
                   scale={p: jnp.zeros((L, num_slots), jnp.float32) for p in projections})

    @property
    def num_slots(self) -> int:
        return next(iter(self.scale.values())).shape[-1]

    @property
    def rank(self) -> int:
        return next(iter(self.a.values())).shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


def slot_arrays(adapter: LoraAdapter | None, cfg: ModelConfig, rank: int):
    """One slot's contents on the host: a[p] (L, D_in, R), b[p] (L, R, D_out) float32, zero where
    the adapter leaves p alone or past its rank; scale[p] (L,). None: an empty slot."""
    shapes, L, projections = model_lib.param_shapes(cfg)["layers"], cfg.num_layers, cfg.family.adaptable(cfg)
    a = {p: np.zeros((L, shapes[p][1], rank), np.float32) for p in projections}
    b = {p: np.zeros((L, rank, shapes[p][2]), np.float32) for p in projections}
    scale = {p: np.zeros(L, np.float32) for p in projections}
    for (p, layer), (wa, wb) in ({} if adapter is None else adapter.weights).items():
        a[p][layer, :, : adapter.rank] = wa
        b[p][layer, : adapter.rank] = wb
        scale[p][layer] = adapter.scale
    return a, b, scale


@functools.partial(jax.jit, donate_argnums=0)
def _write(weights: LoraWeights, slot, a, b, scale) -> LoraWeights:
    put = lambda full, one: full.at[:, slot].set(one.astype(full.dtype))  # noqa: E731
    return LoraWeights(a=jax.tree.map(put, weights.a, a), b=jax.tree.map(put, weights.b, b),
                       scale=jax.tree.map(put, weights.scale, scale))


def write_slot(weights: LoraWeights, slot: int, adapter: LoraAdapter | None, cfg: ModelConfig) -> LoraWeights:
    """The slots with `slot` now holding `adapter` (None: emptied); `weights` is donated."""
    if adapter is not None and adapter.rank > weights.rank:
        raise ValueError(f"adapter rank {adapter.rank} is over the slots' rank {weights.rank}")
    return _write(weights, jnp.int32(slot), *slot_arrays(adapter, cfg, weights.rank))


@struct.dataclass
class LoraBatch:
    """Which slot each token of a flat batch uses (-1: none), in a BatchDescriptor's layout: Rd
    decode tokens, then Rp rows of C tokens (C = (N - Rd) / Rp), one adapter per row.
      decode_slots  (Rd,) int32
      row_slots     (Rp,) int32
    """

    decode_slots: jax.Array
    row_slots: jax.Array

    @classmethod
    def from_descriptor(cls, batch: BatchDescriptor) -> LoraBatch:
        """From batch.adapter_ids (N,): each decode token's, and each prompt row's first token's."""
        Rd, Rp, N = batch.num_decode, batch.num_prefill, batch.positions.shape[0]
        ids = batch.adapter_ids
        rows = ids[Rd :: (N - Rd) // Rp] if Rp else ids[:0]
        return cls(decode_slots=ids[:Rd], row_slots=rows)

    @classmethod
    def per_row(cls, slots: jax.Array) -> LoraBatch:
        """A (B, T) batch: row b uses slots[b]."""
        return cls(decode_slots=jnp.zeros((0,), jnp.int32), row_slots=slots)

    def offset(self, n) -> LoraBatch:
        """Every slot index moved by n (-1 stays -1)."""
        move = lambda s: jnp.where(s >= 0, s + n, -1)  # noqa: E731
        return LoraBatch(decode_slots=move(self.decode_slots), row_slots=move(self.row_slots))


def with_adapters(params: model_lib.Params, weights: LoraWeights, lora: LoraBatch, impl: model_lib.Impl,
                  lora_impl: str = "xla") -> tuple[model_lib.Params, model_lib.Project]:
    """The params and projection hook of a forward pass with adapters.

    The slots are not sliced per layer by the scan (that copies every slot of every layer on every
    step: on the CPU, 64 rank-16 slots cost the tiny model as much as the step itself): each
    layer's params carry its index (params["layers"]["lora_layer"], a scalar inside the scan), and
    the hook reads the stacked slots, flattened to L * S rows, at row layer * S + slot, so only the
    rows the tokens use are read."""
    L, S = next(iter(weights.scale.values())).shape
    flat = lambda x: x.reshape(L * S, *x.shape[2:])  # noqa: E731  (L, S, ...) -> (L * S, ...), no copy
    a, b, scale = (jax.tree.map(flat, t) for t in (weights.a, weights.b, weights.scale))
    base = model_lib.dense_projection(impl)

    def project(name: str, x: jax.Array, lp: model_lib.Params, group_sizes: jax.Array | None = None) -> jax.Array:
        if group_sizes is not None or name not in a:  # a per-expert weight, a projection in some layers only
            return base(name, x, lp, group_sizes)
        rows = lora.offset(lp["lora_layer"] * S)
        return apply(base(name, x, lp), x, a[name], b[name], scale[name], rows, lora_impl)

    if isinstance(params["layers"], (list, tuple)):  # per-layer params (decoder.unstack_layers)
        layers = [{**lp, "lora_layer": jnp.int32(i)} for i, lp in enumerate(params["layers"])]
        return {**params, "layers": layers}, project
    layer_index = jnp.arange(L, dtype=jnp.int32)
    return {**params, "layers": {**params["layers"], "lora_layer": layer_index}}, project


def apply(y, x, a, b, scale, lora: LoraBatch, impl: str = "xla") -> jax.Array:
    """y (B, T, D_out) + each token's delta from x (B, T, D_in), laid out as `lora` says."""
    B, T, D = x.shape
    O = y.shape[-1]
    xf, yf = x.reshape(B * T, D), y.reshape(B * T, O)
    Rd, Rp = lora.decode_slots.shape[0], lora.row_slots.shape[0]
    parts = []
    if Rd:  # one token per segment: BGMV
        parts.append(_segments(yf[:Rd, None], xf[:Rd, None], a, b, scale, lora.decode_slots, impl).reshape(Rd, O))
    if Rp:  # a row of C tokens per segment: SGMV
        C = (B * T - Rd) // Rp
        rows = _segments(yf[Rd:].reshape(Rp, C, O), xf[Rd:].reshape(Rp, C, D), a, b, scale, lora.row_slots, impl)
        parts.append(rows.reshape(Rp * C, O))
    if not parts:
        return y
    return (parts[0] if len(parts) == 1 else jnp.concatenate(parts)).reshape(B, T, O)


def _segments(y, x, a, b, scale, slots, impl):
    if impl == "pallas":
        return kernel.lora_matmul(y, x, a, b, scale, slots, interpret=jax.default_backend() == "cpu")
    live = jnp.any(jnp.where(slots >= 0, scale[jnp.maximum(slots, 0)], 0.0) != 0)
    return jax.lax.cond(live, lambda: kernel.reference(y, x, a, b, scale, slots), lambda: y)


# The reference paths -----------------------------------------------------------------------------


def merge(model: Model, adapter: LoraAdapter) -> Model:
    """The base model with the adapter folded into its weights, W + scale * a @ b (in float32, cast
    to the model dtype): the reference the batched path is checked against. A packed (quantised)
    projection the adapter touches is dequantised first, so the result is dense there."""
    check_fits(adapter, model.config, adapter.name or "adapter")
    layers = dict(model.params["layers"])
    for proj in adapter.projections:
        w = layers[proj]
        dense = np.array(dequantize(w) if isinstance(w, QuantizedWeight) else w, np.float32)  # (L, D_in, D_out), a copy
        for (p, layer), (a, b) in adapter.weights.items():
            if p == proj:
                dense[layer] += adapter.scale * (a @ b)
        layers[proj] = jnp.asarray(dense, model.dtype)
    return dataclasses.replace(model, params={**model.params, "layers": layers},
                               name=f"{model.name}+{adapter.name}" if adapter.name else model.name)


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "lora_impl"))
def _forward(params, cfg, tokens, weights, slots, *, impl, lora_impl):
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    params, project = with_adapters(params, weights, LoraBatch.per_row(slots), impl, lora_impl)
    return model_lib.forward(params, cfg, tokens, positions, impl=impl, project=project).logits


def forward_logits(model: Model, tokens, adapters: list[LoraAdapter | None], *, lora_impl: str = "xla",
                   attn_impl: str = "xla", matmul_impl: str = "xla") -> jax.Array:
    """int32[B, T] -> float32[B, T, V], row b under adapters[b] (None: the base model): one full
    causal pass, no cache, every distinct adapter in a slot of its own."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integer token ids int32[B, T], got {tokens.dtype} {tokens.shape}")
    if len(adapters) != tokens.shape[0]:
        raise ValueError(f"got {len(adapters)} adapters for {tokens.shape[0]} rows of tokens")
    model_lib._check_tokens(tokens, model.config)
    distinct = list({id(a): a for a in adapters if a is not None}.values())
    for i, a in enumerate(distinct):
        check_fits(a, model.config, a.name or f"adapters[{i}]")
    cfg = model.config
    weights = LoraWeights.zeros(cfg, max(len(distinct), 1), slot_rank(max([a.rank for a in distinct], default=1)),
                                model.dtype)
    for s, a in enumerate(distinct):
        weights = write_slot(weights, s, a, cfg)
    slots = np.asarray([-1 if a is None else [id(d) for d in distinct].index(id(a)) for a in adapters], np.int32)
    return _forward(model.params, cfg, jnp.asarray(tokens, jnp.int32), weights, jnp.asarray(slots),
                    impl=model_lib.Impl(attn_impl, matmul_impl), lora_impl=lora_impl)
