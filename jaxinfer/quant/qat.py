"""Quantisation-aware training (QAT): fine-tune a model with its projections fake-quantised in the
forward pass, so that the weights settle where the format rounds them well.

The forward pass is `model.forward` with a projection hook (`qat_projection`) that multiplies by
Q(w) instead of w, and rounds x to the scheme's activation format if it has one. Rounding has no
useful gradient, so the hook uses the straight-through estimator: ste(w) = w + stop_gradient(Q(w) - w)
is Q(w) going forward and has the identity's gradient going back. The optimiser (optax AdamW,
warm-up then cosine decay) updates the float weights; at the end the model is quantised by the
same scheme as post-training quantisation (PTQ) would, and the two are compared on held-out bits
per byte. A control run fine-tunes the same steps without fake-quant (`scheme=None`), so what QAT
gains over "PTQ of a model trained longer" is measured too.

Schemes: weight-only RTN (`int4-rtn-g32`, ...: Q is dequantize(rtn.quantize_weight)) and the
simulated formats (`nvfp4-sim`, `mxfp4-sim-a4`, ...). Schemes whose PTQ needs calibration (AWQ,
GPTQ, SmoothQuant, static FP8) have no fixed Q to train against and are refused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinfer import data
from jaxinfer.checkpoints.model import Model
from jaxinfer.models import decoder as model_lib
from jaxinfer.models import family as family_lib
from jaxinfer.models.act_formats import fake_quantize_activation
from jaxinfer.models.formats import dequantize
from jaxinfer.quant import rtn, simulated
from jaxinfer.quant.spec import QuantScheme, Scheme, SimScheme

TRAIN_BYTES = 8 << 20  # training text read for a fine-tune (the train split, which held-out text never enters)


def weight_quantizer(scheme: Scheme) -> Callable[[jax.Array], jax.Array]:
    """Q: a dense weight (..., K, N) -> the weight the scheme's PTQ serves, dequantised, same dtype."""
    if isinstance(scheme, QuantScheme) and scheme.method == "rtn":
        return lambda w: dequantize(rtn.quantize_weight(w, scheme.bits, scheme.group_size, symmetric=scheme.symmetric,
                                                        pad=scheme.pad, scale_dtype=scheme.scale_dtype), w.dtype)
    if isinstance(scheme, SimScheme):
        return lambda w: simulated.fake_weight(w, scheme)[0].astype(w.dtype)
    raise ValueError(f"QAT needs a scheme with a fixed rounding (RTN, or a simulated format), not {scheme.name}")


def ste(x: jax.Array, quantizer: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """quantizer(x) going forward, the identity's gradient going back."""
    return x + jax.lax.stop_gradient(quantizer(x) - x)


def qat_projection(scheme: Scheme) -> model_lib.Project:
    """A projection hook that fake-quantises each weight (and, for a simulated scheme with an
    activation format, its input) with the straight-through estimator."""
    quantize_w = weight_quantizer(scheme)
    act = scheme.act if isinstance(scheme, SimScheme) else None

    dense = model_lib.dense_projection()

    def project(name: str, x: jax.Array, lp: model_lib.Params, group_sizes: jax.Array | None = None) -> jax.Array:
        if group_sizes is not None:  # a per-expert weight: not a projection the scheme quantises
            return dense(name, x, lp, group_sizes)
        w = ste(lp[name], quantize_w)
        if act is not None:
            x = ste(x, lambda v: fake_quantize_activation(v, act))
        y = x @ w
        bias = lp.get(family_lib.bias_of(name))
        return y if bias is None else y + bias

    return project


def loss(params, cfg, batch, project=None) -> jax.Array:
    """Mean next-token cross-entropy (nats) of windows (B, T + 1) under the projection hook."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    B, T = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits = model_lib.forward(params, cfg, inputs, positions, project=project).logits  # (B, T, V)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def train_stream(model: Model, max_bytes: int = TRAIN_BYTES) -> np.ndarray:
    """The train split's documents in the model's tokens, each followed by its EOS: (n,) int32."""
    if model.tokenizer is None:
        raise ValueError("QAT reads training text through the model's tokenizer, and this model has none")
    eos = list(model.tokenizer.eos_ids[:1])
    return np.concatenate([np.asarray(model.tokenizer.encode(t) + eos, np.int32)
                           for t in data.texts("train", max_bytes)])


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    model: Model  # float weights (quantise them by the scheme to serve)
    losses: tuple[float, ...]  # training loss (nats) per step, under fake-quant
    seconds: float  # training time, compile included


def finetune(model: Model, scheme: Scheme | None, *, steps: int, batch_size: int = 8, seq_len: int = 256,
             lr: float = 3e-4, warmup: int = 10, seed: int = 0, stream: np.ndarray | None = None) -> FinetuneResult:
    """Fine-tune every parameter for `steps` AdamW steps on random windows of the train stream,
    with the projections fake-quantised by `scheme` (None: plain float fine-tuning, the control).
    Step k's batch depends only on (seed, k), so a QAT run and its control see the same text."""
    if steps < 1 or batch_size < 1 or seq_len < 1:
        raise ValueError(f"steps={steps}, batch_size={batch_size} and seq_len={seq_len} must be >= 1")
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} is over the model's context of {model.config.max_position_embeddings}")
    cfg = model.config
    project = None if scheme is None else qat_projection(scheme)
    stream = train_stream(model) if stream is None else stream
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps // 2), steps, end_value=0.1 * lr)
    optimizer = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.0)

    @jax.jit
    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, cfg, batch, project)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params = model.params
    opt_state = optimizer.init(params)
    losses = []
    t0 = time.perf_counter()
    for k in range(steps):
        rng = np.random.default_rng([seed, k])
        starts = rng.integers(0, stream.size - seq_len - 1, size=batch_size)
        batch = jnp.asarray(np.stack([stream[s : s + seq_len + 1] for s in starts]))
        params, opt_state, value = step(params, opt_state, batch)
        losses.append(float(value))
    return FinetuneResult(dataclasses.replace(model, params=params), tuple(losses), time.perf_counter() - t0)
