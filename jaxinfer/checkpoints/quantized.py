"""Published quantised checkpoints (AutoAWQ "gemm", GPTQ v1/v2) -> params whose projections are
QuantizedWeight pytrees stacked over layers; everything else loads dense, as `weights.load_params`
loads it.

The integers are repacked on the host (numpy bit operations) into our layout; nothing is
dequantised to float and requantised. Scales keep the checkpoint's dtype unless a scale dtype is
asked for; zero points become uint8.

Checkpoint layouts (a "slot" j of an int32 word is its bits [b*j, b*(j+1)) for b-bit values; the
words are read as unsigned 32-bit; K in_features, N out_features, g group_size, G = K // g):

AutoAWQ GEMM (`quant_method: "awq"`, `version`/`format` "gemm"; 4 bits only). Matches AutoAWQ's
`WQLinear_GEMM.from_linear` (the packer) and `awq.utils.packing_utils.dequantize_gemm`
(`unpack_awq` + `reverse_awq_order`):
  qweight  int32 (K, N / 8)      slot j of word (k, c) holds q[k, 8c + AWQ_ORDER[j]],
                                 AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
  qzeros   int32 (G, N / 8)      the same packing of the zero points
  scales   float16 (G, N)
  W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]; W is already (in, out), our orientation.

GPTQ (`quant_method: "gptq"`, bits 4 or 8, `group_size` -1 for one group, `checkpoint_format`
or `format` "gptq" (v1, the default) or "gptq_v2"). Matches AutoGPTQ's `QuantLinear.pack` and its
torch dequantisation in `QuantLinear.forward` (qlinear_cuda.py), and GPTQModel's
`convert_gptq_v1_to_v2_format_module` for the v1/v2 zero-point difference:
  qweight  int32 (K * bits / 32, N)   slot j of word (r, n) holds q[r * 32/bits + j, n]
  qzeros   int32 (G, N * bits / 32)   slot j of word (grp, c) holds the zero point of column
                                      c * 32/bits + j, minus 1 in v1, as is in v2
  scales   float16 (G, N)
  g_idx    int32 (K,)                 the group of input row k
  W[k, n] = (q[k, n] - zero[g_idx[k], n]) * s[g_idx[k], n]

Onto QuantizedWeight: q is repacked with `format.pack` (int4 half-split per group). A trivial
g_idx (k // g) gives perm None; an act-order g_idx gives perm = stable argsort(g_idx) and rows
q[perm], so each group's rows are contiguous in stored order and the scales and zeros keep their
rows. Every group must hold exactly g rows. A projection gets a perm when any of its layers
needs one (identity for the others). GPTQ with `sym: true` whose zero points all equal
2**(bits-1) stores zeros=None (the format's implicit symmetric zero); any other zeros are kept.
A v1 zero point is the stored slot + 1 (as AutoGPTQ computes it), so it may reach 2**bits; one
that exceeds 255 does not fit uint8 and is an error.

Mixtures of experts (AutoAWQ / GPTQ Mixtral, Qwen-MoE as published): each expert's w1 / w2 / w3
(gate / up / down) is a module of its own (`...experts.{e}.w1.qweight`, ...), quantised like a
projection; the router (`gate`, in modules_to_not_convert) and Qwen2-MoE's shared-expert gate stay
dense. The experts load as one QuantizedWeight (L, E, ...) per expert weight, which the grouped
matmul dequantises (the Pallas grouped kernel in its tiles). Experts stored stacked in one tensor
(gpt-oss) are not read.

Not handled (a CheckpointError names them): other AWQ versions (gemv, gemv_fast, marlin, ...),
GPTQ 2/3 bits, pack dtypes other than int32, K not a multiple of g, quantised lm_head or
projections left dense (modules_to_not_convert).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from tqdm.auto import tqdm

from jaxinfer.checkpoints.hf_layout import (
    CheckpointError,
    check_complete,
    expected_tensors,
    header_entries,
    resolve_dtype,
    safetensors_files,
    write_layer,
)
from jaxinfer.models import decoder as model_lib
from jaxinfer.models import family as family_lib
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.formats import QuantizedWeight, pack

QUANT_METHODS = ("awq", "gptq")
AWQ_VERSIONS = ("gemm",)
GPTQ_FORMATS = ("gptq", "gptq_v2")
GPTQ_BITS = (4, 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # slot j of an AWQ word holds column 8c + AWQ_ORDER[j]
_AWQ_COLUMN_SLOT = tuple(int(i) for i in np.argsort(AWQ_ORDER))  # column 8c + m sits in slot [m]
_SCALE_DTYPES = {"F16": jnp.float16, "BF16": jnp.bfloat16, "F32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class CheckpointQuant:
    """A checkpoint's `quantization_config`, checked. group_size -1: one group per column."""

    method: str  # "awq" | "gptq"
    bits: int
    group_size: int
    sym: bool  # GPTQ sym (AWQ always stores zero points)
    zeros_minus_one: bool  # GPTQ v1 stores zero - 1

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> CheckpointQuant:
        method = str(qc.get("quant_method", "")).lower()
        if method not in QUANT_METHODS:
            raise CheckpointError(
                f"quantization_config.quant_method={qc.get('quant_method')!r} is not one of {QUANT_METHODS}"
            )
        if method == "awq":
            version = str(qc.get("version", qc.get("format", "gemm"))).lower()
            if version not in AWQ_VERSIONS:
                raise CheckpointError(
                    f"quantization_config.version={version!r}: only AutoAWQ's {AWQ_VERSIONS} layout is supported"
                )
            bits = int(qc.get("bits", qc.get("w_bit", 4)))
            if bits != 4:
                raise CheckpointError(f"quantization_config.bits={bits}: AutoAWQ's gemm layout is 4-bit only")
            if not qc.get("zero_point", True):
                raise CheckpointError(
                    "quantization_config.zero_point=False: AutoAWQ's gemm layout always stores zero points"
                )
            group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
            sym, minus_one = False, False
        else:
            fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
            if fmt not in GPTQ_FORMATS:
                raise CheckpointError(f"quantization_config.checkpoint_format={fmt!r} is not one of {GPTQ_FORMATS}")
            bits = int(qc.get("bits", 4))
            if bits not in GPTQ_BITS:
                raise CheckpointError(f"quantization_config.bits={bits} is not one of {GPTQ_BITS}")
            pack_dtype = str(qc.get("pack_dtype", "int32")).removeprefix("torch.")
            if pack_dtype != "int32":
                raise CheckpointError(f"quantization_config.pack_dtype={pack_dtype!r}: only int32 is supported")
            group_size = int(qc.get("group_size", 128))
            sym, minus_one = bool(qc.get("sym", True)), fmt == "gptq"
        if group_size != -1 and group_size < 1:
            raise CheckpointError(f"quantization_config.group_size={group_size} must be >= 1 or -1 (per-channel)")
        return cls(method=method, bits=bits, group_size=group_size, sym=sym, zeros_minus_one=minus_one)

    def groups(self, in_features: int, layer: str) -> int:
        """Rows per group for a projection of `in_features` inputs, checked against the format."""
        g = in_features if self.group_size == -1 else self.group_size
        if in_features % g:
            raise CheckpointError(f"{layer}: group_size={g} does not divide in_features={in_features}")
        if self.bits == 4 and g % 2:
            raise CheckpointError(f"{layer}: 4-bit packing needs an even group_size, got {g}")
        return g


