"""LoRA adapters: a batch mixing three PEFT adapters and the base model equals HF transformers + peft
and the merged-weights model (logits and greedy tokens through the engine); fewer slots than
adapters in use change no output; adapters come and go while the engine serves; a LoRA over an
int4 base equals its merged reference; bad adapters are refused by name, the engine unchanged."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import peft
import pytest
import torch
from helpers import TOLERANCE, hf_model, row_errors, save_hf
from safetensors.numpy import save_file

import jaxinfer as ji
from jaxinfer import lora, quant

TOL = 1e-4  # float32 logits, per row, against HF + peft
GREEDY = ji.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
# One engine configuration for every engine test here, so they share compiled programs.
CONFIG = ji.EngineConfig(max_adapters=2, max_lora_rank=8, max_batch=4, page_size=8)
# Different ranks, targets (short names, "all-linear", a full module path), layers and scales. (peft
# finds an adapter's tensors by its name in their keys: names like "mlp" or "all" confuse it.)
PEFT_CONFIGS = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "every": dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "sparse": dict(r=2, lora_alpha=4, target_modules=["model.layers.1.mlp.down_proj", "o_proj", "gate_proj"],
                layers_to_transform=[0, 1]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(HF base, the PeftModel holding every adapter, our base model, {name: adapter dir})."""
    tmp = tmp_path_factory.mktemp("lora")
    hf = hf_model("llama", seed=3)
    model = ji.load_model(save_hf(hf, tmp / "base"))
    peft_model = None
    for name, kwargs in PEFT_CONFIGS.items():
        cfg = peft.LoraConfig(init_lora_weights=False, **kwargs)
        if peft_model is None:
            peft_model = peft.get_peft_model(hf, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if "lora_" in key:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    peft_model.save_pretrained(tmp / "adapters")  # one directory per adapter
    return hf, peft_model.eval(), model, {name: str(tmp / "adapters" / name) for name in PEFT_CONFIGS}


def test_mixed_batch_logits_match_hf_peft_and_merged(setup, rng):
    _, peft_model, model, paths = setup
    adapters = {name: ji.load_adapter(path) for name, path in paths.items()}
    assert adapters["every"].scale == pytest.approx(16 / np.sqrt(8))  # rslora
    assert adapters["sparse"].projections == ["wo", "w_gate", "w_down"] and len(adapters["sparse"].weights) == 5
    names = ["qv", None, "every", "sparse", "qv", None]
    tokens = rng.integers(0, model.config.vocab_size, size=(len(names), 14))
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(tokens), adapter_names=[n or "__base__" for n in names]).logits.numpy()
    actual = np.asarray(lora.forward_logits(model, tokens, [n and adapters[n] for n in names]))
    assert row_errors(actual, expected).max() <= TOL
    base = np.asarray(ji.forward_logits(model, tokens))
    for i, name in enumerate(names):
        reference = base[i] if name is None else np.asarray(ji.forward_logits(lora.merge(model, adapters[name]),
                                                                              tokens[i : i + 1]))[0]
        assert row_errors(actual[i], reference).max() <= TOLERANCE["float32"], name
        if name is not None:
            assert row_errors(actual[i], base[i]).max() > 1e-2  # the adapter changes the logits


def _serve(engine, prompts, names, sampling=GREEDY):
    outs = engine.generate(prompts, sampling, adapters=names)
    assert engine.allocator.num_used == 0 and engine.adapters.refs == [0] * engine.adapters.num_slots
    return outs


