"""Simulated formats (fake-quant): FP4 e2m1, NVFP4 and MXFP4 against a NumPy rendering of their
definitions, int4 with FP8 group scales, the bytes each format would store, and models quantised
to them."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import row_rel_error

import jaxinfer as ji
from jaxinfer import quant
from jaxinfer.models import act_formats as af
from jaxinfer.quant import simulated
from jaxinfer.quant.spec import SimScheme, scheme_from_name

GRID = np.asarray([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # e2m1 magnitudes; odd indices have mantissa 1


def np_fp4(x):
    """Nearest e2m1 value, ties to the even mantissa (the even index), saturating at 6."""
    a = np.minimum(np.abs(x), 6.0)
    d = np.abs(a[..., None] - GRID)
    best = d.min(-1, keepdims=True)
    ties = np.isclose(d, best, rtol=0, atol=1e-12)
    index = np.where(ties & (np.arange(8) % 2 == 0), np.arange(8), 99).min(-1)
    index = np.where(ties.sum(-1) > 1, index, d.argmin(-1))
    return np.sign(x) * GRID[index]


def np_blocks(x, block):  # (R, K) -> (R, K / block, block), zero-padded
    R, K = x.shape
    return np.pad(x, ((0, 0), (0, -K % block))).reshape(R, -1, block)


def np_mxfp4(x):  # rows of x, blocks along the row
    b = np_blocks(x, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    scale = 2.0 ** (np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2)
    return (np_fp4(b / scale) * scale).reshape(x.shape[0], -1)[:, : x.shape[1]]


def np_nvfp4(x):  # one tensor scale for all of x, blocks of 16 along rows
    g = np.abs(x).max() / (448 * 6)
    b = np_blocks(x / g, 16)
    s = (np.abs(b).max(-1, keepdims=True) / 6).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    q = np_fp4(b / np.where(s > 0, s, 1.0)) * s
    return q.reshape(x.shape[0], -1)[:, : x.shape[1]] * g


def test_fp4_rounds_to_nearest_even_and_saturates():
    x = np.concatenate([np.linspace(-8, 8, 321), GRID[:-1] + np.diff(GRID) / 2, [0.25, -0.75, 5.0, 1e9]])
    np.testing.assert_array_equal(np.asarray(af.fp4(jnp.asarray(x, jnp.float32))), np_fp4(x.astype(np.float32)))


def test_fp4_rounds_values_next_to_a_midpoint_once(rng):
    """Values a few float32 steps either side of each midpoint (where rounding through a wider
    intermediate type goes wrong) and random values: each rounds as e2m1's definition says."""
    mids = (GRID[:-1] + np.diff(GRID) / 2).astype(np.float32)
    near = np.concatenate([np.nextafter(mids, np.float32(d * 9)) if d else mids for d in (-1, 0, 1)])
    steps = rng.integers(1, 1 << 12, size=(8, near.size)).astype(np.float32) * np.finfo(np.float32).eps
    x = np.concatenate([near, (near * (1 + steps)).ravel(), (near * (1 - steps)).ravel(),
                        rng.uniform(-7, 7, 20_000).astype(np.float32)])
    x = np.concatenate([x, -x]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(af.fp4(jnp.asarray(x))), np_fp4(x))


def test_mxfp4_matches_its_definition(rng):
    """Power-of-two block scales 2**(floor(log2 max) - 2); rows of 70 (a partial last block), a
    row of zeros, rows spanning 2**-20 .. 2**20."""
    x = rng.standard_normal((5, 70)) * (2.0 ** rng.integers(-20, 20, (5, 1)))
    x[2] = 0.0
    x = x.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(af.fake_mxfp4(jnp.asarray(x), -1)), np_mxfp4(x.astype(np.float64)))


