"""ModelConfig: the static description of a decoder, read from an HF config.json.

A frozen, hashable dataclass, so it can be a static argument of `jax.jit`. Every option that
changes the model's arithmetic is a field here; an option that this code does not implement
raises `ConfigError` naming it, so an unsupported checkpoint never loads as a silently wrong model.
Which fields a config.json sets, and how, is its family's business (jaxinfer.models.family: the
family of `model_type` reads and writes config.json); the helpers here read the fields most
families share.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from jaxinfer.models import family as family_lib

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def read_json_object(path: str | os.PathLike, what: str, error: type[ValueError] = ValueError) -> dict:
    """The JSON object in a file (what: a few words on what its fields are, for the message); `error`
    (a ValueError) naming the file when it is not valid JSON or not an object."""
    with open(path, "rb") as f:
        try:
            value = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}, not an object of {what}")
    return value


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention factor for a context extended `factor` times: 0.1 mscale ln(factor) + 1 (1 when
    factor <= 1), as HF's yarn_get_mscale."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class ConfigError(ValueError):
    """A config.json that describes a model this code cannot run exactly."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: base frequency and the optional long-context rescaling."""

    theta: float = 10000.0
    type: str = "default"  # "default" | "linear" | "llama3" | "yarn"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 and yarn
    beta_fast: float = 32.0  # yarn: the ramp between extrapolated and interpolated frequencies
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn: the ramp's ends rounded to whole dimensions
    # yarn: the factor cos and sin are multiplied by; None: 0.1 ln(factor) + 1 (YaRN's default)
    attention_factor: float | None = None
    # yarn, DeepSeek: the softmax scale is multiplied by (0.1 mscale_all_dim ln(factor) + 1)^2 (HF's
    # yarn_apply_mscale; the MLA family applies it); 0: not. The rotary tables ignore it.
    mscale_all_dim: float = 0.0

    @property
    def cos_sin_scale(self) -> float:
        """What the cos / sin tables are multiplied by (YaRN's attention factor; 1 otherwise), as HF
        transformers computes it."""
        if self.type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        return yarn_mscale(self.factor)

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """float32[head_dim // 2]: the rotation frequencies, computed as HF transformers does."""
        exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
        inv_freq = (1.0 / (np.float32(self.theta) ** exponent)).astype(np.float32)
        if self.type == "linear":
            return (inv_freq / np.float32(self.factor)).astype(np.float32)
        if self.type == "llama3":
            old_len = self.original_max_position_embeddings
            low_freq_wavelen = old_len / self.low_freq_factor
            high_freq_wavelen = old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (old_len / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        if self.type == "yarn":  # extrapolated (high) frequencies ramp into interpolated (low) ones
            def dim_of(rotations):  # the dimension that turns `rotations` times over the original context
                return head_dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                    2 * math.log(self.theta))
            low, high = dim_of(self.beta_fast), dim_of(self.beta_slow)
            if self.truncate:
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, head_dim - 1)
            if low == high:
                high += 0.001
            ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
            extrapolation = 1 - ramp
            interpolated = np.float32(1.0) / (np.float32(self.factor) * (np.float32(self.theta) ** exponent))
            return (interpolated * (1 - extrapolation) + inv_freq * extrapolation).astype(np.float32)
        return inv_freq


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Dimensions and options of a decoder of a registered family (`model_type`: Llama 2/3,
    Mistral, Qwen2/2.5, Qwen3 are built in; jaxinfer.models.family says what each family's
    parameters and layer are).

    Axis names used across the project: L layers, D hidden_size, N num_heads, K num_kv_heads,
    H head_dim, F intermediate_size, V vocab_size.
    """

    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, or Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    qk_norm: bool = False  # Qwen3: a norm over head_dim on q and k before RoPE
    # Sliding-window size per layer; 0 means full causal attention for that layer. None: all 0.
    layer_windows: tuple[int, ...] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Scale of the attention scores; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5).
    attention_scale: float | None = None
    # The embedding rows are multiplied by this (in the model dtype); None: not scaled (Gemma: sqrt(D)).
    embedding_scale: float | None = None
    # The logits are soft-capped, cap * tanh(logits / cap); None: not capped (Gemma 2's final_logit_softcapping).
    logit_softcap: float | None = None
    # The attention scores are soft-capped the same way, after the scale and before the mask; None: not
    # capped (Gemma 2's attn_logit_softcapping).
    attn_softcap: float | None = None
    # The RoPE of the sliding-window layers when it differs from `rope` (Gemma 3's local base
    # frequency); None: every layer rotates by `rope`.
    local_rope: RopeConfig | None = None
    # Mixture of experts (jaxinfer.models.moe): E experts of intermediate_size each per layer, each
    # token routed to experts_per_token of them (their softmax probabilities renormalised over the
    # chosen ones when norm_topk_prob). 0: a dense MLP.
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = True
    # A shared expert beside them, every token through it, gated by sigmoid(h @ its gate) (Qwen2-MoE):
    # its intermediate size; 0: none.
    shared_expert_size: int = 0
    # Attention sinks: each layer has a learned logit per query head that joins every softmax with no
    # value (gpt-oss; the layer param `sinks`).
    attn_sinks: bool = False
    # The experts' clamped SwiGLU (gpt-oss): gate clamped above and up on both sides at swiglu_limit,
    # then (up + 1) * gate * sigmoid(swiglu_alpha * gate); None: act(gate) * up.
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    # Multi-head latent attention (DeepSeek-V2/V3, jaxinfer.models.deepseek): keys and values come
    # from a latent of kv_lora_rank values per token (0: not MLA), queries from one of q_lora_rank
    # (0: straight from the hidden state). head_dim is the query/key width, qk_nope + qk_rope; only
    # the last qk_rope_head_dim of it is rotated; the values are v_head_dim wide.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # DeepSeek's experts (jaxinfer.models.deepseek): the first first_k_dense layers have a dense MLP
    # of intermediate_size, the others num_experts experts of expert_size each; routing scores by
    # softmax (V2) or sigmoid with a learned correction for the choice (V3), the choice limited to
    # the topk_groups best of expert_groups groups, the weights times routed_scaling.
    first_k_dense: int = 0
    expert_size: int = 0
    router_scoring: str = "softmax"
    expert_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0

    def __post_init__(self):
        if self.layer_windows is None:
            object.__setattr__(self, "layer_windows", (0,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ConfigError(
                f"layer_windows has {len(self.layer_windows)} entries, num_layers is {self.num_layers}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2 and not self.kv_lora_rank:  # (MLA rotates qk_rope_head_dim of it: checked below)
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.kv_lora_rank and not (0 < self.qk_rope_head_dim < self.head_dim and self.qk_rope_head_dim % 2 == 0
                                      and 0 < self.v_head_dim <= self.head_dim):
            raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and in (0, head_dim="
                              f"{self.head_dim}), v_head_dim={self.v_head_dim} in (0, head_dim]")
        if self.router_scoring not in ("softmax", "sigmoid"):
            raise ConfigError(f"router_scoring={self.router_scoring!r} is not 'softmax' or 'sigmoid'")
        if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.experts_per_token} must be in [1, num_experts="
                              f"{self.num_experts}]")
        if self.num_experts and (self.num_experts % self.expert_groups or not 1 <= self.topk_groups <= self.expert_groups
                                 or self.experts_per_token > self.topk_groups * (self.num_experts // self.expert_groups)):
            raise ConfigError(f"n_group={self.expert_groups}, topk_group={self.topk_groups}: the groups must divide "
                              f"n_routed_experts={self.num_experts} and their chosen experts hold num_experts_per_tok="
                              f"{self.experts_per_token}")
        if self.router_scoring == "sigmoid" and self.expert_groups > 1 and self.num_experts // self.expert_groups < 2:
            raise ConfigError(f"n_group={self.expert_groups}: a group of sigmoid-scored experts is scored by its best "
                              f"two, so it needs >= 2 of n_routed_experts={self.num_experts}")
        for name in ("attention_scale", "embedding_scale", "logit_softcap", "attn_softcap"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}={value!r} must be None or a positive float")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rotary_dim(self) -> int:
        """How many of a head's dimensions RoPE rotates (the last ones): all, or MLA's qk_rope_head_dim."""
        return self.qk_rope_head_dim or self.head_dim

    @property
    def sliding_window(self) -> int:
        """The largest window over layers (0 when every layer attends to the whole context)."""
        return max(self.layer_windows)

    @property
    def family(self) -> family_lib.Family:
        """The model family this config is of (jaxinfer.models.family)."""
        return family_lib.get(self.model_type)

    def num_params(self) -> int:
        return self.family.num_params(self)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """The config an HF config.json dict describes, read by its family (`model_type`, or the
        first registered `architectures` entry when the dict has no model_type)."""
        family = family_for_hf(hf)
        return family.read_config(family, hf)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        """The config of an HF config.json; ConfigError naming the file (and the field) otherwise."""
        hf = read_json_object(path, "config fields", ConfigError)
        try:
            return cls.from_hf_dict(hf)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF-style config.json dict that `from_hf_dict` reads back to an equal config."""
        return self.family.write_config(self.family, self)


