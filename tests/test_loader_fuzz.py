"""Loader fuzzing: truncated and corrupted safetensors, GGUF and tokenizer files, tensors of the wrong
dtype or shape, config.json and adapter_config.json fields missing or of the wrong type, checkpoint
directories with a file missing. Each load either succeeds or raises a ValueError (CheckpointError,
ConfigError, AdapterError) that names the file (and the field); never another exception, a crash in
native code or a hang. Few examples each: the point is the kinds of damage, not their number."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import tempfile

import gguf
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import jaxinfer as ji
from jaxinfer import lora
from test_gguf import _config as gguf_config
from test_gguf import _random_params, write_gguf
from test_quant_checkpoints import Case, write_checkpoint

FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CFG = ji.ModelConfig(vocab_size=258, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim=8, max_position_embeddings=64, bos_token_id=256, eos_token_ids=(257,))
# Values a config field may be set to: wrong types, out-of-range numbers, and the odd right one.
ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**13), st.floats(allow_nan=True),
                       st.text(max_size=4), st.lists(st.integers(-2, 300), max_size=3),
                       st.dictionaries(st.sampled_from(["rope_type", "factor", "type"]), st.text(max_size=3), max_size=2))


@contextlib.contextmanager
def no_hang(seconds: int = 30):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`."""
    def fail(*_):
        raise AssertionError(f"the load took over {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def load_or_refuse(load, path, *names: str):
    """Run load(path): it loads, or raises a ValueError whose message holds one of `names`."""
    with no_hang():
        try:
            return load(path)
        except ValueError as e:
            assert any(n in str(e) for n in names), f"{type(e).__name__}: {e} (names none of {names})"
            return e


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> str:
    """A small HF checkpoint: config.json, model.safetensors, tokenizer.json."""
    path = str(tmp_path_factory.mktemp("dense"))
    ji.save_hf_checkpoint(ji.Model(CFG, ji.init_params(CFG, jax.random.key(0)), ji.ByteTokenizer()), path)
    return path


def copy(src: str, tmp: str) -> str:
    dst = os.path.join(tmp, "ckpt")
    shutil.copytree(src, dst)
    return dst


@FUZZ
@given(kind=st.sampled_from(["truncate", "header_bytes", "header_length"]), where=st.floats(0, 1),
       junk=st.binary(min_size=1, max_size=8))
def test_damaged_safetensors_is_refused_by_name(dense, kind, where, junk):
    """(Damage to tensor data past the header only changes values: not tried.)"""
    with tempfile.TemporaryDirectory() as tmp:
        path = copy(dense, tmp)
        weights = os.path.join(path, "model.safetensors")
        data = bytearray(open(weights, "rb").read())
        header = 8 + struct.unpack("<Q", data[:8])[0]
        if kind == "truncate":
            data = data[: int(where * (len(data) - 1))]
        elif kind == "header_length":
            data[:8] = struct.pack("<Q", int(where * 2**64) % 2**64)
        else:
            at = int(where * (header - len(junk)))
            data[at : at + len(junk)] = junk
        open(weights, "wb").write(bytes(data))
        load_or_refuse(ji.load_model, path, weights)


@FUZZ
@given(which=st.integers(0, 10**6), dtype=st.sampled_from(["int8", "int32", "uint8", "bool", "float16", "float64"]),
       reshape=st.sampled_from([None, "flat", "transpose", "grow"]))
def test_tensor_of_wrong_dtype_or_shape_is_named(dense, which, dtype, reshape):
    with tempfile.TemporaryDirectory() as tmp:
        path = copy(dense, tmp)
        weights = os.path.join(path, "model.safetensors")
        tensors = load_file(weights)
        name = sorted(tensors)[which % len(tensors)]
        x = tensors[name].astype(dtype)
        if reshape == "flat":
            x = x.reshape(-1)
        elif reshape == "transpose" and x.ndim == 2 and x.shape[0] != x.shape[1]:
            x = x.T
        elif reshape == "grow":
            x = np.concatenate([x, x[:1]])
        tensors[name] = np.ascontiguousarray(x)
        save_file(tensors, weights)
        out = load_or_refuse(ji.load_model, path, weights)
        changed = x.shape != load_file(os.path.join(dense, "model.safetensors"))[name].shape
        if changed or dtype not in ("float16", "float64"):
            assert isinstance(out, ji.CheckpointError) and name in str(out)
        else:
            assert isinstance(out, ji.Model)


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(
    ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
     "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
     "attention_bias", "rope_parameters", "rope_theta", "bos_token_id", "eos_token_id", "hidden_act"]),
    st.one_of(st.just("<delete>"), ODD_VALUES), min_size=1, max_size=2))
