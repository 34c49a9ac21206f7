"""quant_matmul (interpret mode) against its reference; the reference against jaxinfer.models.formats.

Shapes are drawn by hypothesis and kept small (each new shape costs an interpret-mode compile of a
second or two). Interpret mode fills kernel outputs with NaN before the kernel runs
(`test_interpret_outputs_start_poisoned` guards that), and every split's partial feeds the summed
output, so an output element or partial the kernel fails to write shows up as NaN. Odd N makes
the last column tile overlap its neighbour; M = 300 crosses several row blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import INTERPRET, THOROUGH, TOLERANCE, assert_rows_close, draws, row_errors
from hypothesis import example, given
from hypothesis import strategies as st
from jax.experimental import pallas as pl

from jaxinfer.models import formats as fmt
from jaxinfer.models.matmul import linear
from jaxinfer.quant import rtn
from pallas_kernels import quant_matmul as qm

# helpers.TOLERANCE has no float16: rounding the float32 accumulator to float16 costs at most
# 2**-11 relative per element (bfloat16: 2**-8), well inside 1e-2.
TOL = {**TOLERANCE, "float16": 1e-2}
BS = qm.BlockSizes
BLOCKS = [None, BS(16, 16, 16, 3, 4, 2), BS(32, 32, 64, 2, 4, 2), BS(64, 64, 32, 1, 4, 2)]


# Jitted: one compile per shape instead of one per jnp op on it.
_reference = jax.jit(qm.reference, static_argnames=("bits", "group_size", "block_sizes", "interpret"))


def _random_weight(rng, *, K, N, bits, group_size, cut, symmetric, permute, mins=False):
    """Random stored arrays for K = Kp - cut input rows: all of uint8 qweight's range, positive
    scales (float32), zero points anywhere in [0, 2**bits), a random act-order perm, and with
    `mins` float16 per-group offsets of either sign (Q4_1's minimum, -8 scales or so)."""
    Kp = K + cut
    g = group_size or Kp
    qweight = rng.integers(0, 256, (Kp * bits // 8, N), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.02, (Kp // g, N)).astype(np.float32)
    zeros = None if symmetric else rng.integers(0, 2**bits, (Kp // g, N), dtype=np.uint8)
    perm = rng.permutation(K).astype(np.int32) if permute else None
    offsets = (rng.uniform(-10, 2, (Kp // g, N)) * scales).astype(np.float16) if mins else None
    arrays = tuple(None if a is None else jnp.asarray(a) for a in (qweight, scales, zeros, perm, offsets))
    return arrays, dict(bits=bits, group_size=g)


def _rtn_weight(rng, K, N, bits, group_size, symmetric, permute, pad=True):
    """An RTN QuantizedWeight of a random (K, N) matrix; with `permute`, stored row i holds
    input row perm[i] (act-order), built by permuting the rows before quantising."""
    w = rng.standard_normal((K, N)) * 0.05
    perm = rng.permutation(K).astype(np.int32) if permute else None
    stored = jnp.asarray(w if perm is None else w[perm], jnp.float32)
    qw = rtn.quantize_weight(stored, bits, group_size, symmetric=symmetric, pad=pad)
    return qw.replace(perm=None if perm is None else jnp.asarray(perm)), jnp.asarray(w, jnp.float32)


def _args(qw):
    return (qw.qweight, qw.scales, qw.zeros, qw.perm, qw.mins), dict(bits=qw.bits, group_size=qw.group_size)


def _check(actual, expected, dtype):
    assert_rows_close(actual, expected, TOL[jnp.dtype(dtype).name])


@st.composite
def cases(draw):
    bits = draw(st.sampled_from([4, 8]))
    group = draw(st.sampled_from([32, 64, 128, None]))
    Kp = draw(st.sampled_from([64, 128, 192, 256, 512])) if group is None else group * draw(st.integers(1, 4))
    return dict(
        M=draw(st.one_of(st.sampled_from([1, 16, 17, 300]), st.integers(1, 300))),
        K=Kp - (draw(st.sampled_from([0, 0, 1, group - 1])) if group else 0),  # rows padded to Kp
        N=draw(st.sampled_from([33, 97, 48])),
        bits=bits,
        group=group,
        symmetric=draw(st.booleans()),
        permute=draw(st.booleans()),
        mins=draw(st.booleans()),
        dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
        blocks=draw(st.sampled_from(range(len(BLOCKS)))),
        data_seed=draw(st.integers(0, 2**16)),
    )


def _run_case(case, seed):
    rng = np.random.default_rng([seed, case["data_seed"]])
    group = case["group"]
    cut = -case["K"] % group if group else 0
    arrays, kw = _random_weight(rng, K=case["K"], N=case["N"], bits=case["bits"], group_size=group, cut=cut,
                                symmetric=case["symmetric"], permute=case["permute"], mins=case["mins"])
    x = jnp.asarray(rng.standard_normal((case["M"], case["K"])), case["dtype"])
    actual = qm.quant_matmul(x, *arrays, **kw, block_sizes=BLOCKS[case["blocks"]], interpret=INTERPRET)
    assert actual.dtype == x.dtype
    _check(actual, _reference(x, *arrays, **kw), case["dtype"])


def _case(M, K, N, bits, group, symmetric, permute, dtype, blocks=0, data_seed=0, mins=False):
    return dict(M=M, K=K, N=N, bits=bits, group=group, symmetric=symmetric, permute=permute, dtype=dtype,
                blocks=blocks, data_seed=data_seed, mins=mins)


@draws(6)
@given(case=cases())
@example(case=_case(1, 512, 97, 4, 128, True, False, "bfloat16"))  # GEMV: split-K
@example(case=_case(16, 256, 33, 8, None, False, True, "float16"))  # the largest decode shape
@example(case=_case(17, 127, 97, 4, 32, False, True, "float32"))  # the smallest GEMM shape, K padded
@example(case=_case(300, 256, 33, 8, 64, True, False, "bfloat16", blocks=3))  # several row blocks
@example(case=_case(1, 576, 97, 4, 32, True, False, "float32", mins=True))  # Q4_1 decode (GGUF)
@example(case=_case(40, 192, 48, 4, 32, True, False, "bfloat16", blocks=1, mins=True))  # Q4_1 prefill
@example(case=_case(3, 128, 33, 8, 32, False, True, "float16", mins=True))  # mins with zeros and perm
def test_kernel_matches_reference(case, seed):
    """Both paths, int4 / int8, groups 32-128 and per-channel, zeros, mins (Q4_1's offsets),
    act-order, padded rows, three x dtypes, default and explicit block sizes (uneven split counts)."""
    _run_case(case, seed)


@pytest.mark.slow
@THOROUGH
@given(case=cases())
def test_kernel_matches_reference_on_many_shapes(case, seed):
    _run_case(case, seed)


@pytest.mark.parametrize(
    "M, K, N, bits, group, blocks",
    [
        (3, 64, 40, 4, 16, BS(16, 32, 32, 2)),  # 8 packed rows a group: a scale row per packed row
        (20, 96, 24, 8, 24, None),  # 24 rows a group, 32-row steps straddle groups
        (2, 64, 5, 8, 32, None),  # N < 16: the weight's columns are padded to one dot
        (5, 40, 33, 4, None, None),  # per-channel, 20 packed rows: the weight is padded to 32 rows
        (3, 24, 20, 8, 8, BS(16, 16, 16, 2)),  # 24 rows padded to 32, their scales to 4 groups
    ],
)
def test_narrow_groups_and_columns(M, K, N, bits, group, blocks, rng):
    arrays, kw = _random_weight(rng, K=K, N=N, bits=bits, group_size=group, cut=0, symmetric=False, permute=True)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    _check(qm.quant_matmul(x, *arrays, **kw, block_sizes=blocks, interpret=INTERPRET), _reference(x, *arrays, **kw),
           "float32")


def test_leading_dims_and_empty_batch(rng):
    """x (B, T, K) keeps its leading dims; an empty batch gives an empty result."""
    arrays, kw = _random_weight(rng, K=100, N=33, bits=4, group_size=64, cut=28, symmetric=True, permute=True)
    x = jnp.asarray(rng.standard_normal((2, 3, 100)), jnp.bfloat16)
    out = qm.quant_matmul(x, *arrays, **kw, interpret=INTERPRET)
    assert out.shape == (2, 3, 33)
    _check(out.reshape(6, 33), _reference(x.reshape(6, 100), *arrays, **kw), "bfloat16")
    assert qm.quant_matmul(x[:0], *arrays, **kw, interpret=INTERPRET).shape == (0, 3, 33)


@pytest.mark.parametrize("bits, group, symmetric", [(8, None, True), (8, 32, False), (4, 32, True), (4, 64, False),
                                                    (4, None, False)])
@pytest.mark.parametrize("pad, permute", [(False, False), (True, False), (False, True), (True, True)])
def test_reference_matches_format(bits, group, symmetric, pad, permute, rng):
    """reference (nibble planes met by indexed x columns) against format.reference_matmul (unpacked
    rows, one einsum) and against x @ format.dequantize(w), which undoes perm on the weight."""
    K = 80 if pad and group else 128
    qw, w = _rtn_weight(rng, K, 24, bits, group, symmetric, permute, pad=pad)
    assert (qw.padded_in_features > K) == (pad and group is not None)
    x = jnp.asarray(rng.standard_normal((5, K)), jnp.float32)
    arrays, kw = _args(qw)
    ours = _reference(x, *arrays, **kw)
    assert row_errors(ours, fmt.reference_matmul(x, qw)).max() <= 1e-5
    dense = jnp.einsum("mk,kn->mn", x, fmt.dequantize(qw), precision="highest")
    assert row_errors(ours, dense).max() <= 1e-5
    # The dequantised weight is close to w itself, in the original row order.
    assert row_errors(x @ w, dense).max() <= (0.02 if bits == 8 else 0.3)


@pytest.mark.parametrize("bits, symmetric, permute, cut", [(4, True, False, 0), (4, False, True, 7),
                                                           (8, True, True, 1)])
def test_reference_with_mins_matches_format(bits, symmetric, permute, cut, rng):
    """A weight with mins (Q4_1-style when symmetric: zero 0, w = q * d + m): the kernel's reference
    against format.reference_matmul and against x @ format.dequantize(w) written out by hand."""
    K, N, g = 96 - cut, 24, 32
    (qweight, scales, zeros, perm, mins), kw = _random_weight(rng, K=K, N=N, bits=bits, group_size=g, cut=cut,
                                                              symmetric=symmetric, permute=permute, mins=True)
    qw = fmt.QuantizedWeight(qweight, scales, zeros, perm, bits=bits, group_size=g, in_features=K, mins=mins)
    q = np.asarray(fmt.unpack(qweight, bits, g), np.float32)  # (Kp, N) stored rows
    zero = np.float32(0) if zeros is None else np.repeat(np.asarray(zeros, np.float32), g, axis=0)
    offsets = np.repeat(np.asarray(mins, np.float32), g, axis=0)
    by_hand = (q - zero) * np.repeat(np.asarray(scales), g, axis=0) + offsets
    stored = np.asarray(fmt.dequantize_stored(qw))
    np.testing.assert_array_equal(stored, by_hand)
    x = jnp.asarray(rng.standard_normal((5, K)), jnp.float32)
    ours = _reference(x, qweight, scales, zeros, perm, mins, **kw)
    assert row_errors(ours, fmt.reference_matmul(x, qw)).max() <= 1e-5
    dense = jnp.einsum("mk,kn->mn", x, fmt.dequantize(qw), precision="highest")
    assert row_errors(ours, dense).max() <= 1e-5
    _check(linear(x, qw, impl="pallas"), linear(x, qw, impl="xla"), "float32")


def test_linear_pallas_equals_xla(rng):
    """The model's dispatch point: impl="pallas" runs the kernel (interpret mode on the CPU) on an
    RTN weight with padded rows and act-order."""
    qw, _ = _rtn_weight(rng, 120, 40, 4, 32, symmetric=False, permute=True)
    assert qw.padded_in_features == 128
    x = jnp.asarray(rng.standard_normal((2, 5, 120)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(40), jnp.float32)
    _check(linear(x, qw, b, impl="pallas"), linear(x, qw, b, impl="xla"), "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_interpret_outputs_start_poisoned(dtype):
    """The poisoning the tests rely on: interpret mode starts outputs as NaN, not zeros."""
    def writes_nothing(x_ref, o_ref):
        del x_ref, o_ref

    out = pl.pallas_call(
        writes_nothing, out_shape=jax.ShapeDtypeStruct((16, 16), dtype), interpret=True
    )(jnp.ones((16, 16), dtype))
    assert np.isnan(np.asarray(out, np.float32)).all()


def test_bad_input_raises_value_error(rng):
    arrays, kw = _random_weight(rng, K=128, N=32, bits=4, group_size=64, cut=0, symmetric=False, permute=False)
    x = jnp.ones((2, 128), jnp.float32)
    with pytest.raises(ValueError, match="bits=3"):
        qm.quant_matmul(x, *arrays, bits=3, group_size=64)
    with pytest.raises(ValueError, match="group_size=48"):
        qm.quant_matmul(x, *arrays, bits=4, group_size=48)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=K=130"):
        qm.quant_matmul(jnp.ones((2, 130)), *arrays, **kw)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=K=64"):
        qm.quant_matmul(x[:, :64], *arrays, **kw)
    with pytest.raises(ValueError, match="scales"):
        qm.quant_matmul(x, arrays[0], arrays[1][:1], arrays[2], **kw)
    with pytest.raises(ValueError, match="zeros"):
        qm.quant_matmul(x, arrays[0], arrays[1], arrays[2].astype(jnp.int32), **kw)
    with pytest.raises(ValueError, match="perm"):
        qm.quant_matmul(x, *arrays[:3], jnp.arange(64), **kw)
    with pytest.raises(ValueError, match="mins must be a float"):
        qm.quant_matmul(x, *arrays[:4], arrays[1][:1], **kw)
    with pytest.raises(ValueError, match="mins must be a float"):
        qm.quant_matmul(x, *arrays[:4], arrays[2], **kw)
    with pytest.raises(ValueError, match="x.dtype"):
        qm.quant_matmul(x.astype(jnp.int32), *arrays, **kw)
    with pytest.raises(ValueError, match="block_sizes.block_n=24"):
        qm.quant_matmul(x, *arrays, **kw, block_sizes=BS(block_n=24))
