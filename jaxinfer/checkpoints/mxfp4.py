"""MXFP4 checkpoints (`quantization_config.quant_method = "mxfp4"`), as gpt-oss is published: each
expert weight (E, K, N) of the HF layout is stored as `<name>_blocks` uint8 (E, N, K / 32, 16) and
`<name>_scales` uint8 (E, N, K / 32) (jaxinfer.models.formats.MXFP4Weight), every other tensor as
usual. The experts load as MXFP4Weight, stacked over layers, and stay packed; a fused tensor's
params (gpt-oss's gate_up_proj: gate and up in alternate output columns) are cut from the packed
rows, which hold whole output columns. Shapes are checked from the headers first, naming the
tensor and both shapes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxinfer.checkpoints.hf_layout import CheckpointError, expected_tensors, header_entries, safetensors_files
from jaxinfer.models import family as family_lib
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.formats import MX_BLOCK, MXFP4Weight

SUFFIXES = ("_blocks", "_scales")


def _is_expert_weight(cfg: ModelConfig, slot) -> bool:
    family = family_lib.of(cfg)
    return all(family.param(s.name).role in family_lib.EXPERT_ROLES for s in slot.parts or (slot,))


def packed_tensors(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """HF name of every expert weight tensor -> the names of its blocks and scales tensors."""
    return {name: tuple(name + s for s in SUFFIXES) for name, slot in expected_tensors(cfg).items()
            if slot.layer is not None and _is_expert_weight(cfg, slot)}


def _packed_shapes(hf_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    E, K, N = hf_shape
    if K % MX_BLOCK:
        raise CheckpointError(f"an MXFP4 weight's input size {K} is not a multiple of {MX_BLOCK}")
    return (E, N, K // MX_BLOCK, MX_BLOCK // 2), (E, N, K // MX_BLOCK)


def load_packed(ckpt_dir: str, cfg: ModelConfig, packed: dict[str, tuple[str, str]]) -> dict[str, MXFP4Weight]:
    """The expert params, each an MXFP4Weight stacked over layers (L, E, N, K / 32, 16)."""
    expected = expected_tensors(cfg)
    files = safetensors_files(ckpt_dir)
    location = {}
    for path, key, shape, stored in header_entries(files, cfg):
        for name, keys in packed.items():
            if key in keys:
                want = _packed_shapes(expected[name].hf_shape)[keys.index(key)]
                if shape != want or stored != "U8":
                    raise CheckpointError(f"tensor {key!r} is {stored} {shape}, expected U8 {want} (in {path})")
                location[key] = path
    missing = sorted({k for keys in packed.values() for k in keys} - set(location))
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]!r} of an MXFP4 checkpoint in {ckpt_dir}")

    layers: dict[str, list] = {}  # param -> per layer (blocks, scales)
    for name, (blocks_key, scales_key) in packed.items():
        slot = expected[name]
        with safe_open(location[blocks_key], framework="numpy") as f:
            blocks = f.get_tensor(blocks_key)
        with safe_open(location[scales_key], framework="numpy") as f:
            scales = f.get_tensor(scales_key)
        for part in slot.parts or (slot,):
            rows = slice(None) if part.part is None else slice(*part.part[1:])  # output columns: axis 1 packed
            if part.part is not None and part.part[0] != 2:
                raise CheckpointError(f"{name}: a fused MXFP4 tensor split on axis {part.part[0]} is not supported")
            layers.setdefault(part.name, [None] * cfg.num_layers)[part.layer] = (blocks[:, rows], scales[:, rows])
    return {name: MXFP4Weight(blocks=jnp.asarray(np.stack([b for b, _ in per_layer])),
                              scales=jnp.asarray(np.stack([s for _, s in per_layer])))
            for name, per_layer in layers.items()}
