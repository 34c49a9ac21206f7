"""Train speculative-decoding heads (Medusa or EAGLE) on a frozen target's hidden states.

  python -m experiments.train_drafter --method=eagle                  # for the shipped tiny target
  python -m experiments.train_drafter --method=medusa --out_dir=jaxinfer/assets/tiny-medusa

Training windows are the corpus's training documents in the target's own tokens; the target runs
without gradients and gives the final-norm hidden state f_t of every position. Medusa head i learns
to predict token t + 1 + i from f_t (cross-entropy, head i weighted 0.8**i). EAGLE learns, from the
pairs (f_t, token t + 1), the next feature f_{t+1} (smooth L1) and the token after it through the
target's LM head (cross-entropy, weight 0.1), with uniform noise on its input features (EAGLE's
recipe for robustness to its own errors). AdamW with warm-up and cosine decay; orbax checkpoints
of the train state (a rerun resumes); the heads are written as a drafter directory
(jaxinfer/speculative/heads.py), then evaluated on held-out text: each head's (Medusa) or each
chained step's (EAGLE) greedy agreement with the target's own next tokens.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import flags
from tqdm.auto import tqdm

import jaxinfer as ji
from jaxinfer import attention, data
from jaxinfer import model as model_lib
from jaxinfer.speculative import heads as heads_lib

from . import common
from .train_tiny import batches, make_optimizer

FLAGS = flags.FLAGS
flags.DEFINE_enum("method", "eagle", ["medusa", "eagle"], "Which heads to train.")
flags.DEFINE_integer("heads", 5, "Medusa heads (the most tokens it can draft).")
flags.DEFINE_float("noise", 0.1, "EAGLE: half-width of the uniform noise added to its input features.")
for _name in ("model", "seq_len", "seed", *common.TRAIN_FLAGS):
    flags.declare_key_flag(_name)
STEPS = 400  # Axes: B windows, T positions, D hidden, H heads, V vocabulary.


def target_features(params, cfg, tokens: jax.Array) -> jax.Array:
    """The frozen target's final-norm hidden states (B, T, D) of token windows (B, T)."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return jax.lax.stop_gradient(model_lib.forward(params, cfg, tokens, positions).hidden)


def eagle_layer(target_params, cfg, heads, features, next_tokens):
    """The EAGLE layer over whole windows (causal attention, no cache): pairs (B, T) -> (B, T, D)."""
    cfg1 = heads_lib.eagle_layer_config(cfg)
    B, T = next_tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cos, sin = model_lib.rope_tables(cfg1, positions, features.dtype)

    def attend(q, k, v):
        return attention.attend(q, k, v, positions, positions, cfg1.layer_windows[0]), None

    x = heads_lib.eagle_inputs(target_params, heads, features, next_tokens)
    out, _ = model_lib.layer(cfg1, heads["layer"], x, cos, sin, attend, model_lib.dense_projection())
    return heads_lib.eagle_features(target_params, cfg, out)


def medusa_loss(heads, params, cfg, tokens, key):
    """Head i at position t predicts token t + 1 + i (i = 1..H)."""
    del key
    f = target_features(params, cfg, tokens)  # (B, T, D)
    logits = heads_lib.medusa_logits(params, cfg, heads, f)  # (B, T, H, V)
    T, H = tokens.shape[1], logits.shape[2]
    total = 0.0
    for i in range(1, H + 1):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, : T - 1 - i, i - 1], tokens[:, 1 + i :])
        total += 0.8 ** (i - 1) * ce.mean()
    return total


def eagle_loss(heads, params, cfg, tokens, key):
    """From pairs (f_t, x_{t+1}): regress f_{t+1}, classify x_{t+2}."""
    f = target_features(params, cfg, tokens)  # (B, T, D)
    noisy = f + FLAGS.noise * jax.random.uniform(key, f.shape, f.dtype, -1.0, 1.0)
    predicted = eagle_layer(params, cfg, heads, noisy[:, :-1], tokens[:, 1:])  # f^_{t+1}, (B, T-1, D)
    regression = optax.huber_loss(predicted, f[:, 1:]).mean()
    logits = model_lib.lm_head(params, cfg, predicted[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 2:]).mean()
    return regression + 0.1 * ce


