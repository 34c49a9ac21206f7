"""Train speculative-decoding heads (Medusa, EAGLE or EAGLE-3) on a frozen target's hidden states.

  python -m jaxinfer.experiments.train_drafter --method=eagle                  # for the shipped tiny target
  python -m jaxinfer.experiments.train_drafter --method=medusa --out_dir=jaxinfer/assets/tiny-medusa
  python -m jaxinfer.experiments.train_drafter --model=smollm2-135m --dequantize --method=eagle --self_distill=256 \
      --draft_vocab=8192 --seq_len=128 --steps=300 --batch_size=8 --eval_windows=8
  python -m jaxinfer.experiments.train_drafter --method=eagle3 --out_dir=jaxinfer/assets/tiny-eagle3
  python -m jaxinfer.experiments.train_drafter --evaluate=jaxinfer/assets/tiny-eagle    # an existing drafter

Training windows are the corpus's training documents in the target's own tokens, or, with
--self_distill=N, the target's own continuations (--distill_temperature) of N training-text
prompts (self-distillation, as EAGLE and Medusa-2 train: the heads learn what the target itself
writes); the target runs without gradients and gives the final-norm hidden state f_t of every
position (computed once up front for self-distilled data, every step for the corpus). With
--draft_vocab=W the heads draft from the W tokens most frequent in the training data only (the
LM head's cost shrinks by V / W; heads.py), their cross-entropy taken over those W. Medusa head i learns
to predict token t + 1 + i from f_t (cross-entropy, head i weighted 0.8**i). EAGLE learns, from the
pairs (f_t, token t + 1), the next feature f_{t+1} (smooth L1) and the token after it through the
target's LM head (cross-entropy, weight 0.1), with uniform noise on its input features (EAGLE's
recipe for robustness to its own errors). EAGLE-3 (jaxinfer/speculative/eagle3.py) trains with
training-time test: the layer is unrolled over its own outputs for --ttt_steps steps
(eagle3.unroll), step i's soft cross-entropy against the target's distribution over the draft
vocabulary weighted 0.8**i, positions whose target (greedy) token lies outside the draft vocabulary
left out; it starts from the target's LM head columns and final norm, its fusion from the
highest fused layer (--aux_layers: which three layers' inputs it fuses; the default is the
reference's 2, L//2, L-3; self-distilled windows cached for other layers are reused). AdamW with
warm-up and cosine decay; orbax checkpoints of the train state (a rerun resumes); the heads are written as a drafter directory
(jaxinfer/speculative/heads.py), then evaluated on held-out text: each head's (Medusa) or each
chained step's (EAGLE) greedy agreement with the target's own next tokens, and the temperature
that calibrates the first guess's probabilities to that agreement (temperature scaling: the
DraftTree.temperature to rank a tree's candidates by for greedy requests).
"""

from __future__ import annotations

import datetime
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import flags
from tqdm.auto import tqdm

from jaxinfer import data
from jaxinfer.models import attention, matmul
from jaxinfer.models import decoder as model_lib
from jaxinfer.models.norms import rms_norm
from jaxinfer.speculative import eagle3
from jaxinfer.speculative import heads as heads_lib

from . import common
from ._distill import _target_inputs, distilled_data, target_features, target_inputs
from .train_tiny import batches, make_optimizer

FLAGS = flags.FLAGS
flags.DEFINE_enum("method", "eagle", ["medusa", "eagle", "eagle3"], "Which heads to train.")
flags.DEFINE_integer("ttt_steps", 7, "EAGLE-3: training-time-test steps (the layer unrolled over its own outputs).")
flags.DEFINE_integer("heads", 5, "Medusa heads (the most tokens it can draft).")
flags.DEFINE_float("noise", 0.1, "EAGLE: half-width of the uniform noise added to its input features.")
flags.DEFINE_integer("draft_vocab", 0, "Draft from the N tokens most frequent in the training data only (0: all).")
flags.DEFINE_enum("train_dtype", "float32", ["float32", "bfloat16"],
                 "EAGLE-3: the dtype of the drafter's products in training; its weights, optimizer state and "
                 "losses stay float32 (bfloat16: about 2x the steps per second on a CPU with AMX).")
flags.DEFINE_string("aux_layers", "", "EAGLE-3: the three target layers whose inputs the head fuses, e.g. 2,15,29 "
                    "('' = the reference default: 2, L//2 and L-3).")
