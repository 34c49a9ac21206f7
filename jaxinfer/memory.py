"""Memory and speed arithmetic for inference: KV-cache and weight bytes, capacity planner, decode roofline.

Units: sizes in bytes, rates in bytes/s and FLOP/s, times in seconds, lengths in tokens. Every
function takes a `ModelConfig` (from an HF config.json) and, where a card matters, a `Hardware`
read from `configs/hardware/*.json`.

The planner splits a card's memory three ways:

    memory_bytes = reserve  +  weights  +  KV cache
    reserve      = reserve_fraction * memory_bytes   (default 10%)

The reserve holds what is neither weights nor KV: activations of the largest step (prefill logits,
float32[B, T, V], dominate unless prefill is chunked), XLA scratch buffers, the CUDA context,
cuBLAS/cuDNN workspaces and allocator fragmentation. JAX preallocates only 75% of the card by
default (`XLA_PYTHON_CLIENT_MEM_FRACTION`); to run at these plans, raise that fraction to about
`1 - reserve_fraction`.

Tensor parallel (`tp`, jaxinfer.sharding): every figure is per card. A card holds 1 / tp of each
projection, of the embedding and LM head (vocabulary padded to a multiple of tp) and of the KV
heads (one head when tp > K: heads are replicated), and all of the norms and biases. The roofline
reads that share at the card's bandwidth; the all-reduces between cards are not modelled.
`min_tp` answers how many cards of a kind a model and context need.
Expert parallel (`ep`, a mixture of experts): the experts are split over ep groups of tp cards as
well, so a card holds 1 / (tp x ep) of the expert weights and reads, in a decode step, the experts
touched among its own E / ep; everything else is as at tp (replicated over ep).
"""

from __future__ import annotations

import math
import re
from typing import Any

from jaxinfer.hardware import (  # noqa: F401  (re-exported: the planner's public API)
    CONFIGS_DIR,
    Hardware,
    Measured,
    list_hardware,
    list_models,
    load_hardware,
    load_model_config,
)
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.experts import (  # noqa: F401
    _expert_shapes,
    active_params,
    expert_params,
    experts_touched,
    moe_layers,
)
from jaxinfer.sharding import check_ep, kv_replicas

KV_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "fp8": 1}
QUANTISED_KV_DTYPES = ("int8", "fp8")
FLOAT_WEIGHT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SCALE_BYTES = 2  # float16 scales and zero points of int weights
FP8_SCALE_BYTES = 4  # one float32 scale per fp8 weight matrix
_INT_FORMAT = re.compile(r"int(4|8)(?:-g(\d+))?")
MXFP4_FORMATS = ("mxfp4", "mxfp4-experts")  # every linear weight / the experts only (gpt-oss as published)
WEIGHT_FORMATS_HELP = "float32, bfloat16, float16, fp8, int8, int4, int8-gN, int4-gN, mxfp4, mxfp4-experts"


class DoesNotFitError(ValueError):
    """The model's weights alone do not fit in the card's memory after the reserve."""


def _check_at_least(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def _check_kv_dtype(kv_dtype: str, kv_scale_bytes: int) -> None:
    if kv_dtype not in KV_DTYPE_BYTES:
        raise ValueError(f"kv_dtype={kv_dtype!r} is not one of {', '.join(KV_DTYPE_BYTES)}")
    _check_at_least("kv_scale_bytes", kv_scale_bytes, 0)
    if kv_scale_bytes and kv_dtype not in QUANTISED_KV_DTYPES:
        raise ValueError(f"kv_scale_bytes={kv_scale_bytes} needs an int8 or fp8 kv_dtype, got {kv_dtype!r}")


# ---------------------------------------------------------------------------------------------
# KV cache


def kv_heads_per_card(cfg: ModelConfig, tp: int = 1) -> int:
    """KV heads each of tp cards stores: K / tp, or 1 when tp > K (heads replicated). A tp the model
    cannot split over raises ValueError naming the field."""
    return cfg.num_kv_heads * kv_replicas(cfg, tp) // tp


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str, kv_scale_bytes: int = 0, tp: int = 1) -> int:
    """Bytes of K and V one token adds to the cache, over all layers (on each card, with tp).

    2 (K and V) x L layers x K kv heads x (H head_dim x bytes per element + kv_scale_bytes); for
    multi-head latent attention (DeepSeek) L x ((kv_lora_rank + qk_rope_head_dim) x bytes + kv_scale_bytes),
    the same on every card.
    `kv_scale_bytes` is the scale stored per token, per kv head, for each of K and V by an int8/fp8
    cache (2 for one float16 scale, 4 for float32); float caches have none.
    """
    _check_kv_dtype(kv_dtype, kv_scale_bytes)
    if cfg.kv_lora_rank:  # multi-head latent attention: one latent row, on every card (kv_cache.page_layout)
        kv_replicas(cfg, tp)  # (checks tp)
        return cfg.num_layers * ((cfg.kv_lora_rank + cfg.qk_rope_head_dim) * KV_DTYPE_BYTES[kv_dtype] + kv_scale_bytes)
    per_head = cfg.head_dim * KV_DTYPE_BYTES[kv_dtype] + kv_scale_bytes  # bytes per token per head
    return 2 * cfg.num_layers * kv_heads_per_card(cfg, tp) * per_head