@dataclasses.dataclass(frozen=True)
class _Projection:
    name: str  # key in params["layers"]: wq, ..., w_down, experts_gate, ...
    hf: str  # its module path, formatted with layer=i (and expert=e): "model.layers.{layer}.self_attn.q_proj"
    K: int  # in_features
    N: int  # out_features
    g: int  # rows per group
    experts: int = 0  # E for a per-expert weight (one module per expert): arrays (L, E, ...); 0: (L, ...)

    @property
    def units(self) -> int:
        """Modules per layer: E, or 1."""
        return max(self.experts, 1)


@dataclasses.dataclass(frozen=True)
class _QSlot:
    proj: _Projection
    layer: int
    expert: int  # 0 for a projection
    part: str  # "qweight" | "qzeros" | "scales" | "g_idx"
    shape: tuple[int, ...]
    dtype: tuple[str, ...]  # accepted safetensors dtypes


def _projections(cfg: ModelConfig, quant: CheckpointQuant) -> list[_Projection]:
    """The family's projections (quantised in these checkpoints), with their HF module paths."""
    family = family_lib.of(cfg)
    fused = [family.hf_name(p, 0).removesuffix(".weight") for p in family.present(cfg) if p.hf_part is not None]
    if fused:
        raise CheckpointError(f"{quant.method} checkpoints of {cfg.model_type} are not read: its fused projections "
                              f"({', '.join(dict.fromkeys(fused))}) would have to be split packed")
    out = []
    for p in family.present(cfg):
        if p.is_projection:
            K, N = p.shape(cfg)
            hf = family.hf_layer_prefix + p.peft
            out.append(_Projection(p.name, hf, K, N, quant.groups(K, hf.format(layer="*"))))
        elif p.role in family_lib.EXPERT_ROLES:
            if not p.per_expert:
                raise CheckpointError(f"{quant.method} checkpoints of {cfg.model_type} are not read: its experts are "
                                      f"stored stacked ({family.hf_name(p, 0)}), not one module per expert")
            E, K, N = p.shape(cfg)
            hf = family.hf_layer_prefix + p.hf.removesuffix(".weight")
            out.append(_Projection(p.name, hf, K, N, quant.groups(K, hf.format(layer="*", expert="*")), E))
    return out