flags.DEFINE_string("evaluate", "", "Evaluate this drafter directory on held-out text instead of training one.")
for _name in ("model", "dequantize", "seq_len", "seed", "self_distill", "distill_prompt_len", "distill_temperature",
              *common.TRAIN_FLAGS):
    flags.declare_key_flag(_name)
STEPS = 400  # Axes: B windows, T positions, D hidden, H heads, V vocabulary, W draft vocabulary.
TEMPERATURES = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2)  # searched by `calibration`


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


def cross_entropy(params, cfg, h, labels, vocab):
    """Mean cross-entropy of hidden states h (..., D) through the LM head against labels (...,);
    with a draft vocabulary (W,), over its columns only, labels outside it left out."""
    if vocab is None:
        return optax.softmax_cross_entropy_with_integer_labels(model_lib.lm_head(params, cfg, h), labels).mean()
    head = model_lib.head_weight(params, cfg)
    logits = jnp.einsum("...D,DW->...W", h, head[:, vocab], preferred_element_type=jnp.float32)
    index = jnp.full((cfg.vocab_size,), -1, jnp.int32).at[vocab].set(jnp.arange(vocab.size, dtype=jnp.int32))[labels]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(index, 0))
    return jnp.sum(jnp.where(index >= 0, ce, 0.0)) / jnp.maximum(jnp.sum(index >= 0), 1)


def medusa_loss(heads, params, cfg, tokens, f, vocab, key):
    """Head i at position t predicts token t + 1 + i (i = 1..H)."""
    del key
    f = target_features(params, cfg, tokens) if f is None else f  # (B, T, D)
    h = heads_lib.medusa_hidden(heads, f)  # (B, T, H, D)
    T, H = tokens.shape[1], h.shape[2]
    total = 0.0
    for i in range(1, H + 1):
        total += 0.8 ** (i - 1) * cross_entropy(params, cfg, h[:, : T - 1 - i, i - 1], tokens[:, 1 + i :], vocab)
    return total


def eagle_loss(heads, params, cfg, tokens, f, vocab, key):
    """From pairs (f_t, x_{t+1}): regress f_{t+1}, classify x_{t+2}."""
    f = target_features(params, cfg, tokens) if f is None else f  # (B, T, D)
    noisy = f + FLAGS.noise * jax.random.uniform(key, f.shape, f.dtype, -1.0, 1.0)
    predicted = eagle_layer(params, cfg, heads, noisy[:, :-1], tokens[:, 1:])  # f^_{t+1}, (B, T-1, D)
    regression = optax.huber_loss(predicted, f[:, 1:]).mean()
    return regression + 0.1 * cross_entropy(params, cfg, predicted[:, :-1], tokens[:, 2:], vocab)


def eagle3_loss(params, target_params, cfg, tokens, f, aux, target_next, vocab, head, steps):
    """Training-time test (module docstring): sum over steps j of 0.8**j times the soft
    cross-entropy of step j's guesses (row t: token t + j + 2) against the target's distribution at
    position t + j + 1 over the draft vocabulary (W,); positions whose target token is outside it
    left out. Step j's rows are shifted to the positions they guess at, so every step reads the
    same (B * T, W) targets."""
    target_logits = jnp.einsum("BTD,DW->BTW", f, model_lib.head_weight(target_params, cfg)[:, vocab], preferred_element_type=jnp.float32)
    B, T, W = target_logits.shape
    p = jax.nn.softmax(target_logits, axis=-1).reshape(B * T, W)
    inside = jnp.zeros((cfg.vocab_size,), jnp.bool_).at[vocab].set(True)[target_next]  # (B, T)
    total = 0.0
    for j, out in enumerate(eagle3.unroll(head, target_params, params, aux, tokens, steps, outputs=True)):
        normed = rms_norm(jnp.pad(out, ((0, 0), (1 + j, 0), (0, 0))), params["norm"], cfg.rms_norm_eps)
        mask = inside & (jnp.arange(T) >= 1 + j)  # (B, T): the positions step j guesses at
        weight = 0.8**j * mask / jnp.maximum(jnp.sum(mask), 1)
        total += soft_cross_entropy(normed.reshape(B * T, -1), params["lm_head"], p, weight.reshape(-1))
    return total


