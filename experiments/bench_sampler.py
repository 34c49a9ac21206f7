"""Times the jitted sampler alone on a (rows x vocabulary) batch of logits, per kind of request.

  python -m jaxinfer.experiments.bench_sampler                     # 8 x 49152 (SmolLM2's vocabulary)
  python -m jaxinfer.experiments.bench_sampler --variants=greedy,temperature,top_p   # those every version has

Variants (every row alike): greedy (temperature 0), temperature (1.0), top_p (1.0, top_p 0.9),
penalties (1.0; repetition, presence and frequency over 512 tokens of history), logprobs (1.0, top 5).
Each is compiled once, then timed: the median over --runs of --calls back-to-back calls. Writes
a JSON to --out and prints a table; compile time is reported apart.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import jaxinfer as ji
from jaxinfer.sampling import sampler

from . import common
from .common import environment, median_call_time

FLAGS = flags.FLAGS
for _name in ("out", "runs", "calls"):
    flags.declare_key_flag(_name)
RUNS = 10
_ROWS = flags.DEFINE_integer("rows", 8, "Rows (sequences) in the batch.")
_VOCAB = flags.DEFINE_integer("vocab", 49152, "Vocabulary size.")
VARIANTS = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=1.0),
    "top_p": dict(temperature=1.0, top_p=0.9),
    "penalties": dict(temperature=1.0, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5),
    "logprobs": dict(temperature=1.0, logprobs=5),
}
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Variants to time, from {', '.join(VARIANTS)}.")
HISTORY = 512  # tokens of each row's history for the penalties


def batch(name: str, rows: int, vocab: int) -> sampler.SamplingBatch:
    params = [ji.SamplingParams(**VARIANTS[name])] * rows
    if name != "penalties":
        return sampler.SamplingBatch.from_params(params, list(range(rows)))
    rng = np.random.default_rng(0)
    history = [sampler.Row(p, i, rng.integers(0, vocab, HISTORY).tolist(), HISTORY // 2) for i, p in enumerate(params)]
    return sampler.SamplingBatch.from_rows(history, vocab=sampler.Vocab(vocab))


def main(argv):
    del argv
    unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--variants: {unknown} are not among {list(VARIANTS)}")
    for name, value in (("rows", _ROWS.value), ("vocab", _VOCAB.value), ("calls", FLAGS.calls)):
        if value < 1:
            raise ValueError(f"--{name}={value} must be >= 1")
    R, V = _ROWS.value, _VOCAB.value
    logits = jax.random.normal(jax.random.key(0), (R, V), jnp.float32) * 3
    step = jnp.arange(R, dtype=jnp.int32)
    draw = jax.jit(sampler.sample)
    rows = []
    for name in _VARIANTS.value:
        sp = jax.device_put(batch(name, R, V))
        t0 = time.perf_counter()
        jax.block_until_ready(draw(logits, sp, step))
        compile_s = time.perf_counter() - t0
        seconds = median_call_time(draw, [(logits, sp, step)], common.value_or("runs", RUNS), FLAGS.calls)
        rows.append(dict(variant=name, ms=seconds * 1e3, compile_s=compile_s))
    result = dict(environment=environment(__name__), rows=R, vocab=V, results=rows)
    if FLAGS.out:
        common.write_json(FLAGS.out, result)
    print(f"sampler on {jax.devices()[0].device_kind}: {R} x {V} logits, median of {common.value_or('runs', RUNS)} "
          f"runs of {FLAGS.calls} calls")
    print(f"{'variant':>12} {'ms/call':>10} {'compile s':>10}")
    for r in rows:
        print(f"{r['variant']:>12} {r['ms']:>10.3f} {r['compile_s']:>10.2f}")


if __name__ == "__main__":
    common.run(main)
