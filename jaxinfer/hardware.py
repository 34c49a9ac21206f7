"""The cards and model shapes the planner reads (jaxinfer.memory re-exports these): `Hardware` from
configs/hardware/*.json (datasheet figures, optionally `Measured` ceilings), ModelConfigs from
configs/models/*.json, or either from a JSON file path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from jaxinfer.models.config import ModelConfig

# configs/ sits beside the package in the repository; jaxinfer/configs links to it, so a wheel
# carries it as package data.
CONFIGS_DIR = pathlib.Path(__file__).parent / "configs"


@dataclasses.dataclass(frozen=True)
class Measured:
    """Ceilings measured on a card (medians), to compare against the datasheet."""

    memory_bandwidth_bytes_per_s: float  # elementwise bf16, bytes read + written
    gemv_bf16_bytes_per_s: float  # weight bytes read by a bf16 GEMV through XLA
    matmul_bf16_flops: float  # large bf16 matmul through XLA
    date: str
    source: str


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One GPU's datasheet figures. Tensor FLOP/s are dense (no sparsity)."""

    name: str
    arch: str  # "ampere" | "ada" | "hopper"
    memory_bytes: int
    memory_bandwidth_bytes_per_s: float
    peak_bf16_flops: float
    peak_fp16_flops: float
    peak_int8_ops: float
    peak_fp8_flops: float | None  # None where the card has no fp8 tensor cores (Ampere)
    l2_bytes: int
    sm_count: int
    source: str
    measured: Measured | None = None


def _config_path(kind: str, field: str, name: str | os.PathLike) -> pathlib.Path:
    """`name` as a path to a JSON file, or a file stem under configs/<kind>/."""
    path = pathlib.Path(name)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ValueError(f"{field}={str(name)!r}: no such file")
        return path
    path = CONFIGS_DIR / kind / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"{field}={str(name)!r} is unknown; known: {', '.join(_names(kind))}")
    return path


def _names(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / kind).glob("*.json"))


def list_hardware() -> list[str]:
    """Card names under configs/hardware (file stems, e.g. "h100_80gb")."""
    return _names("hardware")


def list_models() -> list[str]:
    """Model names under configs/models (file stems, e.g. "llama3_8b")."""
    return _names("models")


def load_model_config(name: str | os.PathLike) -> ModelConfig:
    """A ModelConfig from configs/models/<name>.json, or from a config.json path."""
    return ModelConfig.from_json_file(_config_path("models", "model", name))


def load_hardware(name: str | os.PathLike) -> Hardware:
    """A card from configs/hardware/<name>.json (e.g. "rtx3080_10gb"), or from a JSON file path."""
    path = _config_path("hardware", "card", name)
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    _check_fields(path, data, Hardware, optional={"measured"})
    if data.get("measured") is not None:
        _check_fields(path, data["measured"], Measured, optional=set())
        data["measured"] = Measured(**data["measured"])
    return Hardware(**data)


def _check_fields(path: pathlib.Path, data: dict[str, Any], cls: type, optional: set[str]) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(fields - optional - data.keys())
    if missing:
        raise ValueError(f"{path}: {cls.__name__} field(s) {', '.join(missing)} missing")
    unknown = sorted(data.keys() - fields)
    if unknown:
        raise ValueError(f"{path}: {', '.join(unknown)} not {cls.__name__} field(s)")
