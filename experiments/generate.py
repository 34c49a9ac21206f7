"""The main job: complete a prompt with a model and report how fast it went.

  python -m experiments.generate --prompt="def fibonacci(n):"
  python -m experiments.generate --model=/path/to/hf/checkpoint --dtype=bfloat16 --temperature=0.7

Defaults to the shipped tiny byte-level model. The first (warm-up) run compiles; the timed run
after it reports time to first token, decode speed, and the compile time separately.
"""

from __future__ import annotations

import time

import jax
from absl import flags

import jaxinfer as ji
from jaxinfer.quant import quantize_by_name

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_string("prompt", "def fibonacci(n):", "Text to complete.")
flags.DEFINE_float("temperature", 0.7, "Sampling temperature; 0 is greedy.")
flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass, in (0, 1].")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 keeps all.")
flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p times the top probability.")
flags.DEFINE_string("weights", "dense", "Weight quantisation: dense, int8, int4-rtn-g128, int4-awq-g128, "
                    "int4-gptq-g128, ... (see jaxinfer/quant/spec.py); AWQ/GPTQ calibrate on held-out text.")
MAX_TOKENS = 128  # default --max_tokens
for _name in ("model", "seed", "dtype", "attention", "matmul", "max_tokens"):
    flags.declare_key_flag(_name)


def run() -> None:
    sampling = ji.SamplingParams(
        max_tokens=FLAGS.max_tokens or MAX_TOKENS, temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
        min_p=FLAGS.min_p, seed=FLAGS.seed,
    )
    if not FLAGS.prompt:
        raise ValueError("--prompt is empty")
    t0 = time.perf_counter()
    model = ji.load_model(FLAGS.model, dtype=FLAGS.dtype)
    model = quantize_by_name(model, FLAGS.weights)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ji.generate(model, [FLAGS.prompt], sampling, attn_impl=FLAGS.attention, matmul_impl=FLAGS.matmul)  # compiles prefill and decode
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = ji.generate(model, [FLAGS.prompt], sampling, attn_impl=FLAGS.attention, matmul_impl=FLAGS.matmul)[0]
    run_s = time.perf_counter() - t0

    m = out.metrics
    n = len(out.token_ids)
    decode_s = m["latency_s"] - m["ttft_s"]
    params = model.config.num_params()
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    print(FLAGS.prompt + out.text)
    print("-" * 72)
    weights = FLAGS.dtype if FLAGS.weights == "dense" else f"{FLAGS.weights} ({FLAGS.dtype} activations)"
    print(f"model      {model.name}: {params / 1e6:.2f}M params, {nbytes / 2**20:.1f} MiB in {weights}, "
          f"on {jax.devices()[0].device_kind}")
    print(f"prompt     {len(out.prompt_token_ids)} tokens; generated {n} tokens ({out.finish_reason})")
    print(f"TTFT       {m['ttft_s'] * 1e3:.1f} ms")
    if n > 1:
        print(f"decode     {(n - 1) / decode_s:.1f} tokens/s ({m['tpot_s'] * 1e3:.2f} ms per token)")
    print(f"time       load {load_s:.2f} s, compile {max(warm_s - run_s, 0.0):.2f} s, run {run_s:.2f} s")


def main(argv):
    del argv
    run()


def cli() -> None:
    """The `jaxinfer-generate` console script."""
    common.run(main)


if __name__ == "__main__":
    cli()