def family_for_hf(hf: dict[str, Any]) -> family_lib.Family:
    """The registered family of a config.json dict: by model_type (as HF transformers picks a
    config class), or by architectures when there is no model_type; ConfigError otherwise."""
    model_type = hf.get("model_type")
    if model_type is None:
        architectures = hf.get("architectures")
        for arch in architectures if isinstance(architectures, list) else []:
            found = family_lib.by_architecture(arch) if isinstance(arch, str) else None
            if found is not None:
                return found
    elif isinstance(model_type, str) and model_type in family_lib.names():
        return family_lib.get(model_type)
    raise ConfigError(f"model_type={model_type!r} is not supported (supported: {', '.join(family_lib.names())})")


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    """HF's rope_parameters for a RopeConfig (the inverse of rope_from_hf)."""
    out: dict[str, Any] = {"rope_type": rope.type, "rope_theta": rope.theta}
    if rope.type in ("linear", "llama3", "yarn"):
        out["factor"] = rope.factor
    if rope.type == "llama3":
        out["low_freq_factor"] = rope.low_freq_factor
        out["high_freq_factor"] = rope.high_freq_factor
    if rope.type in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if rope.type == "yarn":
        out.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
        if rope.attention_factor is not None:
            out["attention_factor"] = rope.attention_factor
        if rope.mscale_all_dim:
            out["mscale_all_dim"] = rope.mscale_all_dim
    return out


def rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    """RoPE settings from HF's fields (either generation of them); ConfigError naming the field."""
    # transformers >= 5 writes `rope_parameters`; older files carry `rope_theta` + `rope_scaling`.
    for name in ("rope_parameters", "rope_scaling"):
        if not isinstance(hf.get(name) or {}, dict):
            raise ConfigError(f"{name}={hf[name]!r} is not an object of rope fields")
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = hf_field(params, "rope_theta", float, hf_field(hf, "rope_theta", float, 10000.0, minimum=0.0), minimum=0.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope_type={rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if "factor" not in params:
        raise ConfigError(f"rope scaling {rope_type!r} needs a 'factor'")
    kwargs: dict[str, Any] = dict(theta=theta, type=rope_type, factor=hf_field(params, "factor", float, minimum=0.0))
    if rope_type == "llama3":
        for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if name not in params:
                raise ConfigError(f"llama3 rope scaling needs {name!r}")
            kwargs[name] = hf_field(params, name, type(getattr(RopeConfig, name)), minimum=0)
        if kwargs["high_freq_factor"] <= kwargs["low_freq_factor"]:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    if rope_type == "yarn":
        if "original_max_position_embeddings" not in params:
            raise ConfigError("yarn rope scaling needs 'original_max_position_embeddings'")
        kwargs.update(
            original_max_position_embeddings=hf_field(params, "original_max_position_embeddings", int, minimum=1),
            beta_fast=hf_field(params, "beta_fast", float, 32.0, minimum=0.0),
            beta_slow=hf_field(params, "beta_slow", float, 1.0, minimum=0.0),
            truncate=hf_field(params, "truncate", bool, True))
        mscale = hf_field(params, "mscale", float, 0.0, minimum=0.0)
        kwargs["mscale_all_dim"] = hf_field(params, "mscale_all_dim", float, 0.0, minimum=0.0)
        if params.get("attention_factor") is not None:
            kwargs["attention_factor"] = hf_field(params, "attention_factor", float, minimum=0.0)
        elif mscale and kwargs["mscale_all_dim"]:  # DeepSeek's: HF's _compute_yarn_parameters
            kwargs["attention_factor"] = (yarn_mscale(kwargs["factor"], mscale)
                                          / yarn_mscale(kwargs["factor"], kwargs["mscale_all_dim"]))
    return RopeConfig(**kwargs)


MAX_LAYERS = 4096  # far past any published model; a larger count is a corrupt file (and would take forever to check)


def hf_field(hf: dict[str, Any], name: str, kind: type, default: Any = None, minimum: float | None = None,
             maximum: float | None = None) -> Any:
    """hf[name] as an int, float or bool (default when absent or null; no default: required), or
    ConfigError naming the field. An int field takes a whole float (4096.0), a float field an int."""
    value = hf.get(name)
    if value is None:
        if default is None:
            raise ConfigError(f"config.json has no {name!r}")
        value = default
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is not true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            kind is int and value != int(value)):
        raise ConfigError(f"{name}={value!r} is not {'an integer' if kind is int else 'a number'}")
    value = kind(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value!r} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={value!r} must be <= {maximum}")
    return value


def first_field(hf: dict[str, Any], *names: str) -> str:
    """The first of names that config.json sets (not null), else the first: one value that
    published files and transformers versions spell differently."""
    return next((name for name in names if hf.get(name) is not None), names[0])


def hf_token_ids(hf: dict[str, Any], name: str) -> tuple[int, ...]:
    """A token id or a list of them (absent: none), or ConfigError naming the field."""
    value = hf.get(name)
    values = [] if value is None else value if isinstance(value, list) else [value]
    return tuple(hf_field({name: v}, name, int, minimum=0) for v in values)


def windows_from_layer_types(hf: dict[str, Any], layer_types: Any, num_layers: int) -> tuple[int, ...]:
    """Per-layer sliding windows from HF's `layer_types` ("full_attention" / "sliding_attention"
    per layer) and `sliding_window`; ConfigError naming what does not fit."""
    window = hf_field(hf, "sliding_window", int, 0, minimum=0)
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise ConfigError(f"layer_types={layer_types!r} is not a list of layer type names")
    if len(layer_types) != num_layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries, num_hidden_layers is {num_layers}")
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ConfigError(f"layer_types {sorted(unknown)} are not supported")
    if "sliding_attention" in layer_types and not window:
        raise ConfigError("layer_types asks for sliding_attention but sliding_window is not set")
    return tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)


