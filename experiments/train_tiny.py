"""Train the shipped tiny byte-level models: a target and a much smaller draft (same tokenizer).

  python -m jaxinfer.experiments.train_tiny                      # both models into jaxinfer/assets/
  python -m jaxinfer.experiments.train_tiny --which=draft --steps=200 --out_dir=/tmp/tiny

The corpus (Python's documentation and standard library source, see jaxinfer/data.py) is read at
training time. Training is deterministic given --seed on a given backend. Orbax checkpoints of the
train state go to --ckpt_dir, and a rerun resumes from the latest one. At the end each model is
exported in HF format (config.json, model.safetensors in float16, tokenizer.json) and evaluated on
held-out text; the figures go to <model>/training.json.
"""

from __future__ import annotations

import datetime
import json
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
from jaxinfer import data
from jaxinfer.checkpoints.weights import save_hf_checkpoint
from jaxinfer.models import decoder as model_lib

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_list("which", ["target", "draft"], "Models to train: target, draft.")
for _name in ("seq_len", "seed", *common.TRAIN_FLAGS):  # seq_len: also the models' context
    flags.declare_key_flag(_name)
flags.DEFINE_string("corpus", "", "A corpus .npz written by --save_corpus (default: read this Python's own text).")
flags.DEFINE_string("save_corpus", "", "Write the corpus to this .npz and exit (to train elsewhere on the same text).")

# Named sizes, chosen so that training both takes about 30 minutes on a 2-core CPU: the target
# ~2.1M parameters, the draft ~5x smaller. Byte vocab (256 + BOS/EOS). At this budget (2.6M
# tokens) depth does not pay: a 6-layer, 192-wide target ended behind the 2-layer draft
# (2.77 vs 2.45 held-out bits/byte), so the target is 3 layers, 256 wide.
MODELS = {
    "target": dict(
        name="tiny", steps=320,
        cfg=dict(hidden_size=256, intermediate_size=688, num_layers=3, num_heads=8, num_kv_heads=2, head_dim=32),
    ),
    "draft": dict(
        name="tiny-draft", steps=320,
        cfg=dict(hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32),
    ),
}


def model_config(which: str, seq_len: int) -> ji.ModelConfig:
    tok = ji.ByteTokenizer()
    dims = MODELS[which]["cfg"]
    return ji.ModelConfig(
        model_type="llama", vocab_size=tok.vocab_size, rms_norm_eps=1e-5, rope=ji.RopeConfig(theta=10000.0),
        max_position_embeddings=seq_len, tie_word_embeddings=True, layer_windows=(0,) * dims["num_layers"],
        bos_token_id=tok.bos_id, eos_token_ids=tok.eos_ids, **dims,
    )


def loss_fn(params, cfg, batch):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    B, T = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits = model_lib.forward(params, cfg, inputs, positions).logits  # (B, T, V)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_optimizer(steps: int, lr: float, warmup: int) -> optax.GradientTransformation:
    warmup = min(warmup, steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=0.1 * lr)

    def decay_mask(params):  # no weight decay on norms and biases
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not (str(path[-1].key).endswith("norm") or str(path[-1].key).startswith("b")), params
        )

    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_mask),
    )


def batches(stream: np.ndarray, batch: int, seq_len: int, seed: int, start_step: int):
    """Random windows of seq_len + 1 tokens; step k's batch depends only on (seed, k)."""
    step = start_step
    while True:
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, stream.size - seq_len - 1, size=batch)
        yield step, np.stack([stream[s : s + seq_len + 1] for s in starts])
        step += 1


def train(which: str, corpus: data.Corpus) -> dict:
    spec = MODELS[which]
    cfg = model_config(which, FLAGS.seq_len)
    steps = FLAGS.steps or spec["steps"]
    optimizer = make_optimizer(steps, FLAGS.lr, FLAGS.warmup_steps)

    @jax.jit
    def train_step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], cfg, batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    params = model_lib.init_params(cfg, jax.random.key(FLAGS.seed))
    state = {"params": params, "opt_state": optimizer.init(params)}
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(FLAGS.ckpt_dir or "/tmp/jaxinfer_train_tiny"), spec["name"]),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, save_interval_steps=FLAGS.ckpt_every),
    )
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        state = manager.restore(start, args=ocp.args.StandardRestore(state))
        print(f"{spec['name']}: resumed from step {start}")

    tokens_per_step = FLAGS.batch_size * FLAGS.seq_len
    bar = tqdm(total=steps, initial=start, desc=f"train {spec['name']}", unit="step")
    t0, loss = time.perf_counter(), float("nan")
    train_time = 0.0
    for step, batch in batches(corpus.train, FLAGS.batch_size, FLAGS.seq_len, FLAGS.seed, start):
        if step >= steps:
            break
        state, loss = train_step(state, jnp.asarray(batch))
        if (step + 1) % 10 == 0 or step + 1 == steps:
            loss = float(loss)
            now = time.perf_counter()
            train_time += now - t0
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{10 * tokens_per_step / (now - t0):,.0f}")
            t0 = now
        bar.update()
        if (step + 1) % FLAGS.ckpt_every == 0 or step + 1 == steps:
            manager.save(step + 1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    bar.close()

    out = os.path.join(FLAGS.out_dir or "runs/train_tiny", spec["name"])
    model = ji.Model(cfg, state["params"], ji.ByteTokenizer(), spec["name"])
    save_hf_checkpoint(model, out, dtype="float16")
    exported = ji.load_model(out)  # evaluate what ships: float16 weights, read back
    windows = data.heldout_windows(exported, FLAGS.seq_len, FLAGS.eval_windows)
    record = {
        "model": spec["name"],
        "params": cfg.num_params(),
        "steps": steps,
        "batch": FLAGS.batch_size,
        "seq_len": FLAGS.seq_len,
        "tokens_seen": steps * tokens_per_step,
        "lr": FLAGS.lr,
        "seed": FLAGS.seed,
        "final_train_loss_nats": float(loss),
        "heldout_bits_per_byte": data.bits_per_byte(exported, windows),
        "heldout_windows": FLAGS.eval_windows,
        "train_seconds_this_run": round(train_time, 1),
        "corpus": {"train_tokens": int(corpus.train.size), "heldout_tokens": int(corpus.heldout.size),
                   "docs": list(corpus.num_docs), "source": os.path.basename(FLAGS.corpus) or f"Python {sys.version.split()[0]}"},
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "command": common.environment(__name__)["command"],
    }
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {out}")
    return record


def main(argv):
    del argv
    unknown = set(FLAGS.which) - set(MODELS)
    if unknown:
        raise ValueError(f"--which: unknown model(s) {sorted(unknown)}; choose from {sorted(MODELS)}")
    corpus = data.read_corpus(FLAGS.corpus) if FLAGS.corpus else data.load_corpus()
    if FLAGS.save_corpus:
        data.save_corpus(corpus, FLAGS.save_corpus)
        print(f"wrote {FLAGS.save_corpus}")
        return
    print(f"corpus: {corpus.train.size:,} train tokens, {corpus.heldout.size:,} held-out tokens")
    records = [train(w, corpus) for w in FLAGS.which]
    print(f"\n{'model':<12}{'params':>12}{'steps':>8}{'held-out bits/byte':>20}")
    for r in records:
        print(f"{r['model']:<12}{r['params']:>12,}{r['steps']:>8}{r['heldout_bits_per_byte']:>20.3f}")


if __name__ == "__main__":
    common.run(main)