@example(edits={"num_hidden_layers": 10**12})  # checking a trillion layers' tensors would take forever
@example(edits={"num_attention_heads": 0, "hidden_size": "16"})
def test_bad_config_fields_are_named(dense, edits):
    with tempfile.TemporaryDirectory() as tmp:
        path = copy(dense, tmp)
        config_path = os.path.join(path, "config.json")
        config = json.load(open(config_path))
        for field, value in edits.items():
            if value == "<delete>":
                config.pop(field, None)
            else:
                config[field] = value
        json.dump(config, open(config_path, "w"))
        out = load_or_refuse(ji.load_model, path, config_path, os.path.join(path, "model.safetensors"))
        if isinstance(out, ji.ConfigError):  # names the field too
            assert any(field in str(out) for field in edits), out


@FUZZ
@given(kind=st.sampled_from(["truncate", "header_bytes"]), where=st.floats(0, 1), junk=st.binary(min_size=1, max_size=8))
def test_damaged_gguf_is_refused_by_name(tmp_path_factory, kind, where, junk):
    """Truncated anywhere, or bytes overwritten in its metadata and tensor table (before the data)."""
    source = tmp_path_factory.getbasetemp() / "fuzz.gguf"
    if not source.exists():
        cfg = gguf_config("llama")
        write_gguf(source, cfg, _random_params(cfg, 0))
    data = bytearray(source.read_bytes())
    if kind == "truncate":
        data = data[: int(where * (len(data) - 1))]
    else:
        header = min(t.data_offset for t in gguf.GGUFReader(source).tensors)
        at = int(where * (header - len(junk)))
        data[at : at + len(junk)] = junk
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "damaged.gguf")
        open(path, "wb").write(bytes(data))
        load_or_refuse(ji.load_model, path, path)


@FUZZ
@given(junk=st.binary(max_size=64), keep=st.floats(0, 1))
def test_damaged_tokenizer_files_are_named(dense, junk, keep):
    with tempfile.TemporaryDirectory() as tmp:
        path = copy(dense, tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            file = os.path.join(path, name)
            data = open(file, "rb").read() if os.path.exists(file) else b"{}"
            open(file, "wb").write(data[: int(keep * len(data))] + junk)
        load_or_refuse(ji.load_model, path, "tokenizer.json", "tokenizer_config.json")


@FUZZ
@given(field=st.sampled_from(["r", "lora_alpha", "target_modules", "layers_to_transform", "peft_type", "bias",
                              "use_dora"]), value=ODD_VALUES)
def test_bad_adapter_config_fields_are_named(tmp_path_factory, field, value):
    source = tmp_path_factory.getbasetemp() / "fuzz-adapter"
    if not source.exists():
        lora.save_adapter(lora.random_adapter(CFG, 4, ("wq", "wv")), source)
    with tempfile.TemporaryDirectory() as tmp:
        path = copy(str(source), tmp)
        config_path = os.path.join(path, lora.adapter.CONFIG_FILE)
        config = json.load(open(config_path))
        config[field] = value
        json.dump(config, open(config_path, "w"))
        out = load_or_refuse(ji.load_adapter, path, config_path)
        if isinstance(out, ValueError):
            assert field in str(out)


@pytest.mark.parametrize("layout, missing, words", [
    ("dense", "config.json", "no config.json in"), ("dense", "model.safetensors", "no *.safetensors files in"),
    ("gptq", "config.json", "no config.json in"), ("gptq", "model.safetensors", "no *.safetensors files in"),
    ("peft", "adapter_config.json", "no adapter_config.json in"),
    ("peft", "adapter_model.safetensors", "no adapter_model.safetensors in"),
])
def test_directory_with_a_file_missing_names_it(dense, layout, missing, words, tmp_path):
    if layout == "dense":
        path = copy(dense, str(tmp_path))
    elif layout == "gptq":
        path = str(tmp_path / "gptq")
        write_checkpoint(path, Case("gptq", group_size=32), np.random.default_rng(0))
    else:
        path = str(tmp_path / "peft")
        lora.save_adapter(lora.random_adapter(CFG, 4, ("wq",)), path)
    os.remove(os.path.join(path, missing))
    with pytest.raises(ValueError) as e:
        (ji.load_adapter if layout == "peft" else ji.load_model)(path)
    assert f"{words} {path}" in str(e.value)