def test_engine_greedy_matches_hf_peft_and_merged_with_fewer_slots(setup, rng):
    """Three adapters and the base in one workload on two slots: slots are swapped (counted), and
    every request's tokens equal HF + peft generating it alone and the merged model's baseline;
    five prompts share a full page of prefix, under four adapters (a page computed under one adapter
    is reused under that adapter only). Served again in the reverse order (other
    batches, slots and swaps), the tokens do not change."""
    _, peft_model, model, paths = setup
    names = ["qv", "every", None, "sparse", "every", "qv", None, "sparse"]
    prefix = rng.integers(0, 256, size=CONFIG.page_size).tolist()
    prompts = [(prefix if i in (0, 1, 2, 3, 5) else []) + rng.integers(0, 256, size=int(rng.integers(3, 9))).tolist()
               for i in range(len(names))]
    engine = ji.Engine(model, CONFIG)
    for name, path in paths.items():
        engine.add_adapter(name, path)
    outs = _serve(engine, prompts, names)
    metrics = engine.metrics()
    assert metrics["lora_evictions"] > 0 and metrics["lora_loads"] >= 3 and metrics["adapters"] == 3
    assert engine.allocator.hits > 0  # the shared prefix was found, under the same adapter only
    for name in (None, *paths):
        group = [i for i, n in enumerate(names) if n == name]
        merged = model if name is None else lora.merge(model, engine.adapters.store[name])
        baseline = ji.generate(merged, [prompts[i] for i in group], GREEDY)
        for i, b in zip(group, baseline):
            with torch.no_grad():
                ref = peft_model.generate(torch.tensor([prompts[i]]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                                          attention_mask=torch.ones(1, len(prompts[i]), dtype=torch.long),
                                          adapter_names=[name or "__base__"])
            assert outs[i].token_ids == ref[0, len(prompts[i]):].tolist() == b.token_ids, name
    backward = _serve(engine, prompts[::-1], names[::-1])[::-1]
    assert [o.token_ids for o in backward] == [o.token_ids for o in outs]
    assert engine.metrics()["lora_evictions"] > metrics["lora_evictions"]


def test_adapters_added_and_removed_while_serving(setup, rng):
    _, _, model, paths = setup
    engine = ji.Engine(model, CONFIG)
    engine.add_adapter("qv", paths["qv"])
    prompt = rng.integers(0, 256, size=9).tolist()
    rid = engine.add_request(prompt, GREEDY, adapter="qv")
    engine.step()
    engine.add_adapter("every", paths["every"])  # added mid-run
    rid2 = engine.add_request(prompt, GREEDY, adapter="every")
    with pytest.raises(ValueError, match="adapter 'qv' is used by 1 waiting or running"):
        engine.remove_adapter("qv")
    with pytest.raises(ValueError, match="adapter='gone' is not an added adapter"):
        engine.add_request(prompt, GREEDY, adapter="gone")
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    engine.remove_adapter("qv")  # no request uses it now
    assert "qv" not in engine.adapters.store and engine.adapters.slot_of.keys() == {"every"}
    with pytest.raises(ValueError, match=r"prompts\[0\]: adapter='qv' is not an added adapter"):  # "qv" is gone
        engine.generate([prompt, prompt], GREEDY, adapters=["qv", "every"])
    outs = _serve(engine, [prompt, prompt], ["every", None])
    assert outs[0].token_ids == done[rid2].token_ids
    engine.add_adapter("qv", paths["qv"])  # the name again: a new adapter, its old prefix pages not reused
    assert _serve(engine, [prompt], ["qv"])[0].token_ids == done[rid].token_ids
    assert outs[1].token_ids == ji.generate(model, [prompt], GREEDY)[0].token_ids


def test_lora_over_int4_base_equals_merged(setup, rng):
    """QLoRA-style serving: the adapter's delta over packed int4 projections equals the merged
    (dequantised + delta) weights (the engine: the slow test below)."""
    _, _, model, paths = setup
    int4 = quant.quantize_model(model, quant.QuantScheme(bits=4, group_size=32), progress=False)
    adapter = ji.load_adapter(paths["every"])
    merged = lora.merge(int4, adapter)
    assert not isinstance(merged.params["layers"]["wq"], ji.models.formats.QuantizedWeight)
    tokens = rng.integers(0, 256, size=(1, 12))
    actual = np.asarray(lora.forward_logits(int4, tokens, [adapter]))
    assert row_errors(actual, np.asarray(ji.forward_logits(merged, tokens))).max() <= TOLERANCE["float32"]


@pytest.mark.slow
def test_lora_over_int4_base_in_the_engine(setup, rng):
    _, _, model, paths = setup
    int4 = quant.quantize_model(model, quant.QuantScheme(bits=4, group_size=32), progress=False)
    adapter = ji.load_adapter(paths["every"])
    engine = ji.Engine(int4, CONFIG)
    engine.add_adapter("every", adapter)
    prompts = rng.integers(0, 256, size=(2, 12)).tolist()
    outs = _serve(engine, prompts, ["every", None])
    assert outs[0].token_ids == ji.generate(lora.merge(int4, adapter), prompts[:1], GREEDY)[0].token_ids
    assert outs[1].token_ids == ji.generate(int4, prompts[1:], GREEDY)[0].token_ids


def test_pallas_path_equals_xla(setup, rng):
    """lora_impl="pallas": the SGMV kernel (interpreted here) through the model's projection hook
    gives the XLA path's logits (BGMV: tests/test_lora_matmul.py and the slow engine test)."""
    _, _, model, paths = setup
    adapters = [ji.load_adapter(paths["every"]), None, ji.load_adapter(paths["qv"])]
    tokens = rng.integers(0, 256, size=(3, 16))
    xla = lora.forward_logits(model, tokens, adapters)
    assert row_errors(lora.forward_logits(model, tokens, adapters, lora_impl="pallas"), xla).max() <= 1e-5


@pytest.mark.slow
def test_pallas_path_in_the_engine_equals_xla(setup, rng):
    """The engine's mixed steps and decode calls with lora_impl="pallas" (BGMV for decode rows,
    SGMV for prompt rows) give the XLA path's tokens."""
    _, _, model, paths = setup
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (5, 17)]
    outs = {}
    for impl in ("xla", "pallas"):
        engine = ji.Engine(model, dataclasses.replace(CONFIG, lora_impl=impl, max_tokens_per_step=16))
        engine.add_adapter("every", paths["every"])
        engine.add_adapter("qv", paths["qv"])
        outs[impl] = [o.token_ids for o in _serve(engine, prompts, ["every", "qv"])]
    assert outs["pallas"] == outs["xla"]


