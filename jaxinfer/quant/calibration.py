"""Calibration activations for AWQ, GPTQ and SmoothQuant: token windows, and a layer-by-layer runner that
records what every projection of a layer sees.

`run_layers` embeds the calibration windows once and walks the decoder one layer at a time. For
layer l it runs the layer over the calibration set in jitted chunks and reduces the inputs of its
projections to `InputStats` (the Gram matrix X^T X, the sum of |x| and the largest |x| per
channel): enough for GPTQ's Hessian, AWQ's activation statistic and its output-error searches, and
SmoothQuant's and static FP8's activation maxima, without keeping the activations. A caller's `update(l, layer_params, stats)` then returns the layer's new params
(scaled, quantised, ...), and the calibration hidden states are pushed through *those* params
before layer l + 1 is measured: the sequential scheme of GPTQ and AWQ, in which each layer is
calibrated on the inputs the already-quantised layers below it produce.

The layer is `jaxinfer.models.decoder.layer` itself (the family's layer function), with a projection
hook that records the input of every projection on its way to the matmul; which input feeds which
projection is the family's spec (Param.calibration, Site).

Axes (as in model.py): C sequences in a chunk, T tokens, D hidden, F MLP hidden, N query heads,
K kv heads, H head dim, M = C * T tokens flattened.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm.auto import tqdm

from jaxinfer import data
from jaxinfer.checkpoints.model import Model
from jaxinfer.models import attention
from jaxinfer.models import decoder as model_lib
from jaxinfer.models import family as family_lib
from jaxinfer.models.config import ModelConfig

Params = model_lib.Params

# Calibration windows start past this many tokens of the held-out stream, so they never overlap the
# windows `data.heldout_windows` evaluates on (experiments/eval_tiny.py reads 64 x 513 tokens).
# They are in the model's own tokens (data.heldout_stream).
HELDOUT_OFFSET = 1 << 16
DEFAULT_NUM_SEQUENCES = 256
DEFAULT_SEQ_LEN = 256
DEFAULT_CHUNK_SIZE = 16  # sequences a jitted chunk runs at once


def calibration_windows(
    model: Model,
    num_sequences: int = DEFAULT_NUM_SEQUENCES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    *,
    offset: int = HELDOUT_OFFSET,
) -> np.ndarray:  # (num_sequences, seq_len) int32
    """Windows of held-out text in the model's tokens, at random (seeded) starts past `offset` in
    the held-out stream. A model without a tokenizer needs its calibration windows given."""
    if model.tokenizer is None:
        raise ValueError("calibration tokenises held-out text with the model's tokenizer, and this model has none: "
                         "pass calibration windows of token ids")
    if num_sequences < 1:
        raise ValueError(f"num_sequences={num_sequences} must be >= 1")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if offset < 0:
        raise ValueError(f"offset={offset} must be >= 0")
    stream = data.heldout_stream(model.tokenizer).ids
    room = stream.size - offset - seq_len
    if room < 0:
        raise ValueError(
            f"seq_len={seq_len} windows past offset={offset} need {offset + seq_len} held-out tokens, "
            f"the stream has {stream.size}"
        )
    starts = offset + np.random.default_rng(seed).integers(0, room + 1, size=num_sequences)
    return np.stack([stream[s : s + seq_len] for s in starts]).astype(np.int32)


# --- statistics of a projection's inputs --------------------------------------------------------


@struct.dataclass
class InputStats:
    """What AWQ, GPTQ and SmoothQuant need of the inputs x (M, K) one projection saw, over tokens.

      gram     (K, K) float32  sum over tokens of x^T x
      abs_sum  (K,)   float32  sum over tokens of |x|
      count    ()     int32    tokens seen
      abs_max  (K,)   float32  the largest |x| per input channel
    """

    gram: jax.Array
    abs_sum: jax.Array
    count: jax.Array
    abs_max: jax.Array

    @classmethod
    def zeros(cls, features: int) -> InputStats:
        return cls(gram=jnp.zeros((features, features), jnp.float32), abs_sum=jnp.zeros((features,), jnp.float32),
                   count=jnp.zeros((), jnp.int32), abs_max=jnp.zeros((features,), jnp.float32))

    @classmethod
    def from_inputs(cls, x: jax.Array) -> InputStats:
        """The statistics of inputs x (..., K), every leading index a token."""
        return cls.zeros(x.shape[-1]).add(x)

    @classmethod
    def zeros_per_group(cls, groups: int, features: int) -> InputStats:
        """Statistics kept per group (a mixture of experts' experts): every field with a leading
        (groups,) axis; `jax.tree.map(lambda a: a[e], stats)` is group e's InputStats."""
        return cls(gram=jnp.zeros((groups, features, features), jnp.float32),
                   abs_sum=jnp.zeros((groups, features), jnp.float32), count=jnp.zeros((groups,), jnp.int32),
                   abs_max=jnp.zeros((groups, features), jnp.float32))

    def add_grouped(self, x: jax.Array, group_sizes: jax.Array) -> InputStats:
        """Per-group statistics with the rows x (M, K) added, sorted by group as the grouped matmul
        takes them (group_sizes (E,) rows each; rows past their sum belong to no group). Each
        group's Gram matrix is one ragged product (no (M, E, K) one-hot expansion)."""
        x = x.astype(jnp.float32)
        E = group_sizes.shape[0]
        group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(x.shape[0]), side="right")  # (M,) E past the sum
        per_group = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                                      lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
        gram = jax.lax.ragged_dot_general(x, x, group_sizes, per_group, precision=jax.lax.Precision.HIGHEST,
                                          preferred_element_type=jnp.float32)  # (E, K, K)
        return InputStats(gram=self.gram + gram,
                          abs_sum=self.abs_sum + jax.ops.segment_sum(jnp.abs(x), group, num_segments=E),
                          count=self.count + group_sizes.astype(jnp.int32),
                          abs_max=jnp.maximum(self.abs_max, jax.ops.segment_max(jnp.abs(x), group, num_segments=E)))

    def add(self, x: jax.Array) -> InputStats:
        """These statistics with the tokens x (..., K) added."""
        x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # (M, K)
        gram = jnp.einsum("MK,MJ->KJ", x, x, precision=jax.lax.Precision.HIGHEST)
        return InputStats(gram=self.gram + gram, abs_sum=self.abs_sum + jnp.sum(jnp.abs(x), axis=0),
                          count=self.count + x.shape[0], abs_max=jnp.maximum(self.abs_max, jnp.max(jnp.abs(x), axis=0)))

    @property
    def abs_mean(self) -> jax.Array:  # (K,) AWQ's activation statistic, mean |x| per input channel
        return self.abs_sum / self.count

    def hessian(self) -> np.ndarray:  # (K, K) float64
        """GPTQ's H = 2 X^T X / n; the identity for inputs never seen (an expert no calibration token
        was routed to: GPTQ then rounds as RTN does)."""
        if int(self.count) == 0:
            return np.eye(self.gram.shape[-1])
        return 2.0 * np.asarray(self.gram, np.float64) / int(self.count)

    def scaled(self, s: jax.Array) -> InputStats:
        """The statistics of x / s (s: (K,) positive; per group (E, K) for per-group statistics), as
        seen by a projection whose rows were multiplied by s (AWQ's folded scales)."""
        return InputStats(gram=self.gram / (s[..., :, None] * s[..., None, :]), abs_sum=self.abs_sum / s,
                          count=self.count, abs_max=self.abs_max / s)