def kv_cache_bytes(
    cfg: ModelConfig, seq_len: int, batch: int = 1, kv_dtype: str = "float16", kv_scale_bytes: int = 0, tp: int = 1
) -> int:
    """Bytes of a cache holding `seq_len` tokens for each of `batch` sequences.

    Every token is counted in every layer, as a paged cache stores it: sliding-window layers
    (Mistral) keep old pages too. Example: 32 layers, 32 kv heads, head_dim 128, 4096 tokens,
    float16 -> 2 * 32 * 32 * 128 * 4096 * 2 = 2 GiB.
    """
    _check_at_least("seq_len", seq_len, 0)
    _check_at_least("batch", batch, 1)
    return kv_bytes_per_token(cfg, kv_dtype, kv_scale_bytes, tp) * seq_len * batch


# ---------------------------------------------------------------------------------------------
# Weights


def _linear_shapes(cfg: ModelConfig, tp: int = 1) -> list[tuple[int, int, int]]:
    """(fan_in, fan_out, layers) of the linear weights of the decoder layers, its family's projections
    (q, k, v, o, gate, up, down for the Llama-style families), each with the number of layers that
    have it (all of them, but for DeepSeek's dense first layers and expert layers): one card's shard
    of each, with tp (a column projection's outputs split, a row projection's inputs, a replicated
    one whole; outputs over KV heads stored tp / K times when tp > K)."""
    replicas = kv_replicas(cfg, tp)
    out = []
    for p in cfg.family.present(cfg):
        if not p.is_projection:
            continue
        fan_in, fan_out = p.shape(cfg)
        if p.role == "row":
            fan_in //= tp
        elif p.role == "column":
            fan_out = fan_out * (replicas if p.heads == "kv" else 1) // tp
        out.append((fan_in, fan_out, len(p.layers_of(cfg))))
    return out


def _check_weight_format(weight_format: str) -> None:
    if weight_format in FLOAT_WEIGHT_BYTES or weight_format in ("fp8", *MXFP4_FORMATS):
        return
    match = _INT_FORMAT.fullmatch(weight_format)
    if match is None or (match.group(2) is not None and int(match.group(2)) < 1):
        raise ValueError(f"weight_format={weight_format!r} is not one of {WEIGHT_FORMATS_HELP} (N >= 1)")


def _matrix_bytes(fan_in: int, fan_out: int, weight_format: str) -> int:
    """Bytes of one linear weight [fan_in, fan_out] stored in `weight_format`, scales included."""
    if weight_format in FLOAT_WEIGHT_BYTES:
        return fan_in * fan_out * FLOAT_WEIGHT_BYTES[weight_format]
    if weight_format == "fp8":
        return fan_in * fan_out + FP8_SCALE_BYTES
    if weight_format in MXFP4_FORMATS:  # 4-bit codes, one scale byte per 32 inputs (formats.MXFP4Weight)
        return fan_in * fan_out // 2 + math.ceil(fan_in / 32) * fan_out
    match = _INT_FORMAT.fullmatch(weight_format)
    bits, group = int(match.group(1)), match.group(2)
    packed = math.ceil(fan_in * fan_out * bits / 8)
    if group is None:  # symmetric, one float16 scale per output channel
        return packed + fan_out * SCALE_BYTES
    groups = math.ceil(fan_in / int(group)) * fan_out  # groups of N along fan_in
    return packed + groups * 2 * SCALE_BYTES  # a float16 scale and a float16 zero point per group


