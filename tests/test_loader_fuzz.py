"""Loader fuzzing: truncated and corrupted safetensors, GGUF and tokenizer files, tensors of the wrong
dtype or shape, config.json and adapter_config.json fields missing or of the wrong type, checkpoint
directories with a file missing. Each load raises a ValueError (CheckpointError, ConfigError,
AdapterError) that names the file and the field or tensor, or loads and the damage is shown to be
benign (the same weights and settings as the undamaged file, or settings read as HF transformers /
PEFT read them); never another exception, a crash in native code or a hang. Few examples each: the
point is the kinds of damage, not their number."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import struct
import tempfile

import gguf
import jax
import numpy as np
import pytest
import transformers
from huggingface_hub.errors import StrictDataclassError
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


def load_or_refuse(load, path, *names: str, benign=None):
    """Run load(path): it raises a ValueError whose message holds one of `names` (returned), or it
    loads and benign(what it loaded) shows the damage changed nothing that matters (None: loading
    is wrong)."""
    with no_hang():
        try:
            loaded = load(path)
        except ValueError as e:
            assert any(n in str(e) for n in names), f"{type(e).__name__}: {e} (names none of {names})"
            return e
    assert benign is not None, f"the damaged {path} loaded"
    benign(loaded)
    return loaded


def same_model(reference: ji.Model):
    """benign= for damage that must leave the model as it was: the same config and weights."""
    def check(model: ji.Model) -> None:
        assert model.config == reference.config
        same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), model.params,
                            reference.params)
        assert all(jax.tree.leaves(same)), "the damaged file loaded other weights"
    return check


def names_field(error: ValueError, field: str) -> bool:
    return re.search(rf"\b{re.escape(field)}\b", str(error)) is not None


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> str:
    """A small HF checkpoint: config.json, model.safetensors, tokenizer.json."""
    path = str(tmp_path_factory.mktemp("dense"))
    ji.save_hf_checkpoint(ji.Model(CFG, ji.init_params(CFG, jax.random.key(0)), ji.ByteTokenizer()), path)
    return path


@pytest.fixture(scope="module")
def dense_model(dense) -> ji.Model:
    return ji.load_model(dense)


def copy(src: str, tmp: str) -> str:
    dst = os.path.join(tmp, "ckpt")
    shutil.copytree(src, dst)
    return dst


@FUZZ
@given(kind=st.sampled_from(["truncate", "header_bytes", "header_length"]), where=st.floats(0, 1),
       junk=st.binary(min_size=1, max_size=8))
def test_damaged_safetensors_is_refused_by_name(dense, dense_model, kind, where, junk):
    """(Damage to tensor data past the header only changes values: not tried.) A load despite the
    damage must give the undamaged model."""
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
        load_or_refuse(ji.load_model, path, weights, benign=same_model(dense_model))


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
        # whether it may load at all is decided below: only a float cast of the same shape
        out = load_or_refuse(ji.load_model, path, weights, benign=lambda model: None)
        changed = x.shape != load_file(os.path.join(dense, "model.safetensors"))[name].shape
        if changed or dtype not in ("float16", "float64"):
            assert isinstance(out, ji.CheckpointError) and name in str(out)
        else:
            assert isinstance(out, ji.Model)


def read_as_hf_or_absent(config_path: str, edited: set[str]):
    """benign= for a config.json that loads: its settings are read as HF transformers' LlamaConfig
    reads them (a null field as an absent one; the values as written where HF's stricter types
    refuse them, e.g. an integer rms_norm_eps), or as if the edited fields were absent (a wrong-typed
    empty value such as rope_parameters=false or bos_token_id=[] taken for none)."""
    written = json.load(open(config_path))

    def as_hf(cfg: ji.ModelConfig) -> None:
        given = {k: v for k, v in written.items() if v is not None}
        try:
            hf = transformers.LlamaConfig(**given)
        except StrictDataclassError:
            hf = transformers.LlamaConfig()
            hf.__dict__.update(given)
        rope = hf.rope_parameters.get("rope_theta") if isinstance(hf.rope_parameters, dict) else None
        # token ids as written (HF's defaults for absent ones are Llama's); a bos list of one, its id
        bos, eos = written.get("bos_token_id"), written.get("eos_token_id")
        bos = bos[0] if isinstance(bos, list) and len(bos) == 1 else bos
        eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
        assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
            hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads)
        assert cfg.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
        assert (cfg.rms_norm_eps, cfg.rope.theta, cfg.max_position_embeddings) == (
            hf.rms_norm_eps, rope, hf.max_position_embeddings)
        assert (cfg.tie_word_embeddings, cfg.qkv_bias) == (bool(hf.tie_word_embeddings), bool(hf.attention_bias))
        assert (cfg.bos_token_id, list(cfg.eos_token_ids)) == (bos, eos)

    def check(model: ji.Model) -> None:
        try:
            as_hf(model.config)
        except AssertionError:
            absent = ji.ModelConfig.from_hf_dict({k: v for k, v in written.items() if k not in edited})
            assert model.config == absent, f"{model.config} is neither HF's reading nor the one without {edited}"
    return check


@FUZZ
@given(edits=st.dictionaries(st.sampled_from(
    ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
     "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
     "attention_bias", "rope_parameters", "rope_theta", "bos_token_id", "eos_token_id", "hidden_act"]),
    st.one_of(st.just("<delete>"), ODD_VALUES), min_size=1, max_size=2))
@example(edits={"num_hidden_layers": 10**12})  # checking a trillion layers' tensors would take forever
@example(edits={"num_attention_heads": 0, "hidden_size": "16"})
@example(edits={"rms_norm_eps": 707663, "rope_theta": 707663})  # loads: odd but valid values, read as HF reads them
@example(edits={"num_key_value_heads": "<delete>"})  # valid config, tensors of the wrong shape
def test_bad_config_fields_are_named(dense, edits):
    """A refused config names the field (ConfigError) or the tensor that no longer fits it
    (CheckpointError); one that loads is read as HF transformers reads it, or as without the field."""
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
        weights = os.path.join(path, "model.safetensors")
        out = load_or_refuse(ji.load_model, path, config_path, weights,
                             benign=read_as_hf_or_absent(config_path, set(edits)))
        if isinstance(out, ji.ConfigError):
            assert any(names_field(out, field) for field in edits), out
        elif isinstance(out, ValueError):
            tensors = load_file(weights)
            assert isinstance(out, ji.CheckpointError) and any(f"'{name}'" in str(out) for name in tensors), out


@FUZZ
@given(kind=st.sampled_from(["truncate", "header_bytes"]), where=st.floats(0, 1), junk=st.binary(min_size=1, max_size=8))
def test_damaged_gguf_is_refused_by_name(tmp_path_factory, kind, where, junk):
    """Truncated anywhere (always refused), or bytes overwritten in its metadata and tensor table
    (before the data): refused, or the same config and weights (the bytes hit a string the model
    does not depend on: a name, or a vocabulary entry's text, which is data as tensor values are)."""
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
        load_or_refuse(ji.load_model, path, path, benign=None if kind == "truncate" else same_model(
            ji.load_model(str(source))))


def test_gguf_tensors_that_overlap_are_refused(tmp_path):
    """A tensor table whose second tensor points into the first's bytes (each alone in bounds)."""
    source = tmp_path / "ok.gguf"
    cfg = gguf_config("llama")
    write_gguf(source, cfg, _random_params(cfg, 0))
    reader = gguf.GGUFReader(source)
    first, second = reader.tensors[0], reader.tensors[1]
    at = second.field.offset + sum(p.nbytes for p in second.field.parts[:-1])  # its offset: the last part
    data = bytearray(source.read_bytes())
    data[at : at + 8] = np.uint64(first.data_offset - reader.data_offset).tobytes()
    path = tmp_path / "overlap.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ji.CheckpointError, match=f"tensors .*{first.name}.* overlap"):
        ji.load_model(str(path))


@FUZZ
@given(junk=st.binary(max_size=64), keep=st.floats(0, 1))
def test_damaged_tokenizer_files_are_named(dense, junk, keep):
    with tempfile.TemporaryDirectory() as tmp:
        path = copy(dense, tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            file = os.path.join(path, name)
            data = open(file, "rb").read() if os.path.exists(file) else b"{}"
            open(file, "wb").write(data[: int(keep * len(data))] + junk)
        load_or_refuse(ji.load_model, path, "tokenizer.json", "tokenizer_config.json", benign=same_tokenizer)


def same_tokenizer(model: ji.Model) -> None:
    """benign= for damaged tokenizer files that load: the tokenizer still encodes as the byte tokenizer."""
    text = "def f(x):\n    return x  # \u00e9\u4e2d"
    assert model.tokenizer.encode(text) == ji.ByteTokenizer().encode(text)
    assert model.tokenizer.decode(ji.ByteTokenizer().encode(text)) == text


@FUZZ
@given(field=st.sampled_from(["r", "lora_alpha", "target_modules", "layers_to_transform", "peft_type", "bias",
                              "use_dora"]), value=ODD_VALUES)
@example(field="lora_alpha", value=math.inf)  # a number, but no scale
@example(field="r", value=1)  # an integer >= 1 that the tensors contradict
@example(field="layers_to_transform", value=818823)  # a layer past the model's: refused when it meets the model
def test_bad_adapter_config_fields_are_named(tmp_path_factory, field, value):
    """A bad field is refused naming it, when the adapter is read or when it meets the base model
    (check_fits, as add_adapter does); an adapter that fits has the tensors of the undamaged one and
    the scale PEFT derives from the config (lora_alpha / r), finite."""
    source = tmp_path_factory.getbasetemp() / "fuzz-adapter"
    if not source.exists():
        lora.save_adapter(lora.random_adapter(CFG, 4, ("wq", "wv")), source)
    with tempfile.TemporaryDirectory() as tmp:
        path = copy(str(source), tmp)
        config_path = os.path.join(path, lora.adapter.CONFIG_FILE)
        config = json.load(open(config_path))
        config[field] = value
        json.dump(config, open(config_path, "w"))

        def fits_as_peft_reads_it(adapter) -> None:
            try:
                lora.adapter.check_fits(adapter, CFG)
            except lora.adapter.AdapterError as e:
                assert names_field(e, field), e
                return
            original = ji.load_adapter(str(source))
            assert adapter.weights.keys() == original.weights.keys()
            assert all(np.array_equal(adapter.weights[k][0], original.weights[k][0]) for k in original.weights)
            scale = config.get("lora_alpha", 8) / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
            assert math.isfinite(adapter.scale) and adapter.scale == scale, (adapter.scale, scale)

        out = load_or_refuse(ji.load_adapter, path, config_path, os.path.join(path, lora.adapter.WEIGHTS_FILE),
                             benign=fits_as_peft_reads_it)
        if isinstance(out, ValueError):
            assert names_field(out, field), out


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