def agreement(model, heads, method: str, windows: np.ndarray, k: int) -> list[float]:
    """Greedy agreement with the target's own next tokens on held-out windows: Medusa head i's guess
    for token t + 1 + i; EAGLE's j-th chained guess from (f_t, x_{t+1}), feeding back its own
    features and the target's tokens (teacher forcing on tokens, as a verify pass accepts them)."""
    tokens = jnp.asarray(windows)
    f = target_features(model.params, model.config, tokens)
    target_next = jnp.argmax(model_lib.lm_head(model.params, model.config, f), axis=-1)  # guess of token t + 1
    T = tokens.shape[1]
    out = []
    if method == "medusa":
        logits = heads_lib.medusa_logits(model.params, model.config, heads, f)
        for i in range(1, k + 1):
            out.append(float(jnp.mean(jnp.argmax(logits[:, : T - 1 - i, i - 1], -1) == target_next[:, i : T - 1])))
        return out
    feature, nxt = f[:, :-1], tokens[:, 1:]
    for j in range(k):  # step j guesses token t + 2 + j
        feature = eagle_layer(model.params, model.config, heads, feature, nxt)
        guess = jnp.argmax(model_lib.lm_head(model.params, model.config, feature), -1)
        n = T - 2 - j
        out.append(float(jnp.mean(guess[:, :n] == target_next[:, 1 + j : 1 + j + n])))
        feature, nxt = feature[:, :-1], nxt[:, 1:]
    return out


def train(model, method: str) -> tuple[dict, dict]:
    steps = FLAGS.steps or STEPS
    key = jax.random.key(FLAGS.seed)
    heads = (heads_lib.init_medusa(model.config, FLAGS.heads, key) if method == "medusa"
             else heads_lib.init_eagle(model.config, key))
    loss_fn = medusa_loss if method == "medusa" else eagle_loss
    optimizer = make_optimizer(steps, FLAGS.lr, FLAGS.warmup_steps)

    @jax.jit
    def train_step(state, params, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(state["heads"], params, model.config, batch, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["heads"])
        return {"heads": optax.apply_updates(state["heads"], updates), "opt_state": opt_state}, loss

    state = {"heads": heads, "opt_state": optimizer.init(heads)}
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(FLAGS.ckpt_dir or "/tmp/jaxinfer_train_drafter"), f"{model.name}-{method}"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, save_interval_steps=FLAGS.ckpt_every))
    start = manager.latest_step() or 0
    if start:
        state = manager.restore(start, args=ocp.args.StandardRestore(state))
        print(f"resumed from step {start}")
    stream = data.text_stream(model.tokenizer, "train").ids
    bar = tqdm(total=steps, initial=start, desc=f"train {method}", unit="step")
    t0, loss = time.perf_counter(), float("nan")
    for step, batch in batches(stream, FLAGS.batch_size, FLAGS.seq_len, FLAGS.seed, start):
        if step >= steps:
            break
        state, loss = train_step(state, model.params, jnp.asarray(batch), jax.random.fold_in(key, step))
        if (step + 1) % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
        bar.update()
        if (step + 1) % FLAGS.ckpt_every == 0 or step + 1 == steps:
            manager.save(step + 1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    bar.close()
    return state["heads"], {"steps": steps, "final_loss": float(loss), "train_seconds": time.perf_counter() - t0}


def main(argv):
    del argv
    model = ji.load_model(FLAGS.model)
    if model.tokenizer is None:
        raise ValueError(f"--model={FLAGS.model} has no tokenizer: the heads train on text in its tokens")
    common.check_out(FLAGS.out_dir)  # its parent must exist
    heads, record = train(model, FLAGS.method)
    windows = data.heldout_windows(model, min(FLAGS.seq_len, model.config.max_position_embeddings), FLAGS.eval_windows)
    k = FLAGS.heads if FLAGS.method == "medusa" else 5
    record.update(
        method=FLAGS.method, target=FLAGS.model, heldout_agreement=agreement(model, heads, FLAGS.method,
                                                                           windows.tokens, k),
        heldout_windows=FLAGS.eval_windows, seq_len=FLAGS.seq_len, batch=FLAGS.batch_size, lr=FLAGS.lr,
        seed=FLAGS.seed, device=jax.devices()[0].device_kind, jax=jax.__version__,
        date=datetime.date.today().isoformat(), command="python -m experiments.train_drafter " + " ".join(sys.argv[1:]))
    out = FLAGS.out_dir or f"runs/train_drafter/{model.name}-{FLAGS.method}"
    heads_lib.save_heads(out, FLAGS.method, heads, model.config, dtype=np.float16,
                         **{k: v for k, v in record.items() if k in ("steps", "target")})
    common.write_json(os.path.join(out, "training.json"), record)
    print(f"{FLAGS.method} heads for {FLAGS.model}: {record['steps']} steps, loss {record['final_loss']:.3f}, "
          f"held-out greedy agreement by step: " + ", ".join(f"{a:.3f}" for a in record["heldout_agreement"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    common.run(main)
