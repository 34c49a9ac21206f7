"""lora_matmul (interpret mode) against its reference, and the reference against a loop in numpy.

Interpret mode fills kernel outputs with NaN before the kernel runs (tests/test_quant_matmul.py
guards that), and the shrink's output feeds the expand, so a row either kernel fails to write
shows up as NaN. Index patterns: all -1, all one adapter, all distinct, runs; a slot whose scale
is 0 loads nothing. Ranks below 16 are padded by the wrapper; D = 96 steps in 32-wide blocks;
O = 40 makes the last output tile overlap its neighbour; T = 40 crosses SGMV row tiles.
"""

from __future__ import annotations

import numpy as np
import pytest
import jax.numpy as jnp

from helpers import INTERPRET, TOLERANCE, assert_rows_close
from pallas_kernels import lora_matmul as lm

BS = lm.BlockSizes


def _indices(pattern: str, G: int, S: int, rng) -> np.ndarray:
    if pattern == "none":
        return np.full(G, -1)
    if pattern == "one":
        return np.full(G, S - 1)
    if pattern == "distinct":
        return rng.permutation(S)[:G]
    return np.repeat(rng.integers(-1, S, size=-(-G // 3)), 3)[:G]  # runs of three


def _inputs(rng, G, T, D, R, O, S, dtype, pattern, zero_slot=None):
    x = rng.standard_normal((G, T, D))
    y = rng.standard_normal((G, T, O))
    a = rng.standard_normal((S, D, R)) / np.sqrt(D)
    b = rng.standard_normal((S, R, O)) / np.sqrt(R)
    scale = rng.uniform(0.5, 2.0, S)
    if zero_slot is not None:
        scale[zero_slot] = 0.0
    cast = lambda v: jnp.asarray(v, dtype)  # noqa: E731
    return (cast(y), cast(x), cast(a), cast(b), jnp.asarray(scale, jnp.float32),
            jnp.asarray(_indices(pattern, G, S, rng), jnp.int32))


CASES = [  # G, T, D, R, O, S, dtype, pattern, block sizes
    (6, 1, 96, 16, 40, 8, "float32", "distinct", None),  # BGMV, every token its own adapter
    (5, 1, 64, 4, 48, 3, "bfloat16", "runs", BS(16, 32, 16)),  # BGMV, rank padded, small tiles
    (4, 1, 64, 8, 32, 2, "float32", "none", None),  # BGMV, no adapter: y unchanged
    (3, 40, 96, 8, 40, 4, "float32", "distinct", BS(16, 32, 32)),  # SGMV, several row tiles
    (4, 16, 64, 16, 64, 2, "bfloat16", "one", None),  # SGMV, every segment one adapter
    (5, 7, 32, 4, 17, 3, "float32", "runs", None),  # SGMV, short ragged segments padded to a tile
]


@pytest.mark.parametrize("G, T, D, R, O, S, dtype, pattern, blocks", CASES)
def test_kernel_matches_reference(G, T, D, R, O, S, dtype, pattern, blocks, rng):
    args = _inputs(rng, G, T, D, R, O, S, dtype, pattern)
    out = lm.lora_matmul(*args, block_sizes=blocks, interpret=INTERPRET)
    assert out.shape == (G, T, O) and out.dtype == jnp.dtype(dtype)
    assert_rows_close(out, lm.reference(*args), TOLERANCE[dtype])
    if pattern == "none":
        np.testing.assert_array_equal(np.asarray(out), np.asarray(args[0]))


def test_zero_scale_slot_and_dead_segments_copy_y(rng):
    """Segments with index -1 or a slot of scale 0 come back as y, bit for bit; the others change."""
    y, x, a, b, scale, _ = _inputs(rng, 6, 1, 32, 16, 16, 3, "float32", "none", zero_slot=1)
    indices = jnp.asarray([-1, 1, 0, 2, 1, -1], jnp.int32)
    for T, args in ((1, (y, x)), (4, (jnp.repeat(y, 4, 1), jnp.repeat(x, 4, 1)))):
        out = np.asarray(lm.lora_matmul(*args, a, b, scale, indices, interpret=INTERPRET))
        dead = np.asarray([True, True, False, False, True, True])
        np.testing.assert_array_equal(out[dead], np.asarray(args[0])[dead])
        assert np.all(np.abs(out[~dead] - np.asarray(args[0])[~dead]).max(axis=-1) > 1e-3), T


def test_reference_matches_a_loop(rng):
    y, x, a, b, scale, indices = _inputs(rng, 7, 3, 32, 8, 24, 4, "float32", "runs")
    want = np.asarray(y, np.float64).copy()
    for g, i in enumerate(np.asarray(indices)):
        if i >= 0:
            want[g] += float(scale[i]) * np.asarray(x[g], np.float64) @ np.asarray(a[i]) @ np.asarray(b[i])
    assert_rows_close(lm.reference(y, x, a, b, scale, indices), want, TOLERANCE["float32"])


def test_empty_batch(rng):
    y, x, a, b, scale, indices = _inputs(rng, 2, 1, 32, 16, 16, 2, "float32", "one")
    assert lm.lora_matmul(y[:0], x[:0], a, b, scale, indices[:0], interpret=INTERPRET).shape == (0, 1, 16)


def test_bad_input_raises_value_error(rng):
    y, x, a, b, scale, indices = _inputs(rng, 2, 1, 32, 16, 16, 2, "float32", "one")
    with pytest.raises(ValueError, match=r"x must be \(G, T, D\)"):
        lm.lora_matmul(y, x[0], a, b, scale, indices)
    with pytest.raises(ValueError, match="a must be"):
        lm.lora_matmul(y, x, a[:, :16], b, scale, indices)
    with pytest.raises(ValueError, match="b must be"):
        lm.lora_matmul(y, x, a, b[:1], scale, indices)
    with pytest.raises(ValueError, match="y must be"):
        lm.lora_matmul(y[:, :, :8], x, a, b, scale, indices)
    with pytest.raises(ValueError, match="scale must be"):
        lm.lora_matmul(y, x, a, b, scale[:1], indices)
    with pytest.raises(ValueError, match="indices must be an integer"):
        lm.lora_matmul(y, x, a, b, scale, indices.astype(jnp.float32))
    with pytest.raises(ValueError, match="share one dtype"):
        lm.lora_matmul(y, x, a.astype(jnp.bfloat16), b, scale, indices)
    with pytest.raises(ValueError, match=r"D=24 must be a multiple of 16"):
        lm.lora_matmul(y, x[:, :, :24], a[:, :24], b, scale, indices)
    with pytest.raises(ValueError, match="O=8 must be >= 16"):
        lm.lora_matmul(y[:, :, :8], x, a, b[:, :, :8], scale, indices)
    with pytest.raises(ValueError, match="block_sizes.block_k=24"):
        lm.lora_matmul(y, x, a, b, scale, indices, block_sizes=BS(block_k=24))