@jax.custom_vjp
def soft_cross_entropy(x, w, q, weight):
    """sum over rows r of weight[r] * H(q[r], softmax(x[r] @ w)): x (R, D), w (D, W), q (R, W)
    float32 target distributions, weight (R,) float32. The logits and the input gradient are
    products in x's dtype with float32 accumulation (bfloat16: about 3x float32 on a CPU with AMX),
    where autodiff's own backward would multiply the float32 logit gradient in float32."""
    return _soft_ce_fwd(x, w, q, weight)[0]


def _soft_ce_fwd(x, w, q, weight):
    logp = jax.nn.log_softmax(matmul.dense_f32(x, w), axis=-1)
    return jnp.sum(weight * -jnp.sum(q * logp, axis=-1)), (x, w, q, weight, logp)


def _soft_ce_bwd(residuals, g):
    x, w, q, weight, logp = residuals
    d_logits = (g * weight)[:, None] * (jnp.exp(logp) * jnp.sum(q, -1, keepdims=True) - q)
    return *matmul.product_grads(x, w, d_logits), jnp.zeros_like(q), jnp.zeros_like(weight)


soft_cross_entropy.defvjp(_soft_ce_fwd, _soft_ce_bwd)


def eagle3_agreement(model, head, params, aux_layers, windows: np.ndarray, k: int) -> tuple[list[float], float]:
    """Each chained step's greedy agreement with the target's own next tokens on held-out windows
    (teacher-forced on tokens, as a verify pass accepts them), and the calibration temperature of
    the first guess over the draft vocabulary (positions whose target token is in it)."""
    vocab = np.asarray(params["draft_vocab"]) if "draft_vocab" in params else np.arange(model.config.vocab_size)
    index = np.full(model.config.vocab_size, -1, np.int64)
    index[vocab] = np.arange(vocab.size)
    tokens = jnp.asarray(windows)
    _, aux, target_next = _target_inputs(model.params, model.config, tokens, aux_layers)
    steps = eagle3.unroll(head, model.params, params, aux, tokens, k)
    out, target_next = [], np.asarray(target_next)
    for j, logits in enumerate(steps):
        guess = vocab[np.asarray(jnp.argmax(logits, -1))]  # (B, T - 1 - j) target ids
        out.append(float(np.mean(guess == target_next[:, 1 + j :])))
    want = index[target_next[:, 1:]]  # (B, T - 1) the target's next token as a draft id (-1: outside)
    first = np.asarray(steps[0])[want >= 0]
    return out, calibration(jnp.asarray(first), jnp.asarray(want[want >= 0]))


def agreement(model, heads, method: str, windows: np.ndarray, k: int) -> tuple[list[float], float]:
    """Greedy agreement with the target's own next tokens on held-out windows: Medusa head i's guess
    for token t + 1 + i; EAGLE's j-th chained guess from (f_t, x_{t+1}), feeding back its own
    features and the target's tokens (teacher forcing on tokens, as a verify pass accepts them).
    Also the calibration temperature of the first guess (`calibration`)."""
    heads = heads_lib.with_draft_head(model.params, model.config, heads)
    logits_of = lambda h: heads_lib.draft_logits(model.params, model.config, heads, h)  # noqa: E731
    tokens = jnp.asarray(windows)
    f = jnp.concatenate([target_features(model.params, model.config, w[None]) for w in tokens])  # (B, T, D)
    target_next = jnp.argmax(model_lib.lm_head(model.params, model.config, f), axis=-1)  # guess of token t + 1
    T = tokens.shape[1]
    out = []
    if method == "medusa":
        h = heads_lib.medusa_hidden(heads, f)
        for i in range(1, k + 1):
            out.append(float(jnp.mean(jnp.argmax(logits_of(h[:, : T - 1 - i, i - 1]), -1) == target_next[:, i : T - 1])))
        return out, calibration(logits_of(h[:, : T - 2, 0]), target_next[:, 1 : T - 1])
    feature, nxt = f[:, :-1], tokens[:, 1:]
    for j in range(k):  # step j guesses token t + 2 + j
        feature = eagle_layer(model.params, model.config, heads, feature, nxt)
        n = T - 2 - j
        if j == 0:
            temperature = calibration(logits_of(feature[:, :n]), target_next[:, 1 : 1 + n])
        guess = jnp.argmax(logits_of(feature), -1)
        out.append(float(jnp.mean(guess[:, :n] == target_next[:, 1 + j : 1 + j + n])))
        feature, nxt = feature[:, :-1], nxt[:, 1:]
    return out, temperature


