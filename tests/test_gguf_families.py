"""GGUF files of the newer families: Qwen3-MoE, Qwen2-MoE, Mixtral, gpt-oss, Phi-3, Gemma 2, Gemma 3.

Each starts as a small random HF model (helpers.hf_model), saved as safetensors and converted the way
llama.cpp's convert_hf_to_gguf.py converts it (`convert`: gguf's own tensor-name map and writer, a
layer's experts stacked into one tensor, llama's wq / wk rows reordered for its RoPE, gpt-oss's
gate_up_proj split and its experts in MXFP4, Gemma's norms written as 1 + w, the metadata keys each
of its converter classes writes), then loaded by us, by us from the safetensors, and by HF
transformers' GGUF loader. HF's loader leaves some keys unread and takes its config defaults
instead; CASES tells it what the file says (the experts' sizes, Gemma 2's soft-caps) or what
llama.cpp assumes (Gemma's query scale), and test_gemma_config_follows_llama_cpp shows where the two
differ. HF's loader does not read two of them: a Mixtral file (general.architecture=llama) becomes a
dense Llama without its experts, and a gpt-oss file fails in it (transformers 5.25: a TypeError; its
gpt-oss tensor processor looks for ffn_*_projs, names llama.cpp does not write); there the reference
is HF's own model on the values the file holds (`_rounded`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import zlib

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from helpers import assert_rows_close, hf_model, row_errors, save_hf
from safetensors.numpy import load_file, save_file
from test_gguf import MERGES, SPECIALS, TEMPLATE, _encode, _rope_permute, _vocab

import jaxinfer as ji
from jaxinfer.checkpoints import gguf as gguf_lib
from jaxinfer.models import formats

Q = gguf.GGMLQuantizationType
VOCAB = 256 + len(MERGES) + len(SPECIALS) + 1  # test_gguf's byte-level BPE vocabulary
BOS, EOS = 256 + len(MERGES) + 1, 256 + len(MERGES) + 2
ROPES = {"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
# Case (its GGUF architecture, but for Mixtral's: ARCH) -> (helpers.ARCHS entry, overrides of its HF
# config, what HF's GGUF loader is told).
# The experts' sizes are multiples of 32 so Q8_0 / Q4_0 / Q4_1 blocks fit them. Gemma's
# query_pre_attn_scalar is head_dim, which llama.cpp assumes; Gemma 3 takes llama.cpp's pattern of
# one global layer in six (6 layers, so one is global).
CASES = {
    "qwen3moe": ("qwen3_moe", dict(moe_intermediate_size=64), dict(moe_intermediate_size=64)),
    "qwen2moe": ("qwen2_moe", dict(moe_intermediate_size=64, shared_expert_intermediate_size=96),
                 dict(moe_intermediate_size=64, shared_expert_intermediate_size=96)),
    "mixtral": ("mixtral", dict(intermediate_size=64), None),
    # gpt-oss with what llama.cpp fixes: the SwiGLU clamp 7 and YaRN's ramp rounded to whole dimensions.
    "gpt-oss": ("gpt_oss", dict(intermediate_size=64, swiglu_limit=7.0, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=8.0, beta_slow=1.0, truncate=True,
        original_max_position_embeddings=16)), None),
    "phi3": ("phi3", {}, {}),
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=16),
               dict(query_pre_attn_scalar=16, attn_logit_softcapping=3.0, final_logit_softcapping=4.0)),
    "gemma3": ("gemma3", dict(query_pre_attn_scalar=16, sliding_window_pattern=6, num_hidden_layers=6,
                              rope_parameters=ROPES), dict(query_pre_attn_scalar=16)),
}
ARCH = {"mixtral": "llama"}  # case -> general.architecture, where they differ (llama.cpp writes Mixtral as llama)
# Block types of the quantised files, by GGUF tensor (llama-quantize's choices differ; these cover
# every packed type on experts, fused and plain projections, and a dequantised F16 / Q8_0 / Q4_1 rest).
TYPES = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_qkv": Q.Q4_1, "attn_output": Q.F16,
         "ffn_gate": Q.Q8_0, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_0, "ffn_gate_exps": Q.Q4_1, "ffn_up_exps": Q.Q8_0,
         "ffn_down_exps": Q.Q4_0, "ffn_gate_shexp": Q.Q8_0, "ffn_up_shexp": Q.Q4_1, "ffn_down_shexp": Q.Q4_0,
         "token_embd": Q.Q8_0, "output": Q.Q4_1}
# gpt-oss's experts in MXFP4, as llama.cpp's converter keeps the published ones.
TYPES_OF = {"gpt-oss": {**TYPES, "ffn_gate_exps": Q.MXFP4, "ffn_up_exps": Q.MXFP4, "ffn_down_exps": Q.MXFP4}}


def _metadata(w: gguf.GGUFWriter, arch: str, hp: dict) -> None:
    """The `{arch}.*` keys convert_hf_to_gguf.py's class for the architecture writes: Phi-3's and
    Gemma 2's their own; the others TextModel.set_gguf_parameters' (RoPE bases, the expert counts
    where config.json has them, head_dim where it has one) and their class's additions (the experts'
    sizes; Gemma 3's head_dim and window)."""
    rope = hp.get("rope_parameters") or {}
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(hp["max_position_embeddings"])
        w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * hp["hidden_size"])
                                   // hp["num_attention_heads"])
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_sliding_window(hp.get("sliding_window") or 0)
        return
    if arch == "gemma2":
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
        w.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
        w.add_sliding_window(hp["sliding_window"])
        return
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    if "sliding_attention" in rope:
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    if experts := hp.get("num_local_experts", hp.get("num_experts")):
        w.add_expert_count(experts)
        w.add_expert_used_count(hp["num_experts_per_tok"])
    if hp.get("head_dim"):
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if arch in ("qwen3moe", "qwen2moe"):
        w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
        if "shared_expert_intermediate_size" in hp:
            w.add_expert_shared_feed_forward_length(hp["shared_expert_intermediate_size"])
    if arch == "gemma3":
        w.add_sliding_window(hp["sliding_window"])
    if arch == "gpt-oss":  # GptOssModel.set_gguf_parameters' keys, YaRN's as TextModel writes them
        w.add_sliding_window(hp["sliding_window"])
        w.add_expert_feed_forward_length(hp["intermediate_size"])
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    if arch == "llama":  # LlamaModel.set_gguf_parameters' own keys
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])