# A mixture of experts' per-expert inputs, by the role of the expert weights that read them.
EXPERT_SITES = {"expert_column": "experts_in", "expert_row": "experts_act"}


@struct.dataclass
class LayerInputs:
    """Input statistics of one decoder layer's projections, one InputStats per site of its family
    (jaxinfer.models.family.Site: an input projections share), also read as attributes (stats.attn).
    For the Llama-style families:

      attn      (D)      attn-normed hidden: the input of wq, wk, wv
      attn_out  (N * H)  attention output: the input of wo
      mlp       (D)      mlp-normed hidden: the input of w_gate, w_up
      mlp_act   (F)      act(gate) * up: the input of w_down

    With experts=True (a mixture of experts whose experts are calibrated), `experts` holds per-expert
    statistics (InputStats.zeros_per_group) of the rows routed to each expert: "experts_in" (D), the
    input of every expert's gate and up, and "experts_act" (F), of its down projection.
    """

    sites: dict[str, InputStats]
    family: str = struct.field(pytree_node=False)  # the family's name (ModelConfig.model_type)
    experts: dict[str, InputStats] = struct.field(default_factory=dict)

    @classmethod
    def zeros(cls, cfg: ModelConfig, experts: bool = False) -> LayerInputs:
        per_expert = {}
        if experts and cfg.num_experts:
            per_expert = {"experts_in": InputStats.zeros_per_group(cfg.num_experts, cfg.hidden_size),
                          "experts_act": InputStats.zeros_per_group(cfg.num_experts, cfg.intermediate_size)}
        return cls(sites={s.name: InputStats.zeros(s.features(cfg)) for s in cfg.family.sites}, family=cfg.model_type,
                   experts=per_expert)

    def __getattr__(self, name: str) -> InputStats:
        sites = self.__dict__.get("sites") or {}
        if name in sites:
            return sites[name]
        raise AttributeError(f"LayerInputs has no site or attribute {name!r}")

    def for_weight(self, name: str) -> InputStats:
        """The statistics of the input of projection `name` (one of the family's projections)."""
        family = family_lib.get(self.family)
        if name not in family.projections:
            raise ValueError(f"weight name={name!r} is not one of {family.projections}")
        return self.sites[family.param(name).calibration]


# --- one decoder layer, recording its projection inputs ----------------------------------------


