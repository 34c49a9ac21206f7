"""Half-precision gradients on the CPU (training a drafter in bfloat16): matmul.dense's backward
and train_drafter.soft_cross_entropy give autodiff's gradients, with the input gradient's product
taking bfloat16 operands (autodiff's own multiplies the float32 cotangent in float32, at a third
of the speed on a CPU with AMX). XLA's CPU backend still takes the weight gradient's product, a
contraction over the rows, in float32 either way."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.train_drafter import soft_cross_entropy
from jaxinfer.models import matmul


def _dot_operand_types(fn, *args) -> list[tuple[str, ...]]:
    """The operand dtypes of every dot in fn's compiled program (names resolved in the dot's own
    computation)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    out = []
    for block in text.split("\n\n"):
        types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", block))
        for operands in re.findall(r" dot\(([^)]*)\)", block):
            out.append(tuple(types.get(name) for name in re.findall(r"%([\w.\-]+)", operands)))
    return out


def _data(dtype):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 24, 32)), rng.standard_normal((32, 40)) / 6
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(rng.standard_normal((2, 24, 40)), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_gradients_are_autodiffs(dtype):
    x, w, c = _data(dtype)
    ours = jax.grad(lambda x, w: jnp.sum(matmul.dense(x, w).astype(jnp.float32) * c), argnums=(0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum((x.astype(jnp.float32) @ w.astype(jnp.float32)).astype(dtype)
                                        .astype(jnp.float32) * c), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)


def _float32_products(fn, *args) -> int:
    return sum("f32" in types for types in _dot_operand_types(fn, *args))


def test_dense_backward_multiplies_in_bfloat16_on_the_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU path of matmul.dense")
    x, w, c = _data(jnp.bfloat16)
    grad = jax.grad(lambda x, w: jnp.sum(matmul.dense(x, w).astype(jnp.float32) * c), argnums=(0, 1))
    # autodiff of the same forward product multiplies both gradients in float32
    plain = jax.grad(lambda x, w: jnp.sum(matmul.dense_f32(x, w).astype(x.dtype).astype(jnp.float32) * c),
                     argnums=(0, 1))
    assert (_float32_products(grad, x, w), _float32_products(plain, x, w)) == (1, 2)


def _soft_ce_reference(x, w, q, weight):
    logits = jnp.einsum("RD,DW->RW", x, w, preferred_element_type=jnp.float32)
    return jnp.sum(weight * optax.softmax_cross_entropy(logits, q))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_soft_cross_entropy_is_autodiffs(dtype, tol):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((48, 32)), dtype)
    w = jnp.asarray(rng.standard_normal((32, 40)) / 4, dtype)
    q = jax.nn.softmax(jnp.asarray(rng.standard_normal((48, 40)) * 3, jnp.float32), -1)
    weight = jnp.asarray(rng.random(48) * (rng.random(48) > 0.3), jnp.float32)  # some rows left out
    ours = jax.value_and_grad(soft_cross_entropy, argnums=(0, 1))(x, w, q, weight)
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    ref = jax.value_and_grad(_soft_ce_reference, argnums=(0, 1))(x32, w32, q, weight)
    np.testing.assert_allclose(float(ours[0]), float(ref[0]), rtol=1e-5)
    for a, b in zip(ours[1], ref[1]):
        assert a.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), rtol=tol, atol=tol * np.abs(b).max())
    if jax.default_backend() == "cpu" and dtype == jnp.bfloat16:
        dots = _dot_operand_types(jax.grad(soft_cross_entropy, argnums=(0, 1)), x, w, q, weight)
        plain = jax.grad(_soft_ce_reference, argnums=(0, 1))
        assert len(dots) == 3 and sum("f32" in types for types in dots) == 1, dots  # the logits and x's in bf16
        assert _float32_products(plain, x, w, q, weight) == 2