_EXPERT = re.compile(r"(model\.layers\.\d+\.\w+\.experts)\.(\d+)\.(\w+)\.weight")  # HF's one tensor per expert


def _names(arch: str, hp: dict):
    """gguf's tensor-name map of the architecture: HF name -> GGUF name."""
    return gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                    hp["num_hidden_layers"])


def _gguf_name(names, name: str) -> str:
    """An HF tensor's GGUF name; an expert's is that of the layer's stacked tensor."""
    if m := _EXPERT.fullmatch(name):
        name = f"{m[1]}.{m[3]}.weight"
    return names.get_name(name, try_suffixes=(".weight", ".bias"))


_IN_OUT = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # gpt-oss's expert weights, HF (E, in, out)


def _pieces(arch: str, name: str, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """An HF tensor as the tensors GptOssModel.modify_tensors makes of it, (HF name for gguf's name
    map, array): gate_up_proj (E, D, 2F) transposed and split by alternate rows into gate_proj and
    up_proj (E, F, D), down_proj transposed, their biases split alike, the sinks named `.weight`.
    Other architectures' tensors pass as they are."""
    if arch != "gpt-oss":
        return [(name, x)]
    if name.endswith(_IN_OUT):
        x, name = np.swapaxes(x, -1, -2), name + ".weight"
    if ".gate_up_proj" in name:
        pieces = ((".gate_proj", x[..., ::2, :] if x.ndim == 3 else x[..., ::2]),
                  (".up_proj", x[..., 1::2, :] if x.ndim == 3 else x[..., 1::2]))
        return [(name.replace(".gate_up_proj", part).replace("_bias", ".bias"), y) for part, y in pieces]
    return [(name.replace("_proj_bias", "_proj.bias").replace(".sinks", ".sinks.weight"), x)]


def _block_type(new: str, x: np.ndarray, types: dict | None):
    """The block type convert stores a tensor in: 1-D tensors, biases, norms and routers F32, the
    others as `types` says by GGUF name (default F32)."""
    if x.ndim <= 1 or new.endswith(("_norm.weight", ".bias")) or "gate_inp" in new:
        return Q.F32
    return (types or {}).get(new.split(".")[-2], Q.F32)


def convert(folder, path, arch: str, types: dict | None = None, *, skip=(), meta=None, squeeze=True) -> None:
    """An HF checkpoint folder -> a GGUF file, as convert_hf_to_gguf.py writes it: its metadata
    (`_metadata`; `meta` replaces or adds keys, `skip` leaves keys and tensors out), test_gguf's
    vocabulary, a layer's per-expert tensors stacked (E, out, in) under the stacked HF name, llama's
    q / k rows reordered within each head (LlamaModel.permute), Gemma's `*norm.weight` plus 1 and no
    lm_head, names by gguf's tensor-name map, block types by `_block_type`. Qwen2-MoE's (1, D)
    shared-expert gate squeezed to (D,) as older converters wrote it (HF's loader reads only that),
    or kept (squeeze=False) as newer ones do."""
    hp = json.loads((folder / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, arch, hp)
    tokens, token_types = _vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_pad_token_id(EOS)
    w.add_chat_template(TEMPLATE)
    for key, value in (meta or {}).items():
        vtype = {float: gguf.GGUFValueType.FLOAT32, str: gguf.GGUFValueType.STRING}.get(type(value),
                                                                                     gguf.GGUFValueType.UINT32)
        w.kv_data[0][key] = gguf.GGUFValue(value, vtype)
    for key in skip:
        w.kv_data[0].pop(key, None)

    names = _names(arch, hp)
    num_experts = hp.get("num_local_experts", hp.get("num_experts"))
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, x in load_file(folder / "model.safetensors").items():
        if arch.startswith("gemma") and name == "lm_head.weight":
            continue
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            x = x + np.float32(1)
        if arch == "llama" and (heads := {"q_proj": hp["num_attention_heads"],
                                          "k_proj": hp["num_key_value_heads"]}.get(name.split(".")[-2])):
            x = _rope_permute(x, heads)
        if m := _EXPERT.fullmatch(name):
            stack = experts.setdefault((m[1], m[3]), {})
            stack[int(m[2])] = x
            if len(stack) < num_experts:
                continue
            x = np.stack([stack[e] for e in range(num_experts)])
        for piece, x in _pieces(arch, name, x):
            new = _gguf_name(names, piece)
            if new.endswith("ffn_gate_inp_shexp.weight") and squeeze:
                x = x.reshape(-1)
            if new in skip:
                continue
            qtype = _block_type(new, x, types)
            if qtype == Q.F32:
                w.add_tensor(new, np.ascontiguousarray(x, np.float32))
            else:
                w.add_tensor(new, _encode(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """arch -> the folder of its random HF model: model.safetensors, f32.gguf, quantised.gguf (made once)."""
    made = {}

    def get(case: str):
        if case not in made:
            name, overrides, _ = CASES[case]
            folder = tmp_path_factory.mktemp(case)
            save_hf(hf_model(name, seed=zlib.crc32(case.encode()) % 1000, vocab_size=VOCAB, **overrides), folder)
            convert(folder, folder / "f32.gguf", ARCH.get(case, case))
            convert(folder, folder / "quantised.gguf", ARCH.get(case, case), TYPES_OF.get(case, TYPES))
            made[case] = folder
        return made[case]

    return get


def _rounded(folder, case: str):
    """HF's model of the values the quantised file holds, for an architecture HF's GGUF loader does
    not read: the safetensors checkpoint with every tensor quantised and dequantised by gguf in the
    block type convert stores it in (a block is 32 values of one row, so the rotary row reordering,
    the experts' stacking and gpt-oss's split of alternate rows commute with it; gpt-oss's (in, out)
    experts are rounded along their input axis, as the file's (out, in) rows)."""
    out = folder / "rounded"
    if not out.exists():
        hp = json.loads((folder / "config.json").read_text())
        arch = ARCH.get(case, case)
        names = _names(arch, hp)
        rounded = {}
        for name, x in load_file(folder / "model.safetensors").items():
            piece, y = _pieces(arch, name, x)[0]
            qtype = _block_type(_gguf_name(names, piece), y, TYPES_OF.get(case, TYPES))
            flip = arch == "gpt-oss" and name.endswith(_IN_OUT)
            y = np.swapaxes(x, -1, -2) if flip else x
            if qtype != Q.F32:
                y = gguf.quants.dequantize(_encode(y, qtype), qtype).reshape(y.shape)
            rounded[name] = np.ascontiguousarray(np.swapaxes(y, -1, -2) if flip else y)
        out.mkdir()
        save_file(rounded, out / "model.safetensors", metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(hp))
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def _hf_gguf(folder, case: str, name: str = "quantised.gguf"):
    """HF's model of the quantised file: by its GGUF loader, or `_rounded` where that does not read it."""
    if CASES[case][2] is None:
        return _rounded(folder, case)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                             **CASES[case][2]).eval()


# --- the file loads as the model it was converted from -----------------------------------------


@pytest.mark.parametrize("arch", list(CASES))
def test_loads_as_its_safetensors_model(arch, converted):
    """An F32 file loads to the params of the safetensors it came from, exactly: experts unstacked
    from their (E, out, in) tensors, Phi-3's fused tensors split as config.json's loader splits them,
    Gemma's norms (1 + w in the file) back to w with the same gain 1 + w. The config is the same but
    for what GGUF stores otherwise: float32 eps, the tokenizer's BOS / EOS, and Phi-3's window, which
    llama.cpp turns off (the file still says 7)."""
    folder = converted(arch)
    ours, ref = ji.load_model(folder / "f32.gguf"), ji.load_model(folder)
    expected = dataclasses.replace(ref.config, rms_norm_eps=float(np.float32(ref.config.rms_norm_eps)),
                                   bos_token_id=BOS, eos_token_ids=(EOS,))
    if arch == "phi3":
        assert ref.config.layer_windows == (7,) * 3
        assert gguf_lib.read_metadata(gguf.GGUFReader(folder / "f32.gguf"))["phi3.attention.sliding_window"] == 7
        expected = dataclasses.replace(expected, layer_windows=(0,) * 3)
    assert ours.config == expected
    norm = ref.config.family.norm
    theirs = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(ref.params)[0]}
    mine = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(ours.params)[0]}
    assert mine.keys() == theirs.keys()
    for key, want in theirs.items():
        got, want = np.asarray(mine[key]), np.asarray(want)
        if norm.kind == "rms_plus_1" and key.endswith("norm']"):  # the gains, as both compute them
            got, want = np.float32(1) + got, np.float32(1) + want
        np.testing.assert_array_equal(got, want, err_msg=key)


def test_qwen2moe_shared_gate_loads_squeezed_or_not(converted, tmp_path):
    """Qwen2-MoE's shared-expert gate, (1, D) in HF, is (D,) in files of older converters (they
    squeezed every tensor) and (1, D) in newer ones'; llama.cpp reads both, and so does the loader."""
    folder = converted("qwen2moe")
    convert(folder, tmp_path / "kept.gguf", "qwen2moe", squeeze=False)
    shapes = {t.name: tuple(t.shape) for t in gguf.GGUFReader(tmp_path / "kept.gguf").tensors}
    assert shapes["blk.0.ffn_gate_inp_shexp.weight"] == (64, 1)  # ne order: (D, 1)
    squeezed = ji.load_model(folder / "f32.gguf").params["layers"]["shared_expert_gate"]
    np.testing.assert_array_equal(ji.load_model(tmp_path / "kept.gguf").params["layers"]["shared_expert_gate"],
                                  squeezed)


def test_mxfp4_experts_stay_packed_and_dequantise_exactly(converted):
    """gpt-oss's MXFP4 expert tensors load as formats.MXFP4Weight (ggml's 17-byte blocks, nibbles
    reordered, never dequantised on the host) whose values are gguf's own dequantisation of the
    file's tensors, bit for bit, for every layer and expert."""
    folder = converted("gpt-oss")
    reader = gguf.GGUFReader(folder / "quantised.gguf")
    tensors = {t.name: t for t in reader.tensors}
    layers = ji.load_model(folder / "quantised.gguf").params["layers"]
    for name, stored in (("experts_gate", "ffn_gate_exps"), ("experts_up", "ffn_up_exps"),
                         ("experts_down", "ffn_down_exps")):
        w = layers[name]
        assert isinstance(w, formats.MXFP4Weight) and w.blocks.dtype == np.uint8
        got = np.asarray(formats.dequantize_mxfp4(w))  # (L, E, K, N)
        for i in range(got.shape[0]):
            t = tensors[f"blk.{i}.{stored}.weight"]
            assert t.tensor_type == Q.MXFP4
            want = gguf.quants.dequantize(np.asarray(t.data), Q.MXFP4).reshape(tuple(reversed(t.shape)))  # (E, N, K)
            np.testing.assert_array_equal(got[i], np.swapaxes(want, -1, -2), err_msg=f"{name} layer {i}")


def test_sentencepiece_vocabulary_loads_without_a_tokenizer(converted, tmp_path):
    """llama.cpp's converter writes Phi-3's and Gemma's sentencepiece vocabularies
    (tokenizer.ggml.model=llama), which are not rebuilt: the model loads, with a warning, and takes
    token ids."""
    folder = converted("phi3")
    convert(folder, tmp_path / "spm.gguf", "phi3", meta={"tokenizer.ggml.model": "llama"})
    with pytest.warns(UserWarning, match="tokenizer.ggml.model='llama' is not read"):
        model = ji.load_model(tmp_path / "spm.gguf")
    assert model.tokenizer is None
    assert model.config == ji.load_model(folder / "f32.gguf").config


# --- against HF transformers' GGUF loader --------------------------------------------------------


@pytest.mark.parametrize("arch", list(CASES))
def test_logits_match_hf_transformers_gguf_loader(arch, converted, seed):
    """The quantised file: Q8_0 / Q4_0 / Q4_1 experts and projections (fused ones split by rows
    included) stay packed; logits within 1e-4 per row of HF's GGUF-loaded model (it dequantises
    every tensor; for Mixtral, HF's Mixtral on the file's values: `_rounded`) on 11 tokens,
    longer than Phi-3's window of 7 (on in HF's config.json, off in the file) and Gemma's of 5."""
    folder = converted(arch)
    model = ji.load_model(folder / "quantised.gguf")
    layers = model.params["layers"]
    experts = model.config.num_experts > 0
    packed = ("experts_gate", "experts_up", "experts_down") if experts else ("wq", "wk", "wv", "w_gate", "w_down")
    for name in packed:
        assert isinstance(layers[name], formats.MXFP4Weight if arch == "gpt-oss" else formats.QuantizedWeight), name
    if experts and arch != "gpt-oss":
        assert layers["experts_gate"].qweight.shape[:2] == (3, 4) and layers["experts_gate"].mins is not None
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (2, 11))
    with torch.no_grad():
        expected = _hf_gguf(folder, arch)(torch.tensor(tokens)).logits.numpy()
    ours = ji.forward_logits(model, tokens)
    print(f"{arch}: max row error against HF {row_errors(ours, expected).max():.2g}")
    assert_rows_close(ours, expected, 1e-4)