def _layer(cfg: ModelConfig, lp: Params, x: jax.Array, window: jax.Array, record=None) -> jax.Array:
    """model.layer without a cache: x (C, T, D) at positions 0..T-1 -> the layer's output. With
    `record`, each projection's input is passed to record(name, x, group_sizes) on its way to the
    matmul (group_sizes: None, or a per-expert weight's rows per expert)."""
    C, T, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (C, T))
    cos, sin = model_lib.layer_rope(model_lib.layer_ropes(cfg, positions, x.dtype), window)  # (C, T, H)
    dense = model_lib.dense_projection()

    def project(name, x, lp, group_sizes=None):
        if record is not None:
            record(name, x, group_sizes)
        return dense(name, x, lp, group_sizes)

    def attend(q, k, v, sinks=None, latent=None):  # (MLA's latent: unused, its expanded form is exact)
        return attention.attend(q, k, v, positions, positions, window, softcap=cfg.attn_softcap, sinks=sinks), None

    return model_lib.layer(cfg, lp, x, cos, sin, attend, project)[0]


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="stats")
def _accumulate(stats: LayerInputs, cfg: ModelConfig, lp: Params, x: jax.Array, window: jax.Array) -> LayerInputs:
    feeds = {p.name: p.calibration for p in cfg.family.params if p.is_projection}
    sites: dict[str, jax.Array] = {}  # site -> the input its projections share
    routed: dict[str, tuple] = {}  # expert site -> (rows sorted by expert, group sizes)

    def record(name, x, group_sizes):
        if group_sizes is None:
            sites.setdefault(feeds[name], x)
        elif stats.experts:
            routed.setdefault(EXPERT_SITES[family_lib.parallel_style(name)], (x, group_sizes))

    _layer(cfg, lp, x, window, record)
    experts = {site: stats.experts[site].add_grouped(*routed[site]) for site in stats.experts}
    return LayerInputs(sites={site: stats.sites[site].add(x) for site, x in sites.items()}, family=stats.family,
                       experts=experts)


@functools.partial(jax.jit, static_argnames="cfg")
def _apply(cfg: ModelConfig, lp: Params, x: jax.Array, window: jax.Array) -> jax.Array:
    return _layer(cfg, lp, x, window)


@functools.partial(jax.jit, static_argnames="cfg")
def _embed(embed: jax.Array, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    return model_lib.embed({"embed": embed}, cfg, tokens)  # (C, T, D)


@functools.partial(jax.jit, static_argnames="cfg")
def _final_norm(x: jax.Array, weight: jax.Array, cfg: ModelConfig) -> jax.Array:
    return model_lib.final_norm({"final_norm": weight}, cfg, x)


# --- the runner ---------------------------------------------------------------------------------


class CalibrationRun(NamedTuple):
    layers: Params  # the stacked (L, ...) layer params `update` returned
    hidden: jax.Array  # (B, T, D) final-norm hidden states of the windows through those layers


def run_layers(
    model: Model,
    windows: np.ndarray,  # (B, T) int32 token windows
    update: Callable[[int, Params, LayerInputs], Params],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    experts: bool = False,
) -> CalibrationRun:
    """Walk the decoder layer by layer over the calibration windows: measure layer l's projection
    inputs, let `update(l, params of layer l, stats)` return its new params, and compute layer
    l + 1's inputs through them. `update` returning its params unchanged reproduces model.forward.
    experts: also measure each expert's routed inputs (LayerInputs.experts)."""
    cfg = model.config
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.size == 0:
        raise ValueError(f"windows must be a non-empty int array (B, T), got shape {windows.shape}")
    if windows.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"windows have length {windows.shape[1]}, over "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    if windows.min() < 0 or windows.max() >= cfg.vocab_size:
        raise ValueError(f"windows hold token ids outside the vocabulary [0, {cfg.vocab_size})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")

    if not cfg.family.uniform(cfg):
        raise ValueError(f"calibration walks layers stacked alike; {cfg.model_type}'s layers differ (dense first "
                         f"layers, then experts: first_k_dense_replace={cfg.first_k_dense}): AWQ, GPTQ, SmoothQuant "
                         "and static FP8 are not supported for it yet (RTN and dynamic W8A8 are)")
    params = model.params
    chunks = [_embed(params["embed"], cfg, jnp.asarray(windows[i : i + chunk_size], jnp.int32))
              for i in range(0, len(windows), chunk_size)]  # each (C, T, D)
    new_layers = []
    for l in tqdm(range(cfg.num_layers), desc="calibrating", unit="layer", disable=not progress):
        lp = jax.tree_util.tree_map(lambda a: a[l], params["layers"])
        window = jnp.asarray(cfg.layer_windows[l], jnp.int32)
        stats = LayerInputs.zeros(cfg, experts)
        for x in chunks:
            stats = _accumulate(stats, cfg, lp, x, window)
        lp = update(l, lp, stats)
        chunks = [_apply(cfg, lp, x, window) for x in chunks]
        new_layers.append(lp)
    layers = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *new_layers)
    hidden = jnp.concatenate([_final_norm(x, params["final_norm"], cfg) for x in chunks])
    return CalibrationRun(layers=layers, hidden=hidden)