def _quant_tensors(cfg: ModelConfig, quant: CheckpointQuant, projs: list[_Projection]) -> dict[str, _QSlot]:
    per = 32 // quant.bits
    out = {}
    for p in projs:
        G = p.K // p.g
        if quant.method == "awq":
            shapes = {"qweight": (p.K, p.N // per), "qzeros": (G, p.N // per), "scales": (G, p.N)}
        else:
            shapes = {"qweight": (p.K // per, p.N), "qzeros": (G, p.N // per), "scales": (G, p.N),
                      "g_idx": (p.K,)}
        for i in range(cfg.num_layers):
            for e in range(p.units):
                for part, shape in shapes.items():
                    dtype = tuple(_SCALE_DTYPES) if part == "scales" else ("I32",)
                    out[f"{p.hf.format(layer=i, expert=e)}.{part}"] = _QSlot(p, i, e, part, shape, dtype)
    return out


def _shape_error(key: str, slot: _QSlot, shape: tuple[int, ...], quant: CheckpointQuant) -> CheckpointError:
    """Name the tensor, both shapes, and the config value its shape would imply."""
    p, msg = slot.proj, f"tensor {key!r} has shape {shape}, expected {slot.shape}"
    if len(shape) != len(slot.shape):
        return CheckpointError(msg)
    if slot.part == "qweight":
        packed, full = (shape[1], p.N) if quant.method == "awq" else (shape[0], p.K)
        implied = 32 * packed / full
        return CheckpointError(f"{msg} for bits={quant.bits} (its shape implies bits={implied:g})")
    if slot.part in ("scales", "qzeros") and shape[0] != slot.shape[0]:
        implied = p.K / shape[0] if shape[0] else float("inf")
        return CheckpointError(
            f"{msg}: group_size={quant.group_size} with in_features={p.K} gives {slot.shape[0]} groups, "
            f"its {shape[0]} rows imply group_size={implied:g}"
        )
    if slot.part == "qzeros":
        implied = 32 * shape[1] / p.N
        return CheckpointError(f"{msg} for bits={quant.bits} (its shape implies bits={implied:g})")
    return CheckpointError(msg)


def _unpack_words(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words (R, C) -> uint8 values: slot j of word w along `axis` is value w * 32/bits + j."""
    per = 32 // bits
    u = np.ascontiguousarray(words).view(np.uint32)
    mask = np.uint32(2**bits - 1)
    R, C = u.shape
    if axis == 0:
        out = np.empty((R, per, C), np.uint8)
        for j in range(per):
            out[:, j, :] = (u >> np.uint32(bits * j)) & mask
        return out.reshape(R * per, C)
    out = np.empty((R, C, per), np.uint8)
    for j in range(per):
        out[:, :, j] = (u >> np.uint32(bits * j)) & mask
    return out.reshape(R, C * per)


def _awq_columns(values: np.ndarray) -> np.ndarray:
    """Undo AutoAWQ's interleave: (R, N) values in slot order -> columns in natural order."""
    R, N = values.shape
    return values.reshape(R, N // 8, 8)[:, :, _AWQ_COLUMN_SLOT].reshape(R, N)


def _unpack_qweight(words: np.ndarray, quant: CheckpointQuant) -> np.ndarray:
    """qweight -> uint8 q (K, N) in the checkpoint's input-row order."""
    if quant.method == "awq":
        return _awq_columns(_unpack_words(words, quant.bits, axis=1))
    return _unpack_words(words, quant.bits, axis=0)


def _unpack_zeros(words: np.ndarray, quant: CheckpointQuant, key: str) -> np.ndarray:
    """qzeros -> uint8 zero points (G, N)."""
    z = _unpack_words(words, quant.bits, axis=1)
    if quant.method == "awq":
        return _awq_columns(z)
    if not quant.zeros_minus_one:
        return z
    z = z.astype(np.int32) + 1
    if z.max() > 255:
        raise CheckpointError(f"tensor {key!r}: a v1 zero point of {z.max()} (stored + 1) does not fit uint8")
    return z.astype(np.uint8)


def _group_perm(g_idx: np.ndarray, g: int, key: str) -> np.ndarray | None:
    """None for a trivial g_idx (k // g); else the stable argsort that makes groups contiguous."""
    K = g_idx.shape[0]
    G = K // g
    if np.array_equal(g_idx, np.arange(K) // g):
        return None
    outside = g_idx[(g_idx < 0) | (g_idx >= G)]
    if outside.size:
        raise CheckpointError(f"tensor {key!r} holds group {int(outside[0])}, expected groups in [0, {G})")
    counts = np.bincount(g_idx, minlength=G)
    if np.any(counts != g):
        bad = int(np.flatnonzero(counts != g)[0])
        raise CheckpointError(
            f"tensor {key!r}: group {bad} has {int(counts[bad])} rows, group_size={g} needs exactly {g} in each"
        )
    return np.argsort(g_idx, kind="stable").astype(np.int32)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"), donate_argnums=0)
def _write_qweight(buf, q, i, *, bits, group_size):
    return jax.lax.dynamic_update_index_in_dim(buf, pack(q, bits, group_size), i, axis=0)


def _check_headers(files, expected, qslots, cfg, quant) -> tuple[dict[str, str], dict[str, Any]]:
    """Pass 1, headers only: every tensor expected, well shaped and typed, and present.
    Returns each tensor's file and each projection's checkpoint scale dtype."""
    location: dict[str, str] = {}
    scale_dtypes: dict[str, tuple[str, str]] = {}  # projection -> (dtype, first key)
    for path, key, shape, dtype in header_entries(files, cfg):
        if key in qslots:
            slot = qslots[key]
            if shape != slot.shape:
                raise _shape_error(key, slot, shape, quant)
            if dtype not in slot.dtype:
                raise CheckpointError(f"tensor {key!r} has dtype {dtype}, expected one of {slot.dtype}")
            if slot.part == "scales":
                seen = scale_dtypes.setdefault(slot.proj.name, (dtype, key))
                if seen[0] != dtype:
                    raise CheckpointError(f"tensor {key!r} has dtype {dtype}, but {seen[1]!r} has {seen[0]}")
        elif key in expected:
            want = expected[key].hf_shape
            if shape != want:
                raise CheckpointError(f"tensor {key!r} has shape {shape}, expected {want}")
        else:
            raise CheckpointError(f"unexpected tensor {key!r} in {os.path.basename(path)}")
        location[key] = path
    check_complete({k: s.hf_shape for k, s in expected.items()}, location)
    check_complete({k: s.shape for k, s in qslots.items()}, location, why=f" for quant_method={quant.method!r}")
    return location, {name: _SCALE_DTYPES[d] for name, (d, _) in scale_dtypes.items()}


def _zeros_and_perms(location, qslots, projs, cfg, quant) -> tuple[dict, dict]:
    """Pass 2, the small tensors: zero points (L, [E,] G, N) uint8 or None, and perms (L, [E,] K) or
    None. Modules are indexed by unit, layer * units + expert, and the arrays shaped at the end."""
    zeros = {p.name: np.empty((cfg.num_layers * p.units, p.K // p.g, p.N), np.uint8) for p in projs}
    perms: dict[str, list] = {p.name: [None] * (cfg.num_layers * p.units) for p in projs}
    for key, slot in qslots.items():
        if slot.part not in ("qzeros", "g_idx"):
            continue
        with safe_open(location[key], framework="numpy") as f:
            x = f.get_tensor(key)
        unit = slot.layer * slot.proj.units + slot.expert
        if slot.part == "qzeros":
            zeros[slot.proj.name][unit] = _unpack_zeros(x, quant, key)
        else:
            perms[slot.proj.name][unit] = _group_perm(x, slot.proj.g, key)
    out_zeros, out_perms = {}, {}
    for p in projs:
        lead = (cfg.num_layers, p.experts) if p.experts else (cfg.num_layers,)
        z = zeros[p.name]
        implicit = quant.sym and bool(np.all(z == 2 ** (quant.bits - 1)))
        out_zeros[p.name] = None if implicit else z.reshape(*lead, *z.shape[1:])
        unit_perms = perms[p.name]
        if all(pm is None for pm in unit_perms):
            out_perms[p.name] = None
        else:
            identity = np.arange(p.K, dtype=np.int32)
            out_perms[p.name] = np.stack([identity if pm is None else pm for pm in unit_perms]).reshape(*lead, p.K)
    return out_zeros, out_perms


def load_quantized_params(
    ckpt_dir: str,
    cfg: ModelConfig,
    quantization_config: dict[str, Any],
    dtype=jnp.float32,
    scale_dtype=None,  # None: keep the checkpoint's scale dtype
    progress: bool = True,
) -> model_lib.Params:
    """Read an AutoAWQ/GPTQ checkpoint: projections as stacked QuantizedWeights, the rest dense in dtype."""
    quant = CheckpointQuant.from_hf(quantization_config)
    scale_dtype = resolve_dtype(scale_dtype) if scale_dtype is not None else None
    projs = _projections(cfg, quant)
    quantised = {p.name for p in projs}
    expected = {k: s for k, s in expected_tensors(cfg).items() if not (s.layer is not None and s.name in quantised)}
    qslots = _quant_tensors(cfg, quant, projs)
    files = safetensors_files(ckpt_dir)

    location, ckpt_scale_dtypes = _check_headers(files, expected, qslots, cfg, quant)
    zeros, perms = _zeros_and_perms(location, qslots, projs, cfg, quant)

    # Pass 3: stream dense tensors, qweights and scales into preallocated arrays.
    L = cfg.num_layers
    shapes = model_lib.param_shapes(cfg)
    layers: dict[str, Any] = {k: jnp.zeros(s, dtype) for k, s in shapes["layers"].items() if k not in quantised}
    # Quantised modules by unit (layer * units + expert), shaped (L, [E,] ...) at the end.
    qweights = {p.name: jnp.zeros((L * p.units, p.K * quant.bits // 8, p.N), jnp.uint8) for p in projs}
    scales = {p.name: jnp.zeros((L * p.units, p.K // p.g, p.N), scale_dtype or ckpt_scale_dtypes[p.name])
              for p in projs}
    params: dict[str, Any] = {}
    bar = tqdm(total=len(location), desc="loading", unit="tensor", disable=not progress)
    for path in files:
        with safe_open(path, framework="flax") as f, safe_open(path, framework="numpy") as fn:
            for key in f.keys():
                if key not in location:
                    continue
                bar.update()
                if key in expected:
                    slot = expected[key]
                    x = f.get_tensor(key)
                    if slot.layer is None:
                        params[slot.name] = (x.T if slot.transpose else x).astype(dtype)
                    else:
                        layers[slot.name] = write_layer(layers[slot.name], x, slot.layer,
                                                         transpose=slot.transpose)
                    continue
                qs = qslots[key]
                name, unit = qs.proj.name, qs.layer * qs.proj.units + qs.expert
                if qs.part == "scales":
                    scales[name] = write_layer(scales[name], f.get_tensor(key), unit, transpose=False)
                elif qs.part == "qweight":
                    q = _unpack_qweight(fn.get_tensor(key), quant)  # (K, N) uint8
                    if perms[name] is not None:
                        q = q[perms[name].reshape(-1, qs.proj.K)[unit]]
                    qweights[name] = _write_qweight(qweights[name], q, unit, bits=quant.bits,
                                                    group_size=qs.proj.g)
    bar.close()
    for p in projs:
        z, pm = zeros[p.name], perms[p.name]
        lead = (L, p.experts) if p.experts else (L,)
        layers[p.name] = QuantizedWeight(
            qweight=qweights[p.name].reshape(*lead, *qweights[p.name].shape[1:]),
            scales=scales[p.name].reshape(*lead, *scales[p.name].shape[1:]),
            zeros=None if z is None else jnp.asarray(z),
            perm=None if pm is None else jnp.asarray(pm),
            bits=quant.bits,
            group_size=p.g,
            in_features=p.K,
        )
    params["layers"] = layers
    return params
