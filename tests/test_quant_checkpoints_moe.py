"""Published AutoAWQ / GPTQ checkpoints of a mixture of experts (Mixtral's layout: one quantised
module per expert, `block_sparse_moe.experts.{e}.w1/w2/w3`, the router dense) load as one
QuantizedWeight (L, E, ...) per expert weight: exact dequantisation, the logits of the known dense
weights through the XLA and the Pallas grouped paths, the greedy tokens of the engine, and named
errors. The packers are test_quant_checkpoints.py's (the published loops), sharing no code with the
loader."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOLERANCE, row_rel_error
from safetensors.numpy import save_file
from test_quant_checkpoints import _corrupt, awq_pack, gptq_pack_cols, gptq_pack_rows

import jaxinfer as ji
from jaxinfer.quant import QuantizedWeight, dequantize

HF = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 256, "hidden_size": 64,
      "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 128,
      "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
D, F, E, L = HF["hidden_size"], HF["intermediate_size"], HF["num_local_experts"], HF["num_hidden_layers"]
Q, KV = HF["num_attention_heads"] * HF["head_dim"], HF["num_key_value_heads"] * HF["head_dim"]
ATTENTION = {"self_attn.q_proj": ("wq", D, Q), "self_attn.k_proj": ("wk", D, KV), "self_attn.v_proj": ("wv", D, KV),
             "self_attn.o_proj": ("wo", Q, D)}
EXPERTS = {"w1": ("experts_gate", D, F), "w3": ("experts_up", D, F), "w2": ("experts_down", F, D)}


def _module(tensors: dict, prefix: str, method: str, K: int, N: int, g: int, rng, act_order: bool = False):
    """One quantised module's tensors (AutoAWQ gemm, or GPTQ v1 symmetric 4-bit); its dense (K, N) weight."""
    G = K // g
    q = rng.integers(0, 16, (K, N))
    z = rng.integers(0, 16, (G, N)) if method == "awq" else np.full((G, N), 8)
    s = (rng.uniform(0.5, 1.5, (G, N)) * 0.01).astype(np.float16)
    g_idx = rng.permutation(np.arange(K) // g) if act_order else np.arange(K) // g
    if method == "awq":
        tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"] = awq_pack(q), awq_pack(z)
    else:
        tensors[f"{prefix}.qweight"] = gptq_pack_rows(q, 4)
        tensors[f"{prefix}.qzeros"] = gptq_pack_cols(z - 1, 4)  # v1: zero - 1 stored
        tensors[f"{prefix}.g_idx"] = g_idx.astype(np.int32)
    tensors[f"{prefix}.scales"] = s
    return ((q - z[g_idx]) * s[g_idx].astype(np.float64)).astype(np.float32)


def write_moe_checkpoint(path, method: str, rng, act_order_expert: int | None = None) -> dict:
    """config.json + model.safetensors of a random Mixtral, every projection and expert quantised
    (4-bit, groups of 32); returns each quantised weight's dense (L, [E,] K, N) truth."""
    os.makedirs(path, exist_ok=True)
    tensors = {"model.embed_tokens.weight": rng.normal(0, 1.0, (HF["vocab_size"], D)).astype(np.float16),
               "model.norm.weight": (1 + 0.1 * rng.normal(size=D)).astype(np.float16),
               "lm_head.weight": rng.normal(0, 0.2, (HF["vocab_size"], D)).astype(np.float16)}
    truth: dict = {name: [] for name, _, _ in [*ATTENTION.values(), *EXPERTS.values()]}
    for i in range(L):
        layer = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{layer}.{norm}.weight"] = (1 + 0.1 * rng.normal(size=D)).astype(np.float16)
        tensors[f"{layer}.block_sparse_moe.gate.weight"] = rng.normal(0, 0.5, (E, D)).astype(np.float16)
        for hf, (name, K, N) in ATTENTION.items():
            truth[name].append(_module(tensors, f"{layer}.{hf}", method, K, N, 32, rng))
        for hf, (name, K, N) in EXPERTS.items():
            truth[name].append(np.stack([
                _module(tensors, f"{layer}.block_sparse_moe.experts.{e}.{hf}", method, K, N, 32, rng,
                        act_order=(i, e) == (1, act_order_expert)) for e in range(E)]))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    qc = ({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
           "modules_to_not_convert": ["gate"]} if method == "awq" else
          {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": act_order_expert is not None})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**HF, "torch_dtype": "float16", "quantization_config": qc}, f)
    return {name: np.stack(t) for name, t in truth.items()}


@pytest.mark.parametrize("method, act_order_expert", [("awq", None), ("gptq", 2)])
def test_moe_checkpoint_loads_exactly(method, act_order_expert, tmp_path, rng):
    """Every expert's integers, zero points and scales land on its slice of the stacked weight (an
    act-order expert on its own row order); the model gives the dense weights' logits on the XLA path
    and through the Pallas grouped kernel, and the engine their greedy tokens."""
    truth = write_moe_checkpoint(tmp_path / "ckpt", method, rng, act_order_expert)
    model = ji.load_model(tmp_path / "ckpt")
    layers = model.params["layers"]
    for name, w_true in truth.items():
        w = layers[name]
        assert isinstance(w, QuantizedWeight) and w.shape == w_true.shape, name
        assert (w.zeros is None) == (method == "gptq"), name  # GPTQ sym: the implicit zero
        np.testing.assert_array_equal(np.asarray(dequantize(w)), w_true, err_msg=name)
    perm = layers["experts_gate"].perm
    assert (perm is not None) == (act_order_expert is not None)
    if perm is not None:  # only layer 1's expert 2 is out of order
        moved = np.any(np.asarray(perm) != np.arange(D), axis=-1)
        assert moved.tolist() == [[False] * E, [e == act_order_expert for e in range(E)]]

    dense = ji.Model(model.config, {**model.params, "layers": {**layers, **{n: jnp.asarray(t) for n, t in truth.items()}}})
    tokens = rng.integers(0, HF["vocab_size"], size=(2, 11))
    expected = ji.forward_logits(dense, tokens)
    assert row_rel_error(ji.forward_logits(model, tokens), expected) < TOLERANCE["float32"]
    assert row_rel_error(ji.forward_logits(model, tokens, matmul_impl="pallas"), expected) < TOLERANCE["float32"]
    sp = ji.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = tokens.tolist()
    got = [o.token_ids for o in ji.Engine(model, ji.EngineConfig(max_batch=2)).generate(prompts, sp)]
    assert got == [o.token_ids for o in ji.Engine(dense, ji.EngineConfig(max_batch=2)).generate(prompts, sp)]


@pytest.fixture(scope="module")
def awq_moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("awq_moe")
    write_moe_checkpoint(path, "awq", np.random.default_rng(0))
    return str(path)


BAD = {
    "missing-expert-scales": (lambda t, qc: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.scales"),
                              r"missing tensor 'model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.scales'"),
    "dense-expert-left": (lambda t, qc: t.update({"model.layers.0.block_sparse_moe.experts.0.w1.weight":
                                                  np.zeros((F, D), np.float16)}),
                          r"unexpected tensor 'model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight'"),
    "expert-group-size": (lambda t, qc: qc.update(group_size=64),
                          r"model\.layers\.\*\.block_sparse_moe\.experts\.\*\.w2: group_size=64 does not divide "
                          r"in_features=96"),
}


@pytest.mark.parametrize("bad", BAD)
def test_bad_moe_checkpoint_names_the_expert(bad, awq_moe, tmp_path):
    edit, pattern = BAD[bad]
    with pytest.raises(ji.CheckpointError, match=pattern):
        ji.load_model(_corrupt(awq_moe, tmp_path / "bad", edit))


def test_stacked_experts_are_refused_naming_the_tensor():
    """gpt-oss stores a layer's experts in one tensor: no per-expert module for AWQ / GPTQ to quantise."""
    from jaxinfer.checkpoints.quantized import CheckpointQuant, _projections

    cfg = ji.ModelConfig.from_hf_dict({"model_type": "gpt_oss", "vocab_size": 64, "hidden_size": 64,
                                       "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                       "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
                                       "num_experts_per_tok": 2, "sliding_window": 8})
    quant = CheckpointQuant.from_hf({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"})
    with pytest.raises(ji.CheckpointError, match=r"gpt_oss are not read: its fused projections "
                                                 r"\(model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        _projections(cfg, quant)
