"""The Hugging Face checkpoint layout, shared by every loader (dense, AWQ/GPTQ, GGUF):
tensor names and the params slot each fills (from the family's spec, jaxinfer.models.family), the
shapes a config implies, the safetensors files of a directory, and header-only checks that name a
missing or mis-shaped tensor before any data is read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from safetensors import SafetensorError, safe_open

from jaxinfer.models import family as family_lib
from jaxinfer.models.config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtypes a dense weight may be stored in
# Present in some checkpoints, carry nothing the model needs.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match its config: missing, unexpected or mis-shaped."""


def resolve_dtype(dtype) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


@dataclasses.dataclass(frozen=True)
class Slot:
    name: str | None  # key in params (top level) or params["layers"]; None: a fused tensor (parts)
    layer: int | None  # the index in the param's stack over its layers (Param.layers_of); None for top-level params
    transpose: bool
    hf_shape: tuple[int, ...]  # the shape the checkpoint must hold
    part: tuple[int, int, int, int] | None = None  # a part of a fused tensor: (axis, start, stop, step)
    parts: tuple[Slot, ...] = ()  # a fused tensor: the params it is split into (Param.hf_part)
    expert: int | None = None  # a per-expert tensor: its index on the param's expert axis

    @property
    def index(self) -> tuple[slice, ...]:
        """A part's index into its fused tensor."""
        axis, start, stop, step = self.part
        return (slice(None),) * axis + (slice(start, stop, step),)


def expected_tensors(cfg: ModelConfig) -> dict[str, Slot]:
    """Every HF tensor a dense checkpoint of this config holds (its family's params, HF names),
    with the slot it fills: the top-level ones first, then layer by layer in params order. A fused
    tensor (several params' slices, Param.hf_part) is one slot whose parts are the params' slots,
    which must cover it exactly."""
    family = family_lib.of(cfg)
    out: dict[str, Slot] = {}
    present = family.present(cfg)
    for top in (True, False):
        for p in present:
            if p.layer == top:
                continue
            shape = tuple(p.shape(cfg))
            hf_shape = shape[::-1] if p.transpose else shape
            for i, layer in [(None, None)] if top else enumerate(p.layers_of(cfg)):  # i: the index in its stack
                name = family.hf_name(p, layer)
                if p.per_expert:
                    for e in range(shape[0]):
                        out[name.format(expert=e)] = Slot(p.name, i, p.transpose, tuple(shape[1:][::-1]), expert=e)
                    continue
                if p.hf_part is None:
                    out[name] = Slot(p.name, i, p.transpose, hf_shape)
                    continue
                axis, start, stop, step = p.hf_part(cfg)
                if len(range(start, stop, step)) != hf_shape[axis]:
                    raise ValueError(f"param {p.name}: hf_part {start}:{stop}:{step} of axis {axis} does not hold its "
                                     f"{hf_shape[axis]} entries")
                empty = tuple(0 if a == axis else d for a, d in enumerate(hf_shape))
                fused = out.get(name, Slot(None, i, p.transpose, empty))
                if any(d != f for a, (d, f) in enumerate(zip(hf_shape, fused.hf_shape)) if a != axis):
                    raise ValueError(f"param {p.name}: its shape {hf_shape} does not fit {name}'s other parts")
                shape = tuple(max(d, stop) if a == axis else d for a, d in enumerate(fused.hf_shape))
                part = Slot(p.name, i, p.transpose, hf_shape, part=(axis, start, stop, step))
                out[name] = dataclasses.replace(fused, hf_shape=shape, parts=(*fused.parts, part))
    for name, slot in out.items():
        if slot.parts and slot.layer in (None, 0):
            axis = slot.parts[0].part[0]
            covered = sorted(j for s in slot.parts for j in range(*s.part[1:]))
            if covered != list(range(slot.hf_shape[axis])):
                raise ValueError(f"the params of {name} do not cover its axis {axis} exactly once")
    return out


def fused_tensors(cfg: ModelConfig) -> list[str]:
    """The HF names (layer 0's, for a layer tensor) of the config's fused tensors."""
    return [name for name, slot in expected_tensors(cfg).items() if slot.parts and slot.layer in (None, 0)]


def safetensors_files(ckpt_dir: str) -> list[str]:
    """The checkpoint's safetensors files (from its index when sharded), each checked to exist."""
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, "rb") as f:
            try:
                weight_map = json.loads(f.read().decode("utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
                if not all(isinstance(name, str) for name in files):
                    raise TypeError("a file name is not a string")
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a safetensors index (a JSON object with a weight_map of "
                                      f"tensor -> file): {type(e).__name__}: {e}") from None
    else:
        files = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {ckpt_dir}")
    paths = [os.path.join(ckpt_dir, f) for f in files]
    for p in paths:
        if not os.path.exists(p):
            raise CheckpointError(f"the index names {os.path.basename(p)}, which is not in {ckpt_dir}")
    return paths


def header_entries(files: list[str], cfg: ModelConfig) -> Iterator[tuple[str, str, tuple[int, ...], str]]:
    """(file, tensor name, shape, safetensors dtype) of every tensor the model may read, from the
    headers alone; ignored tensors (and a tied model's LM head) are skipped."""
    family = family_lib.of(cfg)
    tied = {family.hf_name(p) for p in family.params if p.role == "head"} if cfg.tie_word_embeddings else set()
    for path in files:
        try:
            f = safe_open(path, framework="numpy")
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (empty or truncated?): {e}") from None
        with f:
            for key in f.keys():
                if IGNORED.match(key) or key in tied:
                    continue
                sl = f.get_slice(key)
                yield path, key, tuple(sl.get_shape()), sl.get_dtype()


def check_complete(needed: dict[str, tuple[int, ...]], location: dict[str, str], why: str = "") -> None:
    """Raise naming the first tensor of `needed` (name -> shape) that no file holds."""
    missing = sorted(set(needed) - set(location))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]!r} (expected shape {needed[missing[0]]}){why}{more}")


@functools.partial(jax.jit, static_argnames=("transpose",), donate_argnums=0)
def write_layer(buf, x, i, *, transpose):
    """buf (L, ...) with x (transposed if asked, cast to buf's dtype) written at layer i."""
    x = x.T if transpose else x
    return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, axis=0)


@functools.partial(jax.jit, static_argnames=("transpose",), donate_argnums=0)
def write_expert(buf, x, i, e, *, transpose):
    """buf (L, E, ...) with x (transposed if asked, cast) written at layer i, expert e."""
    x = x.T if transpose else x
    return buf.at[i, e].set(x.astype(buf.dtype))
