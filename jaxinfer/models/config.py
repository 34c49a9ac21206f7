"""ModelConfig: the static description of a Llama-family decoder, read from an HF config.json.

A frozen, hashable dataclass, so it can be a static argument of `jax.jit`. Every option that
changes the model's arithmetic is a field here; an option that this code does not implement
raises `ConfigError` naming it, so an unsupported checkpoint never loads as a silently wrong model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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


class ConfigError(ValueError):
    """A config.json that describes a model this code cannot run exactly."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: base frequency and the optional long-context rescaling."""

    theta: float = 10000.0
    type: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

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
        return inv_freq


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Dimensions and options of a Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3).

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
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    # Sliding-window size per layer; 0 means full causal attention for that layer. None: all 0.
    layer_windows: tuple[int, ...] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

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
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def sliding_window(self) -> int:
        """The largest window over layers (0 when every layer attends to the whole context)."""
        return max(self.layer_windows)

    def num_params(self) -> int:
        D, F, V, H = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        N, K = self.num_heads, self.num_kv_heads
        attn = D * H * (N + 2 * K) + N * H * D
        attn += self.qkv_bias * H * (N + 2 * K) + self.o_bias * D + self.qk_norm * 2 * H
        per_layer = attn + 3 * D * F + 2 * D
        return V * D + self.num_layers * per_layer + D + (0 if self.tie_word_embeddings else D * V)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        return _from_hf(hf)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        """The config of an HF config.json; ConfigError naming the file (and the field) otherwise."""
        hf = read_json_object(path, "config fields", ConfigError)
        try:
            return _from_hf(hf)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF-style config.json dict that `from_hf_dict` reads back to an equal config."""
        rope: dict[str, Any] = {"rope_type": self.rope.type, "rope_theta": self.rope.theta}
        if self.rope.type in ("linear", "llama3"):
            rope["factor"] = self.rope.factor
        if self.rope.type == "llama3":
            rope["low_freq_factor"] = self.rope.low_freq_factor
            rope["high_freq_factor"] = self.rope.high_freq_factor
            rope["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
        out = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
        }
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.o_bias
        if any(self.layer_windows):
            if self.model_type != "mistral" or len(set(self.layer_windows)) != 1:
                raise ConfigError("to_hf_dict writes sliding windows for mistral (one window) only")
            out["sliding_window"] = self.layer_windows[0]
        return out


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older files carry `rope_theta` + `rope_scaling`.
    for name in ("rope_parameters", "rope_scaling"):
        if not isinstance(hf.get(name) or {}, dict):
            raise ConfigError(f"{name}={hf[name]!r} is not an object of rope fields")
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = _field(params, "rope_theta", float, _field(hf, "rope_theta", float, 10000.0, minimum=0.0), minimum=0.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope_type={rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if "factor" not in params:
        raise ConfigError(f"rope scaling {rope_type!r} needs a 'factor'")
    kwargs: dict[str, Any] = dict(theta=theta, type=rope_type, factor=_field(params, "factor", float, minimum=0.0))
    if rope_type == "llama3":
        for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if name not in params:
                raise ConfigError(f"llama3 rope scaling needs {name!r}")
            kwargs[name] = _field(params, name, type(getattr(RopeConfig, name)), minimum=0)
        if kwargs["high_freq_factor"] <= kwargs["low_freq_factor"]:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return RopeConfig(**kwargs)


def _layer_windows(hf: dict[str, Any], model_type: str, num_layers: int) -> tuple[int, ...]:
    window = _field(hf, "sliding_window", int, 0, minimum=0)
    if model_type == "mistral":
        return (window,) * num_layers
    if model_type in ("qwen2", "qwen3"):
        layer_types = hf.get("layer_types")
        if layer_types is None:
            if not _field(hf, "use_sliding_window", bool, False):
                return (0,) * num_layers
            first = _field(hf, "max_window_layers", int, num_layers, minimum=0)
            layer_types = ["full_attention" if i < first else "sliding_attention" for i in range(num_layers)]
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
    return (0,) * num_layers


MAX_LAYERS = 4096  # far past any published model; a larger count is a corrupt file (and would take forever to check)


def _field(hf: dict[str, Any], name: str, kind: type, default: Any = None, minimum: float | None = None,
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


def _token_ids(hf: dict[str, Any], name: str) -> tuple[int, ...]:
    """A token id or a list of them (absent: none), or ConfigError naming the field."""
    value = hf.get(name)
    values = [] if value is None else value if isinstance(value, list) else [value]
    return tuple(_field({name: v}, name, int, minimum=0) for v in values)


def _from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type={model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
    if _field(hf, "mlp_bias", bool, False):
        raise ConfigError("mlp_bias=True is not supported")
    attention_bias = _field(hf, "attention_bias", bool, model_type == "qwen2")
    if model_type == "qwen2" and not attention_bias:
        raise ConfigError("qwen2 with attention_bias=False is not supported")
    vocab_size = _field(hf, "vocab_size", int, minimum=1)
    hidden = _field(hf, "hidden_size", int, minimum=1)
    intermediate = _field(hf, "intermediate_size", int, minimum=1)
    num_layers = _field(hf, "num_hidden_layers", int, minimum=1, maximum=MAX_LAYERS)
    num_heads = _field(hf, "num_attention_heads", int, minimum=1)
    num_kv_heads = _field(hf, "num_key_value_heads", int, num_heads, minimum=1)
    head_dim = _field(hf, "head_dim", int, hidden // num_heads, minimum=1)
    bos = _token_ids(hf, "bos_token_id")
    if len(bos) > 1:
        raise ConfigError(f"bos_token_id={hf['bos_token_id']!r} is not one token id")
    # Llama and Qwen3 put `attention_bias` on q, k, v and o; Qwen2 always biases q, k, v only.
    llama_bias = model_type in ("llama", "qwen3") and attention_bias
    return ModelConfig(
        model_type=model_type,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_field(hf, "rms_norm_eps", float, 1e-6, minimum=0.0),
        rope=_rope_from_hf(hf),
        max_position_embeddings=_field(hf, "max_position_embeddings", int, 2048, minimum=1),
        tie_word_embeddings=_field(hf, "tie_word_embeddings", bool, False),
        qkv_bias=model_type == "qwen2" or llama_bias,
        o_bias=llama_bias,
        qk_norm=model_type == "qwen3",
        layer_windows=_layer_windows(hf, model_type, num_layers),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=_token_ids(hf, "eos_token_id"),
    )