# The engine's programs take 1-1.6 s per architecture on the 2-core CPU: the fast tier runs the one
# with the most paths (packed experts beside a shared expert), the slow tier the rest.
@pytest.mark.parametrize("arch", [a if a == "qwen2moe" else pytest.param(a, marks=pytest.mark.slow) for a in CASES])
def test_greedy_tokens_match_hf(arch, converted, rng):
    """16 greedy tokens from the engine on the quantised file (pages of 4, so the windows cross
    page boundaries) are HF's: each is the argmax of HF's GGUF-loaded model given the tokens before
    it (one HF pass over prompt + completion, which is what greedy equality means)."""
    folder = converted(arch)
    model = ji.load_model(folder / "quantised.gguf")
    prompt = rng.integers(0, 256, 9).tolist()
    out = ji.Engine(model, ji.EngineConfig(max_batch=1, page_size=4)).generate(
        [prompt], ji.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    full = prompt + out.token_ids
    with torch.no_grad():
        expected = _hf_gguf(folder, arch)(torch.tensor([full[:-1]])).logits[0].numpy()
    assert len(out.token_ids) == 16
    assert np.argmax(expected[len(prompt) - 1:], axis=-1).tolist() == out.token_ids


# --- what llama.cpp reads from the metadata, and what it fixes, per architecture ----------------


QK_NORMS = ("attn_q_norm.weight", "attn_k_norm.weight")


def _metadata_of(arch: str, layer_tensors=(), **keys) -> tuple[dict, dict]:
    """A metadata dict (hidden 64, 4 heads of 32, FFN 96; `keys` added or replaced) and tensor
    stubs (the embedding, tied, and layer 0's `layer_tensors`) for config_from_metadata."""
    keys = {"embedding_length": 64, "feed_forward_length": 96, "block_count": 2, "attention.head_count": 4,
            "attention.head_count_kv": 2, "attention.key_length": 32, "attention.value_length": 32,
            "attention.layer_norm_rms_epsilon": 1e-6, "context_length": 128, **keys}
    meta = {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in keys.items()}}
    tensors = {"token_embd.weight": types.SimpleNamespace(shape=(64, VOCAB))}
    tensors.update({f"blk.0.{name}": types.SimpleNamespace(shape=()) for name in layer_tensors})
    return meta, tensors


