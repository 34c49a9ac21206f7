"""Published AutoAWQ ("gemm") and GPTQ (v1/v2) checkpoints load onto QuantizedWeight: exact
dequantisation, the same logits as the known dense weights, and named errors for configs that do
not match their tensors.

The packers here follow the published loops value by value (AutoAWQ's WQLinear_GEMM.from_linear,
AutoGPTQ's QuantLinear.pack) and share no code with the loader.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOLERANCE, row_rel_error
from safetensors.numpy import load_file, save_file

import jaxinfer as ji
from jaxinfer.checkpoints.quantized import load_quantized_params
from jaxinfer.quant import QuantizedWeight, dequantize

CFG = ji.ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, layer_windows=(0, 0))
D, F = CFG.hidden_size, CFG.intermediate_size
N_HEADS, KV = CFG.num_heads * CFG.head_dim, CFG.num_kv_heads * CFG.head_dim
# HF module -> (our name, in_features, out_features)
PROJECTIONS = {
    "self_attn.q_proj": ("wq", D, N_HEADS),
    "self_attn.k_proj": ("wk", D, KV),
    "self_attn.v_proj": ("wv", D, KV),
    "self_attn.o_proj": ("wo", N_HEADS, D),
    "mlp.gate_proj": ("w_gate", D, F),
    "mlp.up_proj": ("w_up", D, F),
    "mlp.down_proj": ("w_down", F, D),
}
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


# --- the published packers ---------------------------------------------------------------------


def awq_pack(values: np.ndarray) -> np.ndarray:
    """(R, N) 4-bit values -> int32 (R, N / 8): word column `col` slot i holds column col*8 + AWQ_ORDER[i]."""
    R, N = values.shape
    out = np.zeros((R, N // 8), np.uint32)
    for col in range(N // 8):
        for i in range(8):
            out[:, col] |= values[:, col * 8 + AWQ_ORDER[i]].astype(np.uint32) << np.uint32(4 * i)
    return out.view(np.int32)


def gptq_pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """(K, N) -> int32 (K * bits / 32, N): word row r slot j holds input row r * (32 / bits) + j."""
    per = 32 // bits
    K, N = q.shape
    out = np.zeros((K // per, N), np.uint32)
    for row in range(K // per):
        for j in range(per):
            out[row] |= q[row * per + j].astype(np.uint32) << np.uint32(bits * j)
    return out.view(np.int32)


def gptq_pack_cols(z: np.ndarray, bits: int) -> np.ndarray:
    """(G, N) -> int32 (G, N * bits / 32): word column c slot j holds column c * (32 / bits) + j."""
    per = 32 // bits
    G, N = z.shape
    out = np.zeros((G, N // per), np.uint32)
    for col in range(N // per):
        for j in range(per):
            out[:, col] |= z[:, col * per + j].astype(np.uint32) << np.uint32(bits * j)
    return out.view(np.int32)


# --- checkpoints built from known integers -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    method: str  # "awq" | "gptq"
    bits: int = 4
    group_size: int = 32  # -1: per-channel
    sym: bool = False
    fmt: str = "gptq"  # GPTQ checkpoint_format: "gptq" (v1, zero - 1 stored) | "gptq_v2"
    act_order: bool = False
    autoawq_keys: bool = False  # AutoAWQ's own key names (w_bit, q_group_size) instead of transformers'

    def quantization_config(self) -> dict:
        if self.method == "awq":
            if self.autoawq_keys:
                return {"quant_method": "awq", "w_bit": 4, "q_group_size": self.group_size, "zero_point": True,
                        "version": "GEMM"}
            return {"quant_method": "awq", "bits": 4, "group_size": self.group_size, "zero_point": True,
                    "format": "gemm"}
        qc = {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
              "desc_act": self.act_order, "sym": self.sym}
        if self.fmt != "gptq":  # v1 is the default when the key is absent
            qc["checkpoint_format"] = self.fmt
        return qc


def write_checkpoint(path, case: Case, rng: np.random.Generator) -> dict:
    """Write config.json + model.safetensors in the published layout. Returns, per projection, the
    dense (L, K, N) weight (q - z) * s and the per-layer g_idx."""
    os.makedirs(path, exist_ok=True)
    tensors = {
        "model.embed_tokens.weight": rng.normal(0, 1.0, (CFG.vocab_size, D)).astype(np.float16),
        "model.norm.weight": (1 + 0.1 * rng.normal(size=D)).astype(np.float16),
        "lm_head.weight": rng.normal(0, 0.2, (CFG.vocab_size, D)).astype(np.float16),
    }
    truth = {name: {"w": [], "g_idx": []} for name, _, _ in PROJECTIONS.values()}
    top = 2**case.bits
    for i in range(CFG.num_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = (1 + 0.1 * rng.normal(size=D)).astype(np.float16)
        for hf, (name, K, N) in PROJECTIONS.items():
            g = K if case.group_size == -1 else case.group_size
            G = K // g
            q = rng.integers(0, top, (K, N))
            if case.sym:
                z = np.full((G, N), top // 2)
            else:  # AutoGPTQ's v1 packer stores z - 1 through a uint32 cast: z = 0 would corrupt the word
                z = rng.integers(1 if case.fmt == "gptq" and case.method == "gptq" else 0, top, (G, N))
            s = (rng.uniform(0.5, 1.5, (G, N)) * 0.16 / top).astype(np.float16)  # weights ~ 0.05
            g_idx = np.arange(K) // g
            if case.act_order and (i, name) != (0, "wo"):  # one layer left in order: its perm is the identity
                g_idx = rng.permutation(g_idx)
            w = (q - z[g_idx]) * s[g_idx].astype(np.float64)  # exact in float32: int * float16
            truth[name]["w"].append(w.astype(np.float32))
            truth[name]["g_idx"].append(g_idx)
            prefix = f"model.layers.{i}.{hf}"
            if case.method == "awq":
                tensors[f"{prefix}.qweight"] = awq_pack(q)
                tensors[f"{prefix}.qzeros"] = awq_pack(z)
            else:
                tensors[f"{prefix}.qweight"] = gptq_pack_rows(q, case.bits)
                tensors[f"{prefix}.qzeros"] = gptq_pack_cols(z - 1 if case.fmt == "gptq" else z, case.bits)
                tensors[f"{prefix}.g_idx"] = g_idx.astype(np.int32)
            tensors[f"{prefix}.scales"] = s
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = {**CFG.to_hf_dict(), "torch_dtype": "float16", "quantization_config": case.quantization_config()}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return {name: {"w": np.stack(t["w"]), "g_idx": t["g_idx"]} for name, t in truth.items()}


CASES = {
    "awq-g32-autoawq-keys": Case("awq", group_size=32, autoawq_keys=True),
    "awq-g64": Case("awq", group_size=64),
    "gptq-v1-sym-g32": Case("gptq", group_size=32, sym=True),
    "gptq-v1-asym-g64": Case("gptq", group_size=64),
    "gptq-v2-asym-g32": Case("gptq", group_size=32, fmt="gptq_v2"),
    "gptq-v2-sym-per-channel": Case("gptq", group_size=-1, sym=True, fmt="gptq_v2"),
    "gptq-8bit-v1-asym-g32": Case("gptq", bits=8, group_size=32),
    "gptq-desc-act-v2-asym-g32": Case("gptq", group_size=32, fmt="gptq_v2", act_order=True),
}


@pytest.mark.parametrize("case_name", CASES)
def test_checkpoint_loads_exactly(case_name, tmp_path, rng):
    case = CASES[case_name]
    truth = write_checkpoint(tmp_path / "ckpt", case, rng)
    model = ji.load_model(tmp_path / "ckpt")
    layers = model.params["layers"]
    for name, t in truth.items():
        w = layers[name]
        assert isinstance(w, QuantizedWeight), name
        assert w.qweight.dtype == jnp.uint8 and w.scales.dtype == jnp.float16, name
        assert (w.bits, w.shape) == (case.bits, t["w"].shape), name
        assert w.group_size == (t["w"].shape[1] if case.group_size == -1 else case.group_size)
        if case.sym:
            assert w.zeros is None, name
        else:
            assert w.zeros.dtype == jnp.uint8, name
        if case.act_order:
            expected = np.stack([np.argsort(g, kind="stable") for g in t["g_idx"]])
            np.testing.assert_array_equal(np.asarray(w.perm), expected)
        else:
            assert w.perm is None, name
        np.testing.assert_array_equal(np.asarray(dequantize(w)), t["w"], err_msg=name)

    dense_layers = {**layers, **{name: jnp.asarray(t["w"]) for name, t in truth.items()}}
    dense = ji.Model(config=model.config, params={**model.params, "layers": dense_layers})
    tokens = rng.integers(0, CFG.vocab_size, size=(2, 11))
    logits = ji.forward_logits(model, tokens)
    assert row_rel_error(logits, ji.forward_logits(dense, tokens)) < TOLERANCE["float32"]


def test_scale_dtype_on_request(tmp_path, rng):
    case = Case("gptq", group_size=32, fmt="gptq_v2")
    truth = write_checkpoint(tmp_path / "ckpt", case, rng)
    params = load_quantized_params(str(tmp_path / "ckpt"), CFG, case.quantization_config(), scale_dtype="float32",
                                   progress=False)
    w = params["layers"]["w_down"]
    assert w.scales.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(dequantize(w)), truth["w_down"]["w"])


# --- configs that do not match their tensors ----------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A GPTQ v1 4-bit g32 checkpoint to corrupt."""
    path = tmp_path_factory.mktemp("gptq")
    write_checkpoint(path, Case("gptq", group_size=32), np.random.default_rng(0))
    return str(path)