def calibration(logits: jax.Array, target_next: jax.Array) -> float:
    """Temperature scaling (Guo et al. 2017) of draft logits (..., V) to the target's greedy choices
    (...,): the temperature in TEMPERATURES of least negative log-likelihood."""
    nll = [float(-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits / t, -1), target_next[..., None], -1)))
           for t in TEMPERATURES]
    return TEMPERATURES[int(np.argmin(nll))]


def draft_vocabulary(tokens: np.ndarray, size: int, vocab_size: int) -> np.ndarray:
    """The `size` tokens most frequent in the training windows, in id order."""
    counts = np.bincount(tokens.reshape(-1), minlength=vocab_size)
    return np.sort(np.argsort(-counts, kind="stable")[:size]).astype(np.int32)


def init_eagle3(model, vocab: np.ndarray | None, key: jax.Array) -> tuple[eagle3.Eagle3Head, dict]:
    """A new EAGLE-3 head for the target: random layer, its head the target's LM head columns of the
    draft vocabulary and its norm the target's final norm, its fusion passing the highest fused
    layer through (plus noise): at step 0 it starts as the target's logit lens at that layer."""
    cfg = model.config
    D = cfg.hidden_size
    head = eagle3.Eagle3Head(eagle3.layer_config(cfg), D)
    params = eagle3.init_params(head.cfg1, D, key, vocab)
    target_head = model_lib.head_weight(model.params, cfg)
    params["lm_head"] = jnp.asarray(target_head if vocab is None else target_head[:, vocab], jnp.float32)
    params["norm"] = jnp.asarray(model.params["final_norm"], jnp.float32)
    params["fc"] = params["fc"].at[2 * D :].add(jnp.eye(D))
    return head, params


def parse_aux_layers(text: str) -> tuple[int, ...]:
    """--aux_layers: () for the default, else three distinct layers >= 0 in increasing order."""
    if not text:
        return ()
    try:
        layers = tuple(sorted(int(v) for v in text.split(",")))
    except ValueError:
        raise ValueError(f"--aux_layers={text!r} must be three layer numbers separated by commas") from None
    if len(layers) != 3 or len(set(layers)) != 3 or layers[0] < 0:
        raise ValueError(f"--aux_layers={text!r} must be three distinct layer numbers >= 0")
    return layers


def chosen_aux_layers(num_layers: int) -> tuple[int, ...]:
    """The layers the new EAGLE-3 head fuses: --aux_layers, or eagle3.aux_layers_for's default."""
    layers = parse_aux_layers(FLAGS.aux_layers)
    if layers and layers[-1] >= num_layers:
        raise ValueError(f"--aux_layers={FLAGS.aux_layers}: layer {layers[-1]} is past the target's {num_layers} "
                         f"layers (0..{num_layers - 1})")
    return layers or eagle3.aux_layers_for(num_layers)