def test_moe_config_follows_llama_cpp():
    """The experts' keys as llama.cpp reads them: counts required and > 0, the experts' and the
    shared expert's sizes from feed_forward_length when their own keys are absent, and top-k
    renormalised for qwen3moe but not qwen2moe whatever the file says (no key carries it). A llama
    file with experts is Mixtral: feed_forward_length is the experts' size, top-k renormalised."""
    experts = {"expert_count": 4, "expert_used_count": 2}
    cfg = gguf_lib.config_from_metadata(*_metadata_of("qwen3moe", QK_NORMS, **experts))
    assert (cfg.num_experts, cfg.experts_per_token, cfg.intermediate_size, cfg.norm_topk_prob) == (4, 2, 48, True)
    cfg = gguf_lib.config_from_metadata(*_metadata_of("qwen2moe", ("attn_q.bias",), **experts))
    assert (cfg.intermediate_size, cfg.shared_expert_size, cfg.norm_topk_prob) == (48, 96, False)
    cfg = gguf_lib.config_from_metadata(*_metadata_of("llama", **experts))  # Mixtral, as llama.cpp writes it
    assert (cfg.model_type, cfg.num_experts, cfg.intermediate_size, cfg.norm_topk_prob) == ("mixtral", 4, 96, True)
    assert gguf_lib.config_from_metadata(*_metadata_of("llama")).model_type == "llama"
    with pytest.raises(ji.ConfigError, match="expert_count=0, expert_used_count=2: qwen3_moe needs both > 0"):
        gguf_lib.config_from_metadata(*_metadata_of("qwen3moe", QK_NORMS, **{**experts, "expert_count": 0}))