def test_peft_reads_what_save_adapter_writes(setup, tmp_path, rng):
    """A random adapter written in PEFT's layout: load_adapter reads it back as written, and peft
    applies it to the HF model as jaxinfer does."""
    hf, _, model, _ = setup
    adapter = lora.random_adapter(model.config, 4, ("wk", "w_up"), alpha=6.0, layers=(0, 2), std=0.1, seed=1,
                                  name="rand")
    lora.save_adapter(adapter, tmp_path / "rand")
    back = ji.load_adapter(tmp_path / "rand")
    assert (back.rank, back.alpha, back.layers_to_transform, back.name) == (4, 6.0, (0, 2), "rand")
    assert all(np.array_equal(back.weights[k][j], adapter.weights[k][j]) for k in adapter.weights for j in (0, 1))
    hf_lora = peft.PeftModel.from_pretrained(hf_model("llama", seed=3), str(tmp_path / "rand")).eval()
    tokens = rng.integers(0, 256, size=(1, 10))
    with torch.no_grad():
        expected = hf_lora(torch.from_numpy(tokens)).logits.numpy()
    assert row_errors(np.asarray(lora.forward_logits(model, tokens, [back])), expected).max() <= TOL


# Bad input ---------------------------------------------------------------------------------------


def _edit_config(path, **changes):
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def _bad_adapter(kind, src, dst, cfg):
    """A copy of a good adapter directory spoiled one way; returns its path."""
    shutil.copytree(src, dst)
    weights = os.path.join(dst, "adapter_model.safetensors")
    if kind == "missing_config":
        os.remove(os.path.join(dst, "adapter_config.json"))
    elif kind == "missing_weights":
        os.remove(weights)
    elif kind == "truncated_weights":
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
    elif kind == "corrupt_config":
        with open(os.path.join(dst, "adapter_config.json"), "w") as f:
            f.write("{not json")
    elif kind == "dora":
        _edit_config(dst, use_dora=True)
    elif kind == "bias":
        _edit_config(dst, bias="every")
    elif kind == "modules_to_save":
        _edit_config(dst, modules_to_save=["lm_head"])
    elif kind == "embedding_target":
        _edit_config(dst, target_modules=["q_proj", "v_proj", "embed_tokens"])
    elif kind == "unknown_target":
        _edit_config(dst, target_modules=["q_proj", "v_proj", "mlp.fc1"])
    elif kind == "layer_past_model":
        _edit_config(dst, layers_to_transform=[0, 7])
    elif kind == "missing_tensor":
        _edit_config(dst, target_modules=["q_proj", "v_proj", "k_proj"])
    elif kind in ("wrong_shape", "embedding_tensor"):
        bigger = dataclasses.replace(cfg, hidden_size=2 * cfg.hidden_size) if kind == "wrong_shape" else cfg
        adapter = lora.random_adapter(bigger, 4, ("wq", "wv"))
        tensors = {lora.adapter.peft_name(p, i, "A"): a.T.copy() for (p, i), (a, _) in adapter.weights.items()}
        tensors.update({lora.adapter.peft_name(p, i, "B"): b.T.copy() for (p, i), (_, b) in adapter.weights.items()})
        if kind == "embedding_tensor":
            tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = np.zeros((4, 256), np.float32)
        save_file(tensors, weights)
    return dst