def train(model, method: str) -> tuple[dict, dict]:
    steps = FLAGS.steps or STEPS
    key = jax.random.key(FLAGS.seed)
    aux_layers = chosen_aux_layers(model.config.num_layers) if method == "eagle3" else ()
    record: dict = {"aux_layers": list(aux_layers)} if aux_layers else {}
    ckpt_dir = os.path.abspath(FLAGS.ckpt_dir or "/tmp/jaxinfer_train_drafter")
    if FLAGS.self_distill:
        distilled = distilled_data(model, ckpt_dir, aux_layers)
        windows = distilled["tokens"]
        record.update(self_distill=FLAGS.self_distill, distill_temperature=FLAGS.distill_temperature,
                      distill_prompt_len=FLAGS.distill_prompt_len, distill_tokens=int(windows.size),
                      distill_seconds=float(distilled["generate_seconds"]),
                      distill_tokens_per_second=float((windows.size - windows.shape[0] * FLAGS.distill_prompt_len)
                                                      / distilled["generate_seconds"]))
        names = ("features", "aux", "target_next") if aux_layers else ("features",)
        source = ((step, windows[i], tuple(distilled[n][i] for n in names))
                  for step, i in _rows(FLAGS.self_distill, FLAGS.batch_size))
    else:
        stream = data.text_stream(model.tokenizer, "train").ids
        windows = stream[: min(stream.size, 1 << 22)]  # counts for the draft vocabulary
        source = ((step, batch, None) for step, batch in batches(stream, FLAGS.batch_size, FLAGS.seq_len, FLAGS.seed, 0))
    vocab = None
    if FLAGS.draft_vocab:
        vocab = draft_vocabulary(windows, FLAGS.draft_vocab, model.config.vocab_size)
        counts = np.bincount(np.asarray(windows).reshape(-1), minlength=model.config.vocab_size)
        record.update(draft_vocab=int(vocab.size), draft_vocab_coverage=float(counts[vocab].sum() / counts.sum()))

    vocab_array = None if vocab is None else jnp.asarray(vocab)
    if method == "eagle3":
        head, heads = init_eagle3(model, vocab, key)
        in_vocab = jnp.arange(model.config.vocab_size, dtype=jnp.int32) if vocab is None else vocab_array

        compute = jnp.dtype(FLAGS.train_dtype)

        def loss_fn(h, params, batch, target, key):
            del key
            f, aux, nxt = target_inputs(params, model.config, batch, aux_layers) if target is None else target
            h, aux = jax.tree.map(lambda x: x.astype(compute), (h, aux))  # mixed precision: float32 master weights
            return eagle3_loss(h, params, model.config, batch, f, aux, nxt, in_vocab, head, FLAGS.ttt_steps)
    else:
        head = None
        heads = (heads_lib.init_medusa(model.config, FLAGS.heads, key) if method == "medusa"
                 else heads_lib.init_eagle(model.config, key))
        base = medusa_loss if method == "medusa" else eagle_loss

        def loss_fn(h, params, batch, target, key):
            return base(h, params, model.config, batch, None if target is None else target[0], vocab_array, key)
    optimizer = make_optimizer(steps, FLAGS.lr, FLAGS.warmup_steps)

    @jax.jit
    def train_step(state, params, batch, target, key):
        loss, grads = jax.value_and_grad(loss_fn)(state["heads"], params, batch, target, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["heads"])
        return {"heads": optax.apply_updates(state["heads"], updates), "opt_state": opt_state}, loss

    trained = {k: v for k, v in heads.items() if k != "draft_vocab"}  # the vocabulary is data, not trained
    state = {"heads": trained, "opt_state": optimizer.init(trained)}
    manager = ocp.CheckpointManager(
        os.path.join(ckpt_dir, f"{model.name}-{method}" + (
            "" if aux_layers in ((), eagle3.aux_layers_for(model.config.num_layers))
            else f"-aux{'_'.join(map(str, aux_layers))}")),  # a head fusing other layers trains apart
        options=ocp.CheckpointManagerOptions(max_to_keep=1, save_interval_steps=FLAGS.ckpt_every))
    start = manager.latest_step() or 0
    if start:
        state = manager.restore(start, args=ocp.args.StandardRestore(state))
        print(f"resumed from step {start}")
    bar = tqdm(total=steps, initial=start, desc=f"train {method}", unit="step")
    t0, loss = time.perf_counter(), float("nan")
    for step, batch, target in source:
        if step >= steps:
            break
        if step < start:
            continue
        target = None if target is None else tuple(jnp.asarray(x, jnp.float32 if x.dtype == np.float16 else x.dtype)
                                                   for x in target)
        state, loss = train_step(state, model.params, jnp.asarray(batch), target, jax.random.fold_in(key, step))
        if (step + 1) % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
        bar.update()
        if (step + 1) % FLAGS.ckpt_every == 0 or step + 1 == steps:
            manager.save(step + 1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    bar.close()
    heads = state["heads"] if vocab is None else {**state["heads"], "draft_vocab": jnp.asarray(vocab)}
    record.update(steps=steps, final_loss=float(loss), train_seconds=time.perf_counter() - t0)
    return (heads, head), record


def _rows(num: int, batch: int):
    """(step, rows) of a fixed training set: step k's rows depend only on (seed, k)."""
    step = 0
    while True:
        yield step, np.random.default_rng([FLAGS.seed, step]).integers(0, num, size=batch)
        step += 1


def evaluate(model, path: str) -> None:
    """Held-out agreement and calibration of an existing drafter directory, printed."""
    windows = data.heldout_windows(model, min(FLAGS.seq_len, model.config.max_position_embeddings), FLAGS.eval_windows)
    if os.path.exists(os.path.join(path, eagle3.CONFIG_FILE)):
        method = "eagle3"
        head, params, aux_layers = eagle3.load(path, model.config, model.dtype)
        by_step, temperature = eagle3_agreement(model, head, params, tuple(sorted(aux_layers)), windows.tokens,
                                                FLAGS.ttt_steps)
    else:
        with open(os.path.join(path, heads_lib.CONFIG_FILE)) as f:
            method = json.load(f).get("method")
        heads, _ = heads_lib.load_heads(path, method, model.config, model.dtype)
        k = int(heads["w"].shape[0]) if method == "medusa" else 5
        by_step, temperature = agreement(model, heads, method, windows.tokens, k)
    print(f"{path} ({method}) on {FLAGS.eval_windows} held-out windows of {FLAGS.seq_len}: greedy agreement by step "
          + ", ".join(f"{a:.3f}" for a in by_step) + f"; calibration temperature {temperature}")


def main(argv):
    del argv
    if FLAGS.self_distill < 0 or FLAGS.draft_vocab < 0:
        raise ValueError("--self_distill and --draft_vocab must be >= 0")
    if FLAGS.train_dtype != "float32" and FLAGS.method != "eagle3":
        raise ValueError(f"--train_dtype={FLAGS.train_dtype} applies to --method=eagle3 only, not {FLAGS.method!r}")
    if FLAGS.aux_layers and FLAGS.method != "eagle3":
        raise ValueError(f"--aux_layers applies to --method=eagle3 only, not {FLAGS.method!r}")
    parse_aux_layers(FLAGS.aux_layers)
    model = common.load_bench_model(FLAGS.model, "float32")  # --dequantize: a packed checkpoint's float32 twin
    if model.tokenizer is None:
        raise ValueError(f"--model={FLAGS.model} has no tokenizer: the heads train on text in its tokens")
    if FLAGS.evaluate:
        return evaluate(model, FLAGS.evaluate)
    (heads, head), record = train(model, FLAGS.method)
    windows = data.heldout_windows(model, min(FLAGS.seq_len, model.config.max_position_embeddings), FLAGS.eval_windows)
    if FLAGS.method == "eagle3":
        by_step, temperature = eagle3_agreement(model, head, heads, tuple(record["aux_layers"]), windows.tokens,
                                                FLAGS.ttt_steps)
    else:
        k = FLAGS.heads if FLAGS.method == "medusa" else 5
        by_step, temperature = agreement(model, heads, FLAGS.method, windows.tokens, k)
    record.update(
        method=FLAGS.method, target=FLAGS.model, heldout_agreement=by_step, calibration_temperature=temperature,
        heldout_windows=FLAGS.eval_windows, seq_len=FLAGS.seq_len, batch=FLAGS.batch_size, lr=FLAGS.lr,
        train_dtype=FLAGS.train_dtype,
        seed=FLAGS.seed, device=jax.devices()[0].device_kind, jax=jax.__version__,
        date=datetime.date.today().isoformat(), command=common.environment(__name__)["command"])
    out = FLAGS.out_dir or f"runs/train_drafter/{model.name}-{FLAGS.method}"
    info = {k: v for k, v in record.items() if k in ("steps", "target")}
    if FLAGS.method == "eagle3":  # the format SGLang and vLLM load
        eagle3.save(out, head, heads, tuple(record["aux_layers"]), model.config, dtype=ml_dtypes.bfloat16, **info)
    else:
        heads_lib.save_heads(out, FLAGS.method, heads, model.config, dtype=np.float16, **info)
    common.write_json(os.path.join(out, "training.json"), record)
    print(f"{FLAGS.method} heads for {FLAGS.model}: {record['steps']} steps, loss {record['final_loss']:.3f}, "
          f"held-out greedy agreement by step: " + ", ".join(f"{a:.3f}" for a in record["heldout_agreement"])
          + f"; calibration temperature {temperature}")
    print(f"wrote {out}")


if __name__ == "__main__":
    common.run(main)