def weight_bytes(cfg: ModelConfig, weight_format: str = "bfloat16", tp: int = 1, ep: int = 1) -> int:
    """Bytes of all parameters: embeddings, every layer, final norm and lm_head (tied: counted once);
    with tp (and ep), one card's share (see the module docstring).

    Formats: "float32", "bfloat16", "float16" store every parameter in that dtype. The quantised
    formats apply to the linear weights of each layer only (_linear_shapes); embeddings, lm_head,
    norms and biases stay 16-bit, as AWQ and GPTQ checkpoints keep them:
      "int8" / "int4"    symmetric, one float16 scale per output channel;
      "int8-gN" / "int4-gN"  groups of N inputs, a float16 scale and zero point per group (int4-g128);
      "fp8"              float8_e4m3 with one float32 scale per matrix;
      "mxfp4"            MXFP4 (4-bit e2m1 codes, an e8m0 scale byte per 32 inputs);
      "mxfp4-experts"    the experts in MXFP4, every other linear weight in bfloat16 (gpt-oss as published).
    """
    _check_weight_format(weight_format)
    L, E = moe_layers(cfg), cfg.num_experts  # L: the layers with experts
    linear_params = sum(n * i * o for i, o, n in _linear_shapes(cfg)) + L * E * expert_params(cfg)
    vocab_params = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    other_params = cfg.num_params() - linear_params - vocab_params  # norms, biases, routers: whole on every card
    vocab_params_per_card = vocab_params // cfg.vocab_size * math.ceil(cfg.vocab_size / tp)
    other_bytes = (other_params + vocab_params_per_card) * (4 if weight_format == "float32" else 2)
    dense_format = "bfloat16" if weight_format == "mxfp4-experts" else weight_format
    linear_bytes = sum(n * _matrix_bytes(i, o, dense_format) for i, o, n in _linear_shapes(cfg, tp))
    return linear_bytes + L * _experts_per_card(cfg, ep) * _expert_bytes(cfg, weight_format, tp) + other_bytes


def _experts_per_card(cfg: ModelConfig, ep: int) -> int:
    """The experts of one layer each card holds: E / ep (ep must divide E; 0 for a dense model)."""
    check_ep(cfg, ep)
    return cfg.num_experts // ep


def _expert_bytes(cfg: ModelConfig, weight_format: str, tp: int = 1) -> int:
    """Bytes of one expert's weights in one layer (one card's shard) in a weight format."""
    return sum(_matrix_bytes(i, o, weight_format) for i, o in _expert_shapes(cfg, tp))


# ---------------------------------------------------------------------------------------------
# Capacity planner


def usable_bytes(hw: Hardware, reserve_fraction: float = 0.1) -> int:
    """Bytes for weights and KV cache: the card's memory less the reserve (see the module docstring)."""
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction={reserve_fraction!r} must be in [0, 1)")
    return int(hw.memory_bytes * (1 - reserve_fraction))


def kv_budget_bytes(
    cfg: ModelConfig, hw: Hardware, weight_format: str = "bfloat16", reserve_fraction: float = 0.1, tp: int = 1,
    ep: int = 1,
) -> int:
    """Bytes left for the KV cache once weights and reserve are placed (on each of tp cards).

    Raises DoesNotFitError (a ValueError) naming the card and the sizes when the weights alone do
    not fit: the planner never answers 0 for a model that cannot even load.
    """
    usable = usable_bytes(hw, reserve_fraction)
    weights = weight_bytes(cfg, weight_format, tp, ep)
    if weights > usable:
        share = f" (1/{tp} of them per card)" if tp > 1 else ""
        share += f" (1/{tp * ep} of the experts per card)" if ep > 1 else ""
        raise DoesNotFitError(
            f"weights of {weights / 1e9:.2f} GB ({weight_format}){share} do not fit on {hw.name}: "
            f"{hw.memory_bytes / 1e9:.2f} GB of memory, {usable / 1e9:.2f} GB after the "
            f"{reserve_fraction:.0%} reserve"
        )
    return usable - weights


