"""The main job: complete a prompt with a model and report how fast it went.

  python -m jaxinfer.experiments.generate --prompt="def fibonacci(n):"
  python -m jaxinfer.experiments.generate --model=smollm2-135m --chat --prompt="What is the capital of France?"
  python -m jaxinfer.experiments.generate --model=/path/to/hf/checkpoint --dtype=bfloat16 --prompts_file=prompts.txt
  python -m jaxinfer.experiments.generate --stream --prompt="import os"

Defaults to the shipped tiny byte-level model, served by the paged engine (`--baseline` for the
contiguous-cache baseline loop). The first (warm-up) run compiles; the timed run after it reports
time to first token, decode speed, and the compile time separately. With `--stream` the timed run
prints the completion as it is generated, through `Engine.stream` (one prompt).
"""

from __future__ import annotations

import dataclasses
import time

import jax
from absl import flags

import jaxinfer as ji
from jaxinfer import sharding
from jaxinfer.models.formats import QuantizedWeight
from jaxinfer.quant import dequantize_params, quantize_by_name
from jaxinfer.quant.spec import scheme_from_name

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_string("prompt", "def fibonacci(n):", "Text to complete.")
flags.DEFINE_string("prompts_file", "", "A file of prompts, one per line, served as one batch (instead of --prompt).")
flags.DEFINE_bool("chat", False, "Send each prompt as a user message through the model's chat template; generation "
                  "stops at the template's end-of-turn token.")
flags.DEFINE_float("temperature", 0.7, "Sampling temperature; 0 is greedy.")
flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass, in (0, 1].")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 keeps all.")
flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p times the top probability.")
flags.DEFINE_string("weights", "dense", "Weight quantisation: dense, int8, int4-rtn-g128, int4-awq-g128, "
                    "int4-gptq-g128, w8a8-int8-smooth, w8a8-head (the LM head in int8 too), w8a8-fp8, nvfp4-sim, ... (see "
                    "jaxinfer/quant/spec.py); "
                    "AWQ/GPTQ/SmoothQuant/static FP8 calibrate on held-out text. A packed checkpoint is dequantised "
                    "first (--dequantize implied).")
flags.DEFINE_bool("baseline", False, "Serve with the contiguous-cache baseline loop (ji.generate), not the engine.")
flags.DEFINE_bool("stream", False, "Print the completion as it is generated (Engine.stream): one prompt, the engine "
                  "only (not --baseline).")
MAX_TOKENS = 128  # default --max_tokens
for _name in ("model", "seed", "dtype", "dequantize", "max_tokens", "out", *common.ENGINE_FLAGS, *common.SPEC_FLAGS):
    flags.declare_key_flag(_name)


def read_prompts() -> list[str]:
    """The prompts' text: --prompt, or the lines of --prompts_file (checked before the model loads)."""
    if FLAGS.prompts_file:
        with open(FLAGS.prompts_file) as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
        if not texts:
            raise ValueError(f"--prompts_file={FLAGS.prompts_file} has no prompts")
        return texts
    if not FLAGS.prompt:
        raise ValueError("--prompt is empty")
    return [FLAGS.prompt]


def prompts_of(model, texts: list[str]) -> list:
    """The prompts to serve: the text itself, or through the model's chat template with --chat."""
    if not FLAGS.chat:
        return texts
    if model.tokenizer is None or model.tokenizer.chat_template is None:
        raise ValueError(f"--chat needs a model with a chat template; {model.name} has none")
    # The template writes its own special tokens: encode it without adding BOS again.
    return [model.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                tokenize=True) for t in texts]


def serve(model, prompts, sampling, stream: bool = False) -> list[ji.RequestOutput]:
    """Serve the prompts; with stream, the one prompt through Engine.stream, printing its text as it comes."""
    if FLAGS.baseline:
        return ji.generate(model, prompts, sampling, attn_impl=FLAGS.attention, matmul_impl=FLAGS.matmul)
    engine = ji.Engine(model, common.engine_config())
    if not stream:
        return engine.generate(prompts, sampling)
    shown = 0  # characters (with no tokenizer: token ids) printed so far
    for out in engine.stream(prompts[0], sampling):
        pieces = out.text if out.text is not None else [f" {t}" for t in out.token_ids]
        print("".join(pieces[shown:]), end="", flush=True)
        shown = len(pieces)
    print()
    return [out]


