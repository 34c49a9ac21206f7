"""Quantisation-aware training: the straight-through estimator, the QAT forward pass equals the
served quantised model, a short fine-tune, and the experiment's input checks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import row_rel_error, run_main

import jaxinfer as ji
from experiments import qat as qat_experiment
from jaxinfer import quant
from jaxinfer.models import decoder as model_lib
from jaxinfer.quant import qat
from jaxinfer.quant.spec import scheme_from_name


def _model(seed=0):
    cfg = ji.ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=64, qkv_bias=True)
    return ji.Model(cfg, ji.init_params(cfg, jax.random.key(seed), std=0.2), ji.ByteTokenizer())


def test_ste_is_the_quantiser_forward_and_the_identity_backward(rng):
    w = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    quantize = qat.weight_quantizer(scheme_from_name("int4-rtn-g32"))
    np.testing.assert_array_equal(qat.ste(w, quantize), quantize(w))
    c = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    grad = jax.grad(lambda w: jnp.sum(qat.ste(w, quantize) * c))(w)
    np.testing.assert_array_equal(grad, c)
    assert row_rel_error(quantize(w), w) > 1e-3  # and it does round


@pytest.mark.parametrize("name", ["int4-rtn-g32", "nvfp4-sim-a4"])
def test_qat_forward_is_the_quantised_model(name):
    """The hook trains against what is served: its forward pass gives the quantised model's logits."""
    model = _model()
    tokens = jnp.asarray([list(b"def f(x): return x + 1")], jnp.int32)
    positions = jnp.arange(tokens.shape[1])[None]
    scheme = scheme_from_name(name)
    project = qat.qat_projection(scheme)
    hooked = jax.jit(lambda p: model_lib.forward(p, model.config, tokens, positions, project=project).logits)
    served = ji.forward_logits(quant.quantize_model(model, scheme), tokens)
    assert row_rel_error(hooked(model.params), served) <= 1e-5


def test_finetune_runs_and_refuses_calibrated_schemes():
    """Three steps under int4 fake-quant on a random stream: finite losses, every projection moved,
    and the same result again from the same seed."""
    model = _model(1)
    stream = np.random.default_rng(0).integers(0, 256, 4096).astype(np.int32)
    kw = dict(steps=3, batch_size=2, seq_len=32, lr=1e-2, stream=stream)
    scheme = scheme_from_name("int4-rtn-g32")
    a, b = qat.finetune(model, scheme, **kw), qat.finetune(model, scheme, **kw)
    assert len(a.losses) == 3 and np.isfinite(a.losses).all() and a.losses == b.losses
    for name in quant.LINEAR_WEIGHTS:
        assert row_rel_error(a.model.params["layers"][name], model.params["layers"][name]) > 1e-4, name
    with pytest.raises(ValueError, match="QAT needs a scheme with a fixed rounding"):
        qat.finetune(model, scheme_from_name("int4-gptq-g32"), **kw)
    with pytest.raises(ValueError, match="seq_len=65 is over the model's context"):
        qat.finetune(model, None, **{**kw, "seq_len": 65})
    with pytest.raises(ValueError, match="has none"):
        qat.finetune(dataclasses.replace(model, tokenizer=None), None, **{**kw, "stream": None})


def test_experiment_refuses_bad_schemes_before_any_work():
    with pytest.raises(ValueError, match="QAT needs a scheme with a fixed rounding"):
        run_main(qat_experiment, "--qat_schemes=w8a8-int8-smooth")
    with pytest.raises(ValueError, match="is not a quantisation scheme"):
        run_main(qat_experiment, "--qat_schemes=dense")


@pytest.mark.slow
def test_experiment_end_to_end(tmp_path):
    import json

    out = tmp_path / "qat.json"
    run_main(qat_experiment, "--qat_schemes=int4-rtn-g32", "--steps=2", "--batch_size=2", "--train_len=32",
             "--windows=2", "--seq_len=64", f"--out={out}")
    row = json.loads(out.read_text())["results"][0]
    assert row["scheme"] == "int4-rtn-g32" and row["ptq"] > 0 and row["qat"] > 0 and row["finetune_ptq"] > 0
