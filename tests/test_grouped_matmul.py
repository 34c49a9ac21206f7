"""pallas_kernels.grouped_matmul (interpret mode) against its reference and jax.lax.ragged_dot, over
random group sizes (empty groups, groups smaller and larger than a tile, rows past the sizes), and
the MoE model through it; grouped_quant_matmul (int8 / int4 experts dequantised in the kernel)
against its reference and against each expert dequantised by jaxinfer's own format code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import INTERPRET, TOLERANCE, assert_rows_close, draws
from hypothesis import example, given
from hypothesis import strategies as st

from pallas_kernels import grouped_matmul as gm

BLOCKS = [gm.BlockSizes(16, 16, 16), gm.BlockSizes(32, 16, 32), None]


@st.composite
def cases(draw):
    E = draw(st.integers(1, 6))
    return dict(sizes=[draw(st.sampled_from([0, 1, 15, 16, 17, 40])) for _ in range(E)],
                extra_rows=draw(st.sampled_from([0, 0, 3])), K=draw(st.sampled_from([16, 24, 64])),
                N=draw(st.sampled_from([16, 40, 96])), dtype=draw(st.sampled_from(["float32", "bfloat16"])),
                blocks=draw(st.sampled_from(range(len(BLOCKS)))), seed=draw(st.integers(0, 2**16)))


def _case(sizes, K, N, dtype, extra_rows=0, blocks=0, seed=0):
    return dict(sizes=sizes, extra_rows=extra_rows, K=K, N=N, dtype=dtype, blocks=blocks, seed=seed)


@draws(3)
@given(case=cases())
@example(case=_case([5, 0, 17, 3], 24, 40, "float32", extra_rows=2))  # an empty group, rows past the sizes
@example(case=_case([0, 0, 64, 1, 30], 64, 96, "bfloat16", blocks=1))  # leading empty groups, a full tile
@example(case=_case([1], 16, 16, "float32", blocks=2))  # one row, one group
def test_grouped_matmul_matches_reference(case):
    rng = np.random.default_rng(case["seed"])
    sizes = np.asarray(case["sizes"], np.int32)
    M = int(sizes.sum()) + case["extra_rows"]
    if M == 0:
        return
    x = jnp.asarray(rng.standard_normal((M, case["K"])), case["dtype"])
    w = jnp.asarray(rng.standard_normal((len(sizes), case["K"], case["N"])), case["dtype"])
    gs = jnp.asarray(sizes)
    out = gm.grouped_matmul(x, w, gs, block_sizes=BLOCKS[case["blocks"]], interpret=INTERPRET)
    ref = gm.reference(x, w, gs)
    real = slice(0, int(sizes.sum()))
    if int(sizes.sum()):
        assert_rows_close(out[real], ref[real], TOLERANCE[case["dtype"]])
    assert not np.asarray(out[int(sizes.sum()):], np.float32).any()  # rows past the sizes: zeros
    if case["dtype"] == "float32" and int(sizes.sum()):  # the reference is ragged_dot's contract
        assert_rows_close(ref[real], jax.lax.ragged_dot(x, w, gs)[real], 1e-6)


QUANT_FORMATS = [  # (bits, group size, zero points, mins): symmetric, asymmetric (AWQ-style), Q4_1-style
    (8, 32, False, False), (8, 64, True, False), (4, 32, False, False), (4, 32, True, False), (4, 64, False, True)]


@st.composite
def quant_cases(draw):
    E = draw(st.integers(1, 5))
    return dict(sizes=[draw(st.sampled_from([0, 1, 15, 17, 40])) for _ in range(E)],
                extra_rows=draw(st.sampled_from([0, 3])), K=draw(st.sampled_from([64, 128, 100])),
                N=draw(st.sampled_from([16, 40, 96])), dtype=draw(st.sampled_from(["float32", "bfloat16"])),
                fmt=draw(st.sampled_from(range(len(QUANT_FORMATS)))), blocks=draw(st.sampled_from(range(len(BLOCKS)))),
                seed=draw(st.integers(0, 2**16)))


def _quantized_experts(rng, E, K, N, bits, g, zeros, mins):
    """Random experts in jaxinfer's packed format, K padded up to a multiple of g."""
    from jaxinfer.models import formats

    Kp = -(-K // g) * g
    q = rng.integers(0, 2**bits, (E, Kp, N)).astype(np.uint8)
    w = formats.QuantizedWeight(
        qweight=jnp.asarray(formats.pack(jnp.asarray(q), bits, g)),
        scales=jnp.asarray(rng.uniform(0.01, 0.1, (E, Kp // g, N)), jnp.float32),
        zeros=jnp.asarray(rng.integers(0, 2**bits, (E, Kp // g, N)), jnp.uint8) if zeros else None,
        perm=None, bits=bits, group_size=g, in_features=K,
        mins=jnp.asarray(rng.uniform(-0.3, 0.0, (E, Kp // g, N)), jnp.float32) if mins else None)
    return w


@draws(3)
@given(case=quant_cases())
@example(case={"sizes": [5, 0, 17, 3], "extra_rows": 2, "K": 100, "N": 40, "dtype": "float32", "fmt": 3, "blocks": 0,
               "seed": 1})  # an empty group, rows past the sizes, K padded to the group
@example(case={"sizes": [0, 40, 1], "extra_rows": 0, "K": 128, "N": 96, "dtype": "bfloat16", "fmt": 4, "blocks": 1,
               "seed": 2})  # Q4_1-style mins, groups of 64
@example(case={"sizes": [16], "extra_rows": 0, "K": 64, "N": 16, "dtype": "float32", "fmt": 0, "blocks": 2,
               "seed": 3})
def test_grouped_quant_matmul_matches_its_references(case):
    """Empty groups, rows past the sizes, K not a multiple of the group (padded rows), every
    format: the kernel equals quant_reference, and quant_reference equals ragged_dot over the experts
    dequantised by jaxinfer.models.formats (an independent reading of the packing)."""
    from jaxinfer.models import formats

    rng = np.random.default_rng(case["seed"])
    bits, g, zeros, mins = QUANT_FORMATS[case["fmt"]]
    sizes = np.asarray(case["sizes"], np.int32)
    M = int(sizes.sum()) + case["extra_rows"]
    if M == 0:
        return
    K, N, E = case["K"], case["N"], len(sizes)
    w = _quantized_experts(rng, E, K, N, bits, g, zeros, mins)
    x = jnp.asarray(rng.standard_normal((M, K)), case["dtype"])
    gs = jnp.asarray(sizes)
    args = (x, w.qweight, w.scales, w.zeros, w.mins, gs)
    out = gm.grouped_quant_matmul(*args, bits=bits, group_size=g, block_sizes=BLOCKS[case["blocks"]],
                                  interpret=INTERPRET)
    ref = gm.quant_reference(*args, bits=bits, group_size=g)
    real = slice(0, int(sizes.sum()))
    if int(sizes.sum()):
        assert_rows_close(out[real], ref[real], TOLERANCE[case["dtype"]])
        dense = formats.dequantize(w, x.dtype)  # (E, K, N)
        expected = jax.lax.ragged_dot(x, dense, gs, preferred_element_type=jnp.float32)
        assert_rows_close(ref[real], expected[real], TOLERANCE[case["dtype"]])
    assert not np.asarray(out[int(sizes.sum()):], np.float32).any()  # rows past the sizes: zeros


def test_bad_quant_input_raises_value_error():
    x, q, s = jnp.zeros((4, 64)), jnp.zeros((2, 32, 16), jnp.uint8), jnp.ones((2, 2, 16))
    gs = jnp.asarray([2, 2])
    with pytest.raises(ValueError, match="bits=3"):
        gm.grouped_quant_matmul(x, q, s, None, None, gs, bits=3, group_size=32)
    with pytest.raises(ValueError, match="scales must have shape"):
        gm.grouped_quant_matmul(x, q, jnp.ones((2, 3, 16)), None, None, gs, bits=4, group_size=32)
    with pytest.raises(ValueError, match="x must be"):
        gm.grouped_quant_matmul(jnp.zeros((4, 16)), q, s, None, None, gs, bits=4, group_size=32)


def test_bad_input_raises_value_error():
    x, w = jnp.zeros((4, 16)), jnp.zeros((2, 16, 16))
    with pytest.raises(ValueError, match="same K"):
        gm.grouped_matmul(x, jnp.zeros((2, 8, 16)), jnp.asarray([2, 2]))
    with pytest.raises(ValueError, match="group_sizes must be integer"):
        gm.grouped_matmul(x, w, jnp.asarray([2, 2, 0]))
    with pytest.raises(ValueError, match="powers of two"):
        gm.grouped_matmul(x, w, jnp.asarray([2, 2]), block_sizes=gm.BlockSizes(24, 16, 16))


def test_moe_model_through_the_kernel_gives_the_xla_tokens(rng):
    """A random Qwen3-MoE model through the paged engine with matmul="pallas" (the grouped kernel
    for the experts, interpret mode): the tokens of the XLA path (ragged_dot)."""
    import jaxinfer as ji

    cfg = ji.ModelConfig.from_hf_dict(dict(
        model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64))
    model = ji.Model(cfg, ji.init_params(cfg, jax.random.key(4), std=0.1))
    prompts = [rng.integers(0, 64, size=n).tolist() for n in (9, 4)]
    sp = ji.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    xla = ji.Engine(model, ji.EngineConfig(max_batch=2)).generate(prompts, sp)
    pallas = ji.Engine(model, ji.EngineConfig(max_batch=2, matmul="pallas")).generate(prompts, sp)
    assert [o.token_ids for o in pallas] == [o.token_ids for o in xla]
    tokens = jnp.asarray([prompts[0]])
    logits = [ji.forward_logits(model, tokens, matmul_impl=impl) for impl in ("xla", "pallas")]
    assert_rows_close(logits[1], logits[0], TOLERANCE["float32"])