def fits(
    cfg: ModelConfig, hw: Hardware, batch: int, context: int, weight_format: str = "bfloat16",
    kv_dtype: str = "bfloat16", reserve_fraction: float = 0.1, kv_scale_bytes: int = 0, tp: int = 1, ep: int = 1,
) -> bool:
    """Whether weights plus a cache of `batch` sequences of `context` tokens fit after the reserve
    (each card's share, with tp and ep)."""
    kv = kv_cache_bytes(cfg, context, batch, kv_dtype, kv_scale_bytes, tp)
    return weight_bytes(cfg, weight_format, tp, ep) + kv <= usable_bytes(hw, reserve_fraction)


def valid_tps(cfg: ModelConfig, max_tp: int = 64) -> list[int]:
    """The tensor-parallel degrees up to max_tp the model can split over (jaxinfer.sharding's rules)."""
    out = []
    for tp in range(1, max_tp + 1):
        try:
            kv_replicas(cfg, tp)
        except ValueError:
            continue
        out.append(tp)
    return out


def min_tp(
    cfg: ModelConfig, hw: Hardware, batch: int, context: int, weight_format: str = "bfloat16",
    kv_dtype: str = "bfloat16", reserve_fraction: float = 0.1, kv_scale_bytes: int = 0, max_tp: int = 64,
) -> int | None:
    """The fewest cards of this kind (a tp the model splits over) that hold the weights and a cache of
    `batch` sequences of `context` tokens; None if no tp up to max_tp does."""
    for tp in valid_tps(cfg, max_tp):
        if fits(cfg, hw, batch, context, weight_format, kv_dtype, reserve_fraction, kv_scale_bytes, tp):
            return tp
    return None


def max_context(
    cfg: ModelConfig, hw: Hardware, batch: int = 1, weight_format: str = "bfloat16",
    kv_dtype: str = "bfloat16", reserve_fraction: float = 0.1, kv_scale_bytes: int = 0, tp: int = 1, ep: int = 1,
) -> int:
    """The largest tokens per sequence whose cache fits for `batch` sequences (may be 0).

    A memory bound only: the model's own limit is `cfg.max_position_embeddings`.
    Raises DoesNotFitError when the weights alone do not fit.
    """
    _check_at_least("batch", batch, 1)
    per_token = kv_bytes_per_token(cfg, kv_dtype, kv_scale_bytes, tp)
    return kv_budget_bytes(cfg, hw, weight_format, reserve_fraction, tp, ep) // (per_token * batch)


def max_batch(
    cfg: ModelConfig, hw: Hardware, context: int, weight_format: str = "bfloat16",
    kv_dtype: str = "bfloat16", reserve_fraction: float = 0.1, kv_scale_bytes: int = 0, tp: int = 1, ep: int = 1,
) -> int:
    """The most sequences of `context` tokens whose cache fits (may be 0).

    Raises DoesNotFitError when the weights alone do not fit.
    """
    _check_at_least("context", context, 1)
    per_token = kv_bytes_per_token(cfg, kv_dtype, kv_scale_bytes, tp)
    return kv_budget_bytes(cfg, hw, weight_format, reserve_fraction, tp, ep) // (per_token * context)


# ---------------------------------------------------------------------------------------------
# Decode roofline


def _peak_flops(hw: Hardware, weight_format: str) -> float:
    """The tensor-core peak a decode step's matmuls run at for this weight format.

    fp8 runs on fp8 tensor cores where the card has them; float16 on fp16; everything else
    (bfloat16, and int weights dequantised to bf16) on bf16. float32 weights are also taken at the
    bf16 peak, which keeps the result a bound (an optimistic one).
    """
    if weight_format == "fp8" and hw.peak_fp8_flops:
        return hw.peak_fp8_flops
    if weight_format == "float16":
        return hw.peak_fp16_flops
    return hw.peak_bf16_flops