def read_common(hf: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields most families' config.json share (dimensions, RoPE, context, tied
    head, token ids), as keyword arguments; ConfigError naming a missing or bad field."""
    vocab_size = hf_field(hf, "vocab_size", int, minimum=1)
    hidden = hf_field(hf, "hidden_size", int, minimum=1)
    intermediate = hf_field(hf, "intermediate_size", int, minimum=1)
    num_layers = hf_field(hf, "num_hidden_layers", int, minimum=1, maximum=MAX_LAYERS)
    num_heads = hf_field(hf, "num_attention_heads", int, minimum=1)
    num_kv_heads = hf_field(hf, "num_key_value_heads", int, num_heads, minimum=1)
    head_dim = hf_field(hf, "head_dim", int, hidden // num_heads, minimum=1)
    bos = hf_token_ids(hf, "bos_token_id")
    if len(bos) > 1:
        raise ConfigError(f"bos_token_id={hf['bos_token_id']!r} is not one token id")
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=hf_field(hf, "rms_norm_eps", float, 1e-6, minimum=0.0),
        rope=rope_from_hf(hf),
        max_position_embeddings=hf_field(hf, "max_position_embeddings", int, 2048, minimum=1),
        tie_word_embeddings=hf_field(hf, "tie_word_embeddings", bool, False),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=hf_token_ids(hf, "eos_token_id"),
    )


def write_common(cfg: ModelConfig, family: family_lib.Family) -> dict[str, Any]:
    """The config.json fields `read_common` reads, with the family's architecture and activation."""
    return {
        "architectures": [family.architectures[0]],
        "model_type": family.name,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": family.activation,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope_to_hf(cfg.rope),
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
    }