def run() -> None:
    sampling = ji.SamplingParams(
        max_tokens=common.value_or("max_tokens", MAX_TOKENS), temperature=FLAGS.temperature, top_p=FLAGS.top_p,
        top_k=FLAGS.top_k, min_p=FLAGS.min_p, seed=FLAGS.seed,
    )
    if FLAGS.stream and FLAGS.baseline:
        raise ValueError("--stream serves through the engine (Engine.stream); it does not go with --baseline")
    try:
        scheme_from_name(FLAGS.weights)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    texts = read_prompts()
    if FLAGS.stream and len(texts) > 1:
        raise ValueError(f"--stream serves one prompt; --prompts_file={FLAGS.prompts_file} has {len(texts)}")
    t0 = time.perf_counter()
    transform = FLAGS.dequantize or FLAGS.weights != "dense"
    # With --tp, a checkpoint is placed as it loads (no device holds it whole), once for every engine.
    model = ji.load_model(FLAGS.model, dtype=FLAGS.dtype, mesh=None if transform else common.mesh())
    if transform:  # --weights re-quantises a packed checkpoint from its dequantised weights
        model = dataclasses.replace(model, params=dequantize_params(model.params))
    model = quantize_by_name(model, FLAGS.weights)
    if transform and common.mesh() is not None:
        model = sharding.shard_model(model, common.mesh())
    load_s = time.perf_counter() - t0
    prompts = prompts_of(model, texts)

    t0 = time.perf_counter()
    serve(model, prompts, sampling)  # compiles what the run uses
    warm_s = time.perf_counter() - t0
    if FLAGS.stream:
        print(f"user: {texts[0]}\nassistant: " if FLAGS.chat else texts[0], end="", flush=True)
    t0 = time.perf_counter()
    outs = serve(model, prompts, sampling, stream=FLAGS.stream)
    run_s = time.perf_counter() - t0

    for text, out in zip(texts, [] if FLAGS.stream else outs):
        print(f"user: {text}\nassistant: {out.text}" if FLAGS.chat else text + (out.text or ""))
    print("-" * 72)
    out = outs[0]
    m = out.metrics
    n = len(out.token_ids)
    generated = sum(len(o.token_ids) for o in outs)
    params = sharding.logical_config(model).num_params()
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    packed = [w for w in jax.tree.leaves(model.params["layers"], is_leaf=lambda x: isinstance(x, QuantizedWeight))
              if isinstance(w, QuantizedWeight)]
    weights = (f"{FLAGS.weights} ({FLAGS.dtype} activations)" if FLAGS.weights != "dense" else
               f"packed {packed[0].bits}-bit projections, {FLAGS.dtype} otherwise" if packed else FLAGS.dtype)
    print(f"model      {model.name}: {params / 1e6:.2f}M params, {nbytes / 2**20:.1f} MiB ({weights}), "
          f"on {jax.devices()[0].device_kind}, {'baseline loop' if FLAGS.baseline else 'paged engine'}")
    print(f"prompt     {len(out.prompt_token_ids)} tokens; generated {n} tokens ({out.finish_reason})"
          + (f"; {len(outs)} prompts, {generated} tokens in all" if len(outs) > 1 else ""))
    print(f"TTFT       {m['ttft_s'] * 1e3:.1f} ms")
    if n > 1:
        print(f"decode     {(n - 1) / (m['latency_s'] - m['ttft_s']):.1f} tokens/s ({m['tpot_s'] * 1e3:.2f} ms per token)")
    if len(outs) > 1:
        print(f"throughput {generated / run_s:.1f} tokens/s over the batch")
    print(f"time       load {load_s:.2f} s, compile {max(warm_s - run_s, 0.0):.2f} s, run {run_s:.2f} s")
    if FLAGS.out:
        metrics = {"ttft_s": m["ttft_s"], "tpot_s": m["tpot_s"], "generated_tokens": generated, "run_s": run_s,
                   "compile_s": max(warm_s - run_s, 0.0), "load_s": load_s, "throughput_tok_s": generated / run_s}
        common.write_json(FLAGS.out, common.record(__name__, metrics, outputs=[
            {"prompt": t, "text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason}
            for t, o in zip(texts, outs)]))


def main(argv):
    del argv
    run()


def cli() -> None:
    """The `jaxinfer-generate` console script (the same as python -m jaxinfer.experiments.generate)."""
    common.run(main)


if __name__ == "__main__":
    cli()