def decode_roofline(
    cfg: ModelConfig, hw: Hardware, batch: int = 1, context: int = 4096, weight_format: str = "bfloat16",
    kv_dtype: str = "bfloat16", kv_scale_bytes: int = 0, measured: bool = False, tp: int = 1, ep: int = 1,
) -> dict[str, Any]:
    """Lower bound on one decode step's time: every sequence adds one token to a cache of `context`
    (with tp and ep: each card's share of the bytes and FLOPs, the collectives between cards left
    out; under ep a card reads the experts touched among its own E / ep, touched / ep on average).

    Bytes per step = weights read (all of them, except that an untied embedding table is only
    gathered: `batch` rows, and a mixture of experts reads only the experts its tokens are routed
    to: experts_touched per layer) + KV read (each layer reads `context` tokens, or its sliding window) +
    KV written (one token per sequence). FLOPs per step = 2 x matmul params (layers and lm_head;
    of the experts, the k each token uses) x batch + attention (4 x num_heads x head_dim per token read, per layer, per sequence).
    Time >= max(bytes / bandwidth, flops / peak); tokens/s <= batch / time.

    `measured=True` uses the card's measured GEMV bandwidth and matmul FLOP/s instead of the
    datasheet's (the card must have a "measured" entry).
    """
    _check_at_least("batch", batch, 1)
    _check_at_least("context", context, 1)
    side_bytes = 4 if weight_format == "float32" else 2  # embeddings stay 16-bit unless float32
    D, V = cfg.hidden_size, math.ceil(cfg.vocab_size / tp)  # V: one card's vocabulary rows

    weight_read = weight_bytes(cfg, weight_format, tp, ep) + batch * D * side_bytes  # gathered embedding rows
    if not cfg.tie_word_embeddings:
        weight_read -= V * D * side_bytes  # the table itself is not read; lm_head is
    touched = experts_touched(cfg, batch)
    untouched = (cfg.num_experts - touched) / ep  # of this card's E / ep
    weight_read -= round(moe_layers(cfg) * untouched * _expert_bytes(cfg, weight_format, tp))
    tokens_read = sum(min(context, w) if w else context for w in cfg.layer_windows)  # over layers
    per_layer_token = kv_bytes_per_token(cfg, kv_dtype, kv_scale_bytes, tp) // cfg.num_layers
    kv_read = batch * tokens_read * per_layer_token
    kv_written = batch * kv_bytes_per_token(cfg, kv_dtype, kv_scale_bytes, tp)
    bytes_per_step = weight_read + kv_read + kv_written

    matmul_params = (sum(n * i * o for i, o, n in _linear_shapes(cfg, tp))
                     + moe_layers(cfg) * cfg.experts_per_token * expert_params(cfg) // (tp * ep)) + V * D
    attention_flops = batch * tokens_read * 4 * cfg.num_heads // tp * cfg.head_dim  # q @ k^T and p @ v
    flops_per_step = 2 * matmul_params * batch + attention_flops

    if measured:
        if hw.measured is None:
            raise ValueError(f"measured=True but card {hw.name!r} has no measured figures")
        bandwidth, peak = hw.measured.gemv_bf16_bytes_per_s, hw.measured.matmul_bf16_flops
    else:
        bandwidth, peak = hw.memory_bandwidth_bytes_per_s, _peak_flops(hw, weight_format)
    memory_time = bytes_per_step / bandwidth  # s
    compute_time = flops_per_step / peak  # s
    step_time = max(memory_time, compute_time)
    return {
        "batch": batch,
        "context": context,
        "tp": tp,
        "ep": ep,
        "weight_bytes_read": weight_read,
        "kv_bytes_read": kv_read,
        "kv_bytes_written": kv_written,
        "bytes_per_step": bytes_per_step,
        "flops_per_step": flops_per_step,
        "bandwidth_bytes_per_s": bandwidth,
        "peak_flops": peak,
        "memory_time_s": memory_time,
        "compute_time_s": compute_time,
        "step_time_s": step_time,
        "tokens_per_s": batch / step_time,
        "bound": "memory" if memory_time >= compute_time else "compute",
        "experts_touched_per_layer": touched,
    }
