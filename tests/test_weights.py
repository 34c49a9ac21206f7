"""Checkpoint loading: sharded checkpoints, corrupted ones (clear errors), orbax round trip, tokenizers."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import jaxinfer as ji
from helpers import TOLERANCE, hf_model, row_rel_error, save_hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = hf_model("qwen2", seed=3)
    return hf, save_hf(hf, tmp_path_factory.mktemp("qwen2"))


def _corrupt(src: str, dst, edit) -> str:
    """Copy a single-file checkpoint, applying edit(tensors, config) before writing."""
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    edit(tensors, config)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dst)


def test_sharded_checkpoint_loads_the_same(checkpoint, tmp_path, rng):
    hf, path = checkpoint
    sharded = save_hf(hf, tmp_path / "sharded", max_shard_size="40KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    a, b = ji.load_model(path), ji.load_model(sharded)
    tokens = rng.integers(0, 256, size=(1, 12))
    np.testing.assert_array_equal(ji.forward_logits(a, tokens), ji.forward_logits(b, tokens))


def test_missing_tensor_is_named(checkpoint, tmp_path):
    _, path = checkpoint
    bad = _corrupt(path, tmp_path / "bad", lambda t, c: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ji.CheckpointError, match=r"missing tensor 'model.layers.1.self_attn.k_proj.bias'.*\(64,\)"):
        ji.load_model(bad)


def test_misshaped_tensor_names_both_shapes(checkpoint, tmp_path):
    _, path = checkpoint

    def edit(t, c):
        t["model.layers.2.mlp.up_proj.weight"] = torch.zeros(95, 64)

    bad = _corrupt(path, tmp_path / "bad", edit)
    with pytest.raises(ji.CheckpointError, match=r"'model.layers.2.mlp.up_proj.weight' has shape \(95, 64\), expected \(96, 64\)"):
        ji.load_model(bad)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    _, path = checkpoint

    def edit(t, c):
        t["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)

    with pytest.raises(ji.CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.extra.weight'"):
        ji.load_model(_corrupt(path, tmp_path / "bad", edit))


def test_unknown_model_type(checkpoint, tmp_path):
    _, path = checkpoint
    bad = _corrupt(path, tmp_path / "bad", lambda t, c: c.update(model_type="falcon"))
    with pytest.raises(ji.ConfigError, match="model_type='falcon' is not supported"):
        ji.load_model(bad)


def test_missing_shard_and_missing_files(checkpoint, tmp_path):
    hf, _ = checkpoint
    sharded = save_hf(hf, tmp_path / "sharded", max_shard_size="40KB")
    victim = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(sharded, victim))
    with pytest.raises(ji.CheckpointError, match=victim):
        ji.load_model(sharded)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ji.CheckpointError, match="no config.json"):
        ji.load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="neither a directory nor a shipped model"):
        ji.load_model(tmp_path / "nowhere")


def test_orbax_round_trip(checkpoint, tmp_path, rng):
    _, path = checkpoint
    model = ji.load_model(path)
    ji.save_model(model, tmp_path / "converted")
    restored = ji.load_model(tmp_path / "converted")
    assert restored.config == model.config
    tokens = rng.integers(0, 256, size=(2, 9))
    np.testing.assert_array_equal(ji.forward_logits(model, tokens), ji.forward_logits(restored, tokens))


def test_bf16_checkpoint_loads(checkpoint, tmp_path, rng):
    """A bfloat16 checkpoint read in float32 holds exactly the bf16 weights: its logits equal HF's
    reading of the same checkpoint in float32 (the same weights, float32 arithmetic; an HF model cast
    to bf16 and back would also round its RoPE frequencies) at the float32 tolerance."""
    hf, path = checkpoint
    bf16_path = save_hf(copy.deepcopy(hf).to(torch.bfloat16), tmp_path / "bf16")
    model = ji.load_model(bf16_path, dtype="float32")
    upcast = transformers.AutoModelForCausalLM.from_pretrained(bf16_path, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    tokens = rng.integers(0, 256, size=(1, 10))
    with torch.no_grad():
        want = upcast(torch.from_numpy(tokens)).logits.numpy()
    assert row_rel_error(ji.forward_logits(model, tokens), want) <= TOLERANCE["float32"]


def test_tokenizers(checkpoint, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    byte = ji.ByteTokenizer()
    text = "héllo, wörld"
    assert byte.decode(byte.encode(text)) == text
    assert byte.encode(text)[0] == byte.bos_id

    hf, path = checkpoint
    alphabet = ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(path, "tokenizer.json"))
    try:
        model = ji.load_model(path)
        assert isinstance(model.tokenizer, ji.HFTokenizer)
        ids = model.tokenizer.encode(text)
        assert len(ids) == len(text.encode()) and model.tokenizer.decode(ids) == text
        out = ji.generate(model, [text], ji.SamplingParams(max_tokens=4, temperature=0.0))
        assert len(out[0].token_ids) == 4 and isinstance(out[0].text, str)
    finally:
        os.remove(os.path.join(path, "tokenizer.json"))


def test_unreadable_files_name_the_file(tmp_path, caplog):
    """A truncated or empty safetensors file and a malformed config.json are named in the error;
    a checkpoint without tokenizer.json loads with a warning."""
    hf = hf_model("llama")
    path = save_hf(hf, tmp_path / "ok")
    with caplog.at_level("WARNING", logger="jaxinfer"):
        ji.load_model(path)
    assert "no tokenizer.json" in caplog.text
    weights = tmp_path / "ok" / "model.safetensors"
    data = weights.read_bytes()
    for name, content in (("empty", b""), ("truncated", data[: len(data) // 2])):
        weights.write_bytes(content)
        with pytest.raises(ji.CheckpointError, match=f"{weights} is not a readable safetensors file"):
            ji.load_model(path)
    (tmp_path / "ok" / "config.json").write_text("{not json")
    with pytest.raises(ji.ConfigError, match="config.json is not valid JSON"):
        ji.load_model(path)