def test_gpt_oss_config_follows_llama_cpp():
    """What llama.cpp reads from a gpt-oss file and what it fixes: the experts' size from
    expert_feed_forward_length, the window on the even layers (its pattern of 2), attention sinks,
    top-k softmaxed, the SwiGLU clamp 7 and alpha 1.702 (no key carries them); YaRN with its ramp's
    ends rounded (ggml_rope_yarn_corr_dims) and betas 32 / 1 when the file has none. Refused: a
    yarn_attn_factor other than 1, no experts, no q/k/v biases."""
    keys = {"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 32, "block_count": 4,
            "attention.sliding_window": 8, "rope.scaling.type": "yarn", "rope.scaling.factor": 32.0,
            "rope.scaling.original_context_length": 4096}
    biases = ("attn_q.bias", "attn_output.bias")
    cfg = gguf_lib.config_from_metadata(*_metadata_of("gpt-oss", biases, **keys))
    assert (cfg.model_type, cfg.num_experts, cfg.experts_per_token, cfg.intermediate_size) == ("gpt_oss", 4, 2, 32)
    assert cfg.layer_windows == (8, 0, 8, 0) and cfg.attn_sinks and cfg.norm_topk_prob
    assert (cfg.swiglu_limit, cfg.swiglu_alpha) == (7.0, 1.702)
    assert cfg.rope == ji.RopeConfig(theta=10000.0, type="yarn", factor=32.0, original_max_position_embeddings=4096,
                                     beta_fast=32.0, beta_slow=1.0, truncate=True)
    with pytest.raises(ji.CheckpointError, match=r"rope.scaling.yarn_attn_factor=2.0 is not supported \(only 1\)"):
        gguf_lib.config_from_metadata(*_metadata_of("gpt-oss", biases,
                                                    **{**keys, "rope.scaling.yarn_attn_factor": 2.0}))
    with pytest.raises(ji.ConfigError, match="expert_count=0, expert_used_count=2: gpt_oss needs both > 0"):
        gguf_lib.config_from_metadata(*_metadata_of("gpt-oss", biases, **{**keys, "expert_count": 0}))
    with pytest.raises(ji.ConfigError, match="a gpt_oss config needs qkv_bias"):
        gguf_lib.config_from_metadata(*_metadata_of("gpt-oss", ("attn_output.bias",), **keys))