BAD = {
    "missing_config": "no adapter_config.json in",
    "missing_weights": "no adapter_model.safetensors in",
    "truncated_weights": "is not a readable safetensors file",
    "corrupt_config": "adapter_config.json is not valid JSON",
    "dora": "use_dora=True: DoRA is not supported",
    "bias": "bias='every' is not supported",
    "modules_to_save": "modules_to_save=.*is not supported",
    "embedding_target": "target_modules entry 'embed_tokens': embedding and LM-head targets are not supported",
    "unknown_target": "target_modules entry 'mlp.fc1' is not one of the projections",
    "layer_past_model": r"layers_to_transform=\[0, 7\] names a layer past the model's 3",
    "missing_tensor": "missing tensor 'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight'",
    "wrong_shape": r"tensors of self_attn.q_proj \(layer 0\) are for a \(128 -> 64\) projection; the model's is "
                   r"\(64 -> 64\)",
    "embedding_tensor": "unexpected tensor 'base_model.model.model.embed_tokens.lora_embedding_A': embedding",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_adapter_is_refused_by_name_engine_unchanged(setup, tmp_path, kind):
    _, _, model, paths = setup
    engine = ji.Engine(model, CONFIG)
    path = _bad_adapter(kind, paths["qv"], tmp_path / kind, model.config)
    with pytest.raises(ValueError, match=BAD[kind]):
        engine.add_adapter("bad", path)
    assert engine.adapters.store == {} and engine.adapters.slot_of == {}
    with pytest.raises(ValueError, match="adapter='bad' is not an added adapter"):
        engine.add_request([1, 2, 3], GREEDY, adapter="bad")


def test_engine_refusals(setup):
    _, _, model, paths = setup
    engine = ji.Engine(model, ji.EngineConfig(max_adapters=1, max_lora_rank=4))
    with pytest.raises(ValueError, match="adapter 'every' has rank 8, over max_lora_rank=4"):
        engine.add_adapter("every", paths["every"])
    engine.add_adapter("qv", paths["qv"])
    with pytest.raises(ValueError, match="adapter 'qv' is already added"):
        engine.add_adapter("qv", paths["qv"])
    with pytest.raises(ValueError, match="adapter='nope' is not an added adapter"):
        engine.remove_adapter("nope")
    with pytest.raises(ValueError, match="adapters must be a list of 2 adapter names"):
        engine.generate([[1], [2]], GREEDY, adapters=["qv"])
    with pytest.raises(ValueError, match=r"EngineConfig\(max_adapters=S\)"):
        ji.Engine(model).add_adapter("qv", paths["qv"])
    with pytest.raises(ValueError, match="is not a directory"):
        ji.load_adapter("/no/such/adapter")
    for bad, message in ((dict(max_adapters=-1), "max_adapters=-1 must be >= 0"),
                         (dict(max_lora_rank=0), "max_lora_rank=0 must be >= 1"),
                         (dict(lora_impl="cuda"), "lora_impl='cuda' is not one of")):
        with pytest.raises(ValueError, match=message):
            ji.EngineConfig(**bad)