def test_nvfp4_matches_its_definition(rng):
    """e4m3 block scales under one float32 tensor scale, blocks of 16 along the rows (a weight's
    blocks run down its input rows: the same function on the transpose). float32 against float64
    arithmetic: within 1e-6 relative."""
    x = (rng.standard_normal((6, 40)) * rng.uniform(1e-3, 10, (6, 1))).astype(np.float32)
    ours = np.asarray(af.fake_nvfp4(jnp.asarray(x), -1, (-2, -1)))
    np.testing.assert_allclose(ours, np_nvfp4(x.astype(np.float64)), rtol=1e-6, atol=0)
    weight = np.asarray(af.fake_nvfp4(jnp.asarray(x.T), -2, (-2, -1)))
    np.testing.assert_array_equal(weight, ours.T)


def test_int4_fp8_scales_by_hand():
    """One column, two groups of 4: group scales max/7 stored as e4m3 relative to the column's
    largest / 448; values rounded to [-8, 7] steps."""
    w = np.asarray([[0.7], [-0.33], [0.1], [0.0], [0.014], [-0.007], [0.003], [0.0]], np.float32)
    col = (0.7 / 7) / 448
    s = np.asarray([0.1 / col, 0.002 / col]).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * col
    want = np.concatenate([np.clip(np.round(w[:4, 0] / s[0]), -8, 7) * s[0],
                           np.clip(np.round(w[4:, 0] / s[1]), -8, 7) * s[1]])
    got = np.asarray(simulated.fake_int4_fp8scale(jnp.asarray(w), 4))[:, 0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("name, bits_per_weight", [("nvfp4-sim", 4.5), ("mxfp4-sim-a4", 4.25),
                                                   ("w4a16-fp8scale-sim", 4.25)])
def test_stored_bytes(name, bits_per_weight):
    """What each format would store for a (2, 64, 48) stack: values at 4 bits plus the block
    scales (and the per-tensor / per-column float32 scales)."""
    scheme = scheme_from_name(name)
    _, stored = simulated.fake_weight(jnp.ones((2, 64, 48)), scheme)
    extra = {"nvfp4-sim": 2 * 4, "mxfp4-sim-a4": 0, "w4a16-fp8scale-sim": 2 * 48 * 4}[name]
    assert stored == 2 * 64 * 48 * bits_per_weight / 8 + extra


@pytest.fixture(scope="module")
def tiny():
    return ji.load_model("tiny")


def test_simulated_models_on_tiny(tiny):
    """Each simulated scheme wraps every projection in a SimWeight of the rounded weight; the logits
    move off the dense model's but stay close, and rounding the activations too moves them further."""
    tokens = jnp.asarray([list(b"def main(argv):\n    return 0\n")], jnp.int32)
    dense = ji.forward_logits(tiny, tokens)
    errors = {}
    for name in ("nvfp4-sim", "nvfp4-sim-a4"):
        qm = quant.quantize_by_name(tiny, name)
        w = qm.params["layers"]["w_down"]
        assert isinstance(w, af.SimWeight) and w.act == scheme_from_name(name).act and w.weight.dtype == tiny.dtype
        errors[name] = row_rel_error(ji.forward_logits(qm, tokens), dense)
        assert 1e-4 < errors[name] < 0.5, name
    assert errors["nvfp4-sim-a4"] > errors["nvfp4-sim"]


def test_w4a8_weights_are_int4_rtn_g128(tiny):
    """w4a8-sim's weight is exactly what int4-rtn-g128 serves (w_down: 688 rows padded to 768), and
    its bytes are that format's."""
    w = tiny.params["layers"]["w_down"]
    rtn = quant.quantize_weight(w, 4, 128, pad=True)
    weight, stored = simulated.fake_weight(w, scheme_from_name("w4a8-sim"))
    np.testing.assert_array_equal(weight, quant.dequantize(rtn))
    assert stored == rtn.nbytes


def test_activation_formats_refused_by_name():
    with pytest.raises(ValueError, match="activation format 'int4'"):
        af.fake_quantize_activation(jnp.ones((2, 32)), "int4")
    with pytest.raises(ValueError, match="weights='fp4'"):
        SimScheme("fp4")