def test_gemma_config_follows_llama_cpp(converted):
    """What llama.cpp fixes for Gemma instead of reading it: the query scale head_dim ** -0.5 (a
    model's own query_pre_attn_scalar, 24 here, is lost; HF's GGUF loader takes its default 256),
    (hidden / heads) ** -0.5 for the 27B models it knows by layer count (46: Gemma 2, 62: Gemma 3);
    Gemma 2's soft-caps 50 and 30 and window 4096 when absent, one global layer in 2 (unless
    attention.sliding_window_pattern says otherwise), one RoPE; Gemma 3's local RoPE base 10000
    unless rope.freq_base_swa says otherwise, one global layer in 6, no final soft-cap, and a window
    it requires (test_missing_or_mismatched_content_is_named)."""
    hf = hf_model("gemma2", vocab_size=VOCAB)  # query_pre_attn_scalar=24, head_dim 16
    folder = converted("gemma2") / "scalar24"
    save_hf(hf, folder)
    convert(folder, folder / "f32.gguf", "gemma2")
    assert ji.load_model(folder).config.attention_scale == 24**-0.5
    assert ji.load_model(folder / "f32.gguf").config.attention_scale == 16**-0.5
    assert transformers.AutoConfig.from_pretrained(folder, gguf_file="f32.gguf").query_pre_attn_scalar == 256

    for arch, layers_27b in (("gemma2", 46), ("gemma3", 62)):
        norms = QK_NORMS if arch == "gemma3" else ()
        window = {"attention.sliding_window": 5} if arch == "gemma3" else {}
        cfg = gguf_lib.config_from_metadata(*_metadata_of(arch, norms, **window))
        assert cfg.attention_scale == 32**-0.5 and cfg.embedding_scale == 8.0
        big = gguf_lib.config_from_metadata(*_metadata_of(arch, norms, block_count=layers_27b, **window))
        assert big.attention_scale == 16**-0.5  # hidden / heads
    cfg = gguf_lib.config_from_metadata(*_metadata_of("gemma2", block_count=4))
    assert (cfg.attn_softcap, cfg.logit_softcap, cfg.layer_windows) == (50.0, 30.0, (4096, 0, 4096, 0))
    cfg = gguf_lib.config_from_metadata(*_metadata_of("gemma3", QK_NORMS, block_count=7,
                                                      **{"attention.sliding_window": 5}))
    assert cfg.layer_windows == (5, 5, 5, 5, 5, 0, 5) and cfg.local_rope.theta == 10000.0
    assert cfg.logit_softcap is None and cfg.qk_norm
    cfg = gguf_lib.config_from_metadata(*_metadata_of("gemma3", QK_NORMS, **{
        "attention.sliding_window": 5, "rope.freq_base_swa": 1000.0, "final_logit_softcapping": 30.0}))
    assert cfg.local_rope.theta == 1000.0 and cfg.logit_softcap is None  # llama.cpp's Gemma 3 graph: no cap
    pattern = {"attention.sliding_window_pattern": 4}
    cfg = gguf_lib.config_from_metadata(*_metadata_of("gemma2", block_count=4, **pattern))
    assert cfg.layer_windows == (4096, 4096, 4096, 0)  # the key a newer llama.cpp reads
    with pytest.raises(ji.ConfigError, match=r"attention.sliding_window_pattern=\[1, 0\] is not a period"):
        gguf_lib.config_from_metadata(*_metadata_of("gemma2", **{"attention.sliding_window_pattern": [1, 0]}))
    with pytest.raises(ji.ConfigError, match="rope.freq_base_swa=1000.0 differs from rope.freq_base=10000.0"):
        gguf_lib.config_from_metadata(*_metadata_of("gemma2", **{"rope.freq_base_swa": 1000.0}))


