"""The quantised-weight format, RTN, the matmul dispatch point and quantised models end to end."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import row_rel_error

import jaxinfer as ji
from jaxinfer import quant
from jaxinfer.models import formats as qf
from jaxinfer.quant.rtn import quantize_weight
from jaxinfer.quant.spec import scheme_from_name


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 64), (4, 256)])
def test_pack_roundtrip_and_halves(rng, bits, group):
    q = rng.integers(0, 2**bits, size=(2, 256, 7)).astype(np.uint8)
    packed = qf.pack(q, bits, group)
    assert packed.dtype == jnp.uint8 and packed.shape == (2, 256 * bits // 8, 7)
    np.testing.assert_array_equal(qf.unpack(packed, bits, group), q)
    if bits == 4:  # the kernel's identity: x @ q == x_lo @ low nibbles + x_hi @ high nibbles
        x = rng.standard_normal((3, 256))
        lo, hi = (np.asarray(h, np.float64) for h in qf.split_halves(x, group))
        p = np.asarray(packed[0], np.int64)
        np.testing.assert_allclose(lo @ (p & 15) + hi @ (p >> 4), x @ q[0], rtol=1e-12)


def test_pack_layout_is_half_split_per_group():
    q = np.zeros((64, 1), np.uint8)
    q[3, 0], q[16 + 3, 0], q[32 + 5, 0] = 1, 2, 3  # group 0 rows 3 and 19; group 1 row 5
    p = np.asarray(qf.pack(q, 4, 32))
    assert p[3, 0] == 1 | (2 << 4) and p[16 + 5, 0] == 3 and p.sum() == p[3, 0] + p[21, 0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [None, 32])
def test_rtn_error_bound(rng, bits, symmetric, group):
    """Every weight dequantises to within half a step of itself (the definition of round to nearest)."""
    w = rng.standard_normal((2, 128, 24)).astype(np.float32)
    qw = quantize_weight(jnp.asarray(w), bits, group, symmetric=symmetric)
    g = group or 128
    step = np.repeat(np.asarray(qw.scales), g, axis=-2)
    err = np.abs(np.asarray(qf.dequantize(qw)) - w)
    assert np.all(err <= 0.5 * step + 1e-6)
    levels = np.asarray(qf.unpack(qw.qweight, bits, g))
    assert levels.max() < 2**bits
    if symmetric:
        assert qw.zeros is None
    else:
        assert qw.zeros.dtype == jnp.uint8 and qw.zeros.shape == (2, 128 // g, 24)


def test_rtn_values_by_hand():
    """One group by hand: symmetric int4 scale = max|w| / 7, zero 8."""
    w = jnp.asarray([[0.7], [-0.35], [0.1], [0.0]], jnp.float32)
    qw = quantize_weight(w, 4, None)
    np.testing.assert_allclose(qw.scales, [[0.1]], rtol=1e-6)
    np.testing.assert_array_equal(qf.unpack(qw.qweight, 4, 4)[:, 0], [15, 4, 9, 8])  # 8 + round(w / 0.1)


def test_perm_and_padding_reference(rng):
    """x @ dequantize(w) == reference_matmul with act-order perm and padded rows."""
    K, N = 80, 9
    w = rng.standard_normal((K, N)).astype(np.float32)
    perm = rng.permutation(K).astype(np.int32)
    qw = quantize_weight(jnp.asarray(w[perm]), 4, 32, symmetric=False, pad=True)  # stored rows in perm order
    assert qw.padded_in_features == 96 and qw.in_features == K
    qw = dataclasses.replace(qw, perm=jnp.asarray(perm))
    dense = np.asarray(qf.dequantize(qw))
    assert dense.shape == (K, N)
    assert np.max(np.abs(dense - w)) < np.max(np.abs(w)) / 7  # rows land back in their original order
    x = rng.standard_normal((5, K)).astype(np.float32)
    assert row_rel_error(qf.reference_matmul(jnp.asarray(x), qw), x @ dense) < 1e-5


def test_bad_scheme_names_the_layer():
    w = jnp.zeros((688, 16))
    with pytest.raises(ValueError, match="w_down: group_size=128 does not divide in_features=688"):
        quantize_weight(w, 4, 128, name="w_down")
    with pytest.raises(ValueError, match="bits=3"):
        quantize_weight(w, 3, 16, name="w_down")
    with pytest.raises(ValueError, match="bits=5"):
        quant.QuantScheme(bits=5)
    with pytest.raises(ValueError, match="weights='int4-foo'"):
        scheme_from_name("int4-foo")
    m = ji.load_model("tiny")
    with pytest.raises(ValueError, match="layers.w_down: group_size=128 does not divide in_features=688"):
        quant.quantize(m.params, quant.QuantScheme(bits=4, group_size=128))


def test_scheme_names_round_trip():
    for s in [quant.QuantScheme(bits=8, group_size=None, pad=True),
              quant.QuantScheme(bits=4, group_size=32, symmetric=False, pad=True),
              quant.QuantScheme(bits=4, group_size=128, method="gptq", act_order=True, pad=True),
              quant.QuantScheme(bits=4, group_size=64, method="awq", pad=True)]:
        assert scheme_from_name(s.name) == s
    assert scheme_from_name("int4") == quant.QuantScheme(bits=4, group_size=128, pad=True)
    assert scheme_from_name("dense") is None


@pytest.fixture(scope="module")
def tiny_int4():
    m = ji.load_model("tiny")
    qm = dataclasses.replace(m, params=quant.quantize(m.params, scheme_from_name("int4-rtn-g32-asym")))
    ref = dataclasses.replace(m, params=quant.dequantize_params(qm.params))
    return m, qm, ref


def test_quantized_model_equals_dequantized_reference(tiny_int4):
    m, qm, ref = tiny_int4
    layers = qm.params["layers"]
    assert all(isinstance(layers[n], quant.QuantizedWeight) for n in quant.LINEAR_WEIGHTS)
    assert layers["w_down"].qweight.shape == (3, 704 // 2, 256)  # 688 rows padded to 22 groups of 32
    tokens = jnp.asarray([list(b"def main(argv):\n    return 0\n")], jnp.int32)
    a, b = ji.forward_logits(qm, tokens), ji.forward_logits(ref, tokens)
    assert row_rel_error(a, b) < 1e-5
    dense = ji.forward_logits(m, tokens)
    assert 1e-3 < row_rel_error(a, dense) < 0.5  # int4 changes the logits, but not beyond recognition


def test_engine_serves_quantized_model_token_for_token(tiny_int4):
    """The engine on packed weights equals the baseline on the dense dequantised model (float32)."""
    _, qm, ref = tiny_int4
    prompts = ["def fibonacci(n):", "import os\n", "class Engine:\n    def step(self"]
    sp = ji.SamplingParams(max_tokens=24, temperature=0.0)
    want = [o.token_ids for o in ji.generate(ref, prompts, sp)]
    engine = ji.Engine(qm, ji.EngineConfig(max_batch=4, page_size=8))
    got = [o.token_ids for o in engine.generate(prompts, sp)]
    assert got == want
    sampled = ji.SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=3)
    assert ([o.token_ids for o in ji.Engine(qm).generate(prompts, sampled)]
            == [o.token_ids for o in ji.generate(ref, prompts, sampled)])


def test_pallas_matmul_in_the_model_and_engine():
    """matmul="pallas" (the kernel, interpret mode here) gives the XLA path's logits and tokens."""
    cfg = ji.ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=64)
    dense = ji.Model(cfg, ji.init_params(cfg, jax.random.key(5), std=0.3), ji.ByteTokenizer())
    qm = dataclasses.replace(dense, params=quant.quantize(dense.params, scheme_from_name("int4-rtn-g32-asym")))
    tokens = jnp.asarray([list(b"def f(x): return x")], jnp.int32)
    xla = ji.forward_logits(qm, tokens)
    assert row_rel_error(ji.forward_logits(qm, tokens, matmul_impl="pallas"), xla) < 1e-5
    sp = ji.SamplingParams(max_tokens=4, temperature=0.0)
    prompts = ["import os", "x = 1"]
    want = [o.token_ids for o in ji.Engine(qm).generate(prompts, sp)]
    got = ji.Engine(qm, ji.EngineConfig(matmul="pallas")).generate(prompts, sp)
    assert [o.token_ids for o in got] == want