def _corrupt(src: str, dst, edit) -> str:
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    edit(tensors, config["quantization_config"])
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dst)


def _uneven_g_idx(t, qc):
    g_idx = t["model.layers.1.self_attn.o_proj.g_idx"]
    g_idx[np.flatnonzero(g_idx == 0)[0]] = 1  # group 0 loses a row to group 1


def _g_idx_out_of_range(t, qc):
    t["model.layers.0.mlp.down_proj.g_idx"][5] = 4  # 128 rows / 32 = groups 0..3


def _dense_projection(t, qc):
    t["model.layers.0.self_attn.q_proj.weight"] = np.zeros((N_HEADS, D), np.float16)


BAD = {
    "bits-vs-qweight": (lambda t, qc: qc.update(bits=8),
                        r"'model\.layers\.0\.[a-z_.]+\.qweight' has shape \(\d+, \d+\), expected .* for bits=8 "
                        r"\(its shape implies bits=4\)"),
    "group-size-vs-rows": (lambda t, qc: qc.update(group_size=64),
                           r"'model\.layers\.0\.[a-z_.]+\.(qzeros|scales)'.*group_size=64 with in_features=\d+ "
                           r"gives \d+ groups, its \d+ rows imply group_size=32"),
    "missing-qzeros": (lambda t, qc: t.pop("model.layers.1.mlp.up_proj.qzeros"),
                       r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.qzeros'"),
    "missing-scales": (lambda t, qc: t.pop("model.layers.0.self_attn.v_proj.scales"),
                       r"missing tensor 'model\.layers\.0\.self_attn\.v_proj\.scales'"),
    "missing-g_idx": (lambda t, qc: t.pop("model.layers.1.self_attn.k_proj.g_idx"),
                      r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.g_idx'.*quant_method='gptq'"),
    "uneven-g_idx": (_uneven_g_idx,
                     r"'model\.layers\.1\.self_attn\.o_proj\.g_idx': group 0 has 31 rows, group_size=32 needs "
                     r"exactly 32"),
    "g_idx-out-of-range": (_g_idx_out_of_range,
                           r"'model\.layers\.0\.mlp\.down_proj\.g_idx' holds group 4, expected groups in \[0, 4\)"),
    "qweight-dtype": (lambda t, qc: t.update({"model.layers.1.mlp.gate_proj.qweight":
                                              t["model.layers.1.mlp.gate_proj.qweight"].view(np.float32)}),
                      r"'model\.layers\.1\.mlp\.gate_proj\.qweight' has dtype F32, expected one of \('I32',\)"),
    "dense-projection-left": (_dense_projection, r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'"),
    "group-size-not-dividing": (lambda t, qc: qc.update(group_size=48),
                                r"model\.layers\.\*\.self_attn\.q_proj: group_size=48 does not divide in_features=64"),
}


@pytest.mark.parametrize("bad", BAD)
def test_mismatched_tensor_names_the_layer(bad, base, tmp_path):
    edit, pattern = BAD[bad]
    with pytest.raises(ji.CheckpointError, match=pattern):
        ji.load_model(_corrupt(base, tmp_path / "bad", edit))


CONFIG_ERRORS = {
    "method": ({"quant_method": "bitsandbytes"}, r"quant_method='bitsandbytes' is not one of \('awq', 'gptq'\)"),
    "awq-version": ({"quant_method": "awq", "version": "gemv"}, r"version='gemv'.*\('gemm',\)"),
    "awq-bits": ({"quant_method": "awq", "bits": 8, "format": "gemm"}, r"bits=8.*4-bit only"),
    "gptq-bits": ({"bits": 3}, r"bits=3 is not one of \(4, 8\)"),
    "gptq-format": ({"checkpoint_format": "marlin"}, r"checkpoint_format='marlin' is not one of"),
    "group-size": ({"group_size": 0}, r"group_size=0 must be >= 1 or -1"),
}


@pytest.mark.parametrize("bad", CONFIG_ERRORS)
def test_unsupported_config_names_the_field(bad, base, tmp_path):
    update, pattern = CONFIG_ERRORS[bad]
    with pytest.raises(ji.CheckpointError, match=pattern):
        ji.load_model(_corrupt(base, tmp_path / "bad", lambda t, qc: qc.update(update)))