# --- bad files ---------------------------------------------------------------------------------


def test_missing_or_mismatched_content_is_named(converted, tmp_path):
    """A file of one of these architectures without a key llama.cpp requires, without a tensor,
    whose tensors do not fit its keys, or asking for what the layer does not compute (Phi-3's
    LongRoPE, partial rotary, experts in a family without them) raises a CheckpointError naming it;
    a Mixtral file (general.architecture=llama) is checked as Mixtral's."""
    for i, (arch, skip, meta, message) in enumerate((
        ("qwen3moe", ("qwen3moe.expert_count",), None, "GGUF metadata has no 'qwen3moe.expert_count'"),
        ("qwen2moe", ("blk.1.ffn_down_exps.weight",), None,
         r"missing tensor 'blk.1.ffn_down_exps.weight' \(expected shape \(4, 64, 64\)\)"),
        ("qwen3moe", (), {"qwen3moe.expert_count": 8},
         r"tensor 'blk.0.ffn_down_exps.weight' has shape \(4, 64, 64\) \(out, in\), expected \(8, 64, 64\)"),
        ("phi3", ("blk.0.attn_qkv.weight",), None, "missing tensor 'blk.0.attn_qkv.weight'"),
        ("phi3", (), {"phi3.rope.scaling.type": "longrope"}, "phi3.rope.scaling.type='longrope' is not supported"),
        ("phi3", (), {"phi3.rope.dimension_count": 12}, "partial rotary embeddings are not supported"),
        ("gemma3", ("gemma3.attention.sliding_window",), None,
         "GGUF metadata has no 'gemma3.attention.sliding_window'"),
        ("phi3", (), {"phi3.expert_count": 4},
         r"phi3.expert_count=4: a phi3 file with experts is not supported \(phi3 has none\)"),
        ("mixtral", ("llama.expert_used_count",), None, "GGUF metadata has no 'llama.expert_used_count'"),
        ("mixtral", ("blk.2.ffn_gate_inp.weight",), None, "missing tensor 'blk.2.ffn_gate_inp.weight'"),
        ("gpt-oss", ("gpt-oss.expert_feed_forward_length",), None,
         "GGUF metadata has no 'gpt-oss.expert_feed_forward_length'"),
        ("gpt-oss", ("blk.1.attn_sinks.weight",), None, "missing tensor 'blk.1.attn_sinks.weight'"),
        ("gpt-oss", ("blk.3.ffn_up_exps.bias",), None, "missing tensor 'blk.3.ffn_up_exps.bias'"),
    )):
        path = tmp_path / f"{i}-{arch}.gguf"
        convert(converted(arch), path, ARCH.get(arch, arch), skip=skip, meta=meta)
        with pytest.raises(ji.CheckpointError, match=message):
            ji.load_model(path)