@pytest.mark.slow  # 6 s; the fast tier keeps saving and restoring in test_weights and test_gguf
def test_quantized_model_saves_and_restores_exactly(tmp_path):
    """save_model / load_model keep a quantised model packed: same integers, scales, perm, logits."""
    m = ji.load_model("tiny")
    qm = quant.quantize_model(m, scheme_from_name("int4-gptq-g32-asym-act"), num_sequences=4, seq_len=64,
                              progress=False)
    ji.save_model(qm, tmp_path / "q")
    back = ji.load_model(tmp_path / "q")
    for name in quant.LINEAR_WEIGHTS:
        a, b = qm.params["layers"][name], back.params["layers"][name]
        assert isinstance(b, quant.QuantizedWeight) and (a.bits, a.group_size, a.in_features) == (b.bits, b.group_size, b.in_features)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
    assert back.params["layers"]["wq"].perm is not None and back.params["layers"]["wq"].zeros is not None
    tokens = jnp.asarray([list(b"for i in range(10):")], jnp.int32)
    np.testing.assert_array_equal(ji.forward_logits(back, tokens), ji.forward_logits(qm, tokens))
    ji.save_model(m, tmp_path / "q")  # a dense model saved over it drops the quantised layout
    assert not isinstance(ji.load_model(tmp_path / "q").params["layers"]["wq"], quant.QuantizedWeight)
