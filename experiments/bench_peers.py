"""jaxinfer's engine against peers on the same real model, on this machine, in one run.

  python -m jaxinfer.experiments.bench_peers --model=smollm2-135m --batch_sizes=1,8 --out=/tmp/peers.json

Every system decodes the same greedy workload: `batch` prompts of exactly --prompt_tokens tokens
(openings of Python's own documentation, `pydoc_data.topics`, in the model's tokenizer), then
--new_tokens tokens each, end-of-sequence ignored. Each measurement is the best of --repeats runs
after one warm-up run (which compiles); every run has prompts of its own, so no system reuses the
KV of an earlier run's prompt (the engine's prefix cache, llama.cpp's prompt cache). Figures:
tokens/s = batch * new_tokens / wall time of the whole generate call; TTFT = the time to the first
generated token (jaxinfer: the engine's own per-request metric; HF: a generate call of one new
token; llama.cpp: the first token its generator yields).

Systems (every engine with --layer_loop, here unrolled unless given: the CPU's fast layout,
benchmarks/results/cpu_dots.md; and --decode_steps, the engine's decode steps per host round trip):
  jaxinfer         the engine on the GGUF dequantised to dense --dtype weights (the arithmetic
                   HF runs)
  jaxinfer-bf16    the same in bfloat16 (weights and activations; float32 accumulators)
  jaxinfer-w8a8    the dense weights rounded to int8 per output channel, activations to int8 per
                   token, int32 products (--weights=w8a8; what llama.cpp's 8-bit CPU dot does)
  jaxinfer-w8a8-head   the same with the LM head in int8 too (--weights=w8a8-head; the file's own
                   head, its token embedding, is Q8_0, which llama.cpp multiplies the same way)
  jaxinfer-packed  the engine serving the file's packed blocks (Q4_1 as QuantizedWeight,
                   dequantised by XLA inside every step; matmul="xla")
  hf               HF transformers `generate` on its GGUF loader's model (float32, torch CPU,
                   torch threads = --threads)
  llama.cpp        llama-cpp-python on the GGUF file itself, --threads threads; batch 1 through its
                   generator, larger batches as one llama_decode of every sequence's token per
                   step (its low-level batch API, greedy); skipped when not installed
Also: the largest per-row relative error of jaxinfer's and llama.cpp's logits against HF's on
--heldout_tokens tokens of held-out text, and each system's greedy answer to a chat prompt.
Writes a JSON (figures, every timed run's wall time, environment, command, the share of the CPUs
other work kept busy just before the run) and prints a table.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from pydoc_data import topics

import numpy as np
from absl import flags

import jaxinfer as ji
from jaxinfer import quant
from jaxinfer.checkpoints import gguf as gguf_lib
from jaxinfer.quant import dequantize_params
from jaxinfer.quant.spec import scheme_from_name

from . import common

try:  # an optional peer: llama-cpp-python, built from source where it builds
    import llama_cpp
except ImportError:
    llama_cpp = None

FLAGS = flags.FLAGS
flags.DEFINE_integer("prompt_tokens", 32, "Tokens in every prompt.")
flags.DEFINE_integer("new_tokens", 64, "Greedy tokens generated per prompt (EOS ignored).")
flags.DEFINE_integer("repeats", 2, "Timed runs per measurement (best kept), after one warm-up run.")
flags.DEFINE_integer("threads", 2, "CPU threads for torch and llama.cpp.")
flags.DEFINE_list("systems", ["jaxinfer", "jaxinfer-bf16", "jaxinfer-w8a8", "jaxinfer-w8a8-head", "jaxinfer-packed",
                             "hf", "llama.cpp"],
                  "Systems to measure.")
flags.DEFINE_integer("heldout_tokens", 128, "Tokens of held-out text for the logits agreement check.")
flags.DEFINE_string("chat_prompt", "What is the capital of France?", "A user message every system answers greedily.")
# --model: a model known by name or a .gguf file (default smollm2-135m)
for _name in ("model", "dtype", "out", "batch_sizes", "tp", "layer_loop", "decode_steps"):
    flags.declare_key_flag(_name)
DEFAULT_MODEL = "smollm2-135m"

SYSTEMS = ("jaxinfer", "jaxinfer-bf16", "jaxinfer-w8a8", "jaxinfer-w8a8-head", "jaxinfer-packed", "hf", "llama.cpp")


def _model() -> str:
    """--model when given, else SmolLM2-135M (common's default is the tiny byte model)."""
    return FLAGS.model if FLAGS["model"].present else DEFAULT_MODEL


def _gguf_path(name: str) -> str:
    return gguf_lib.named_model_path(name) if name in gguf_lib.NAMED_MODELS else name


def _prompt_sets(tokenizer, runs: int, batch: int, length: int) -> list[list[list[int]]]:
    """`runs` sets of `batch` prompts: the first `length` tokens of distinct documentation topics."""
    prompts = []
    for name in sorted(topics.topics):
        ids = tokenizer.encode(topics.topics[name].strip(), add_special_tokens=False)
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == runs * batch:
            return [prompts[i * batch : (i + 1) * batch] for i in range(runs)]
    raise ValueError(f"fewer than {runs * batch} documentation topics have {length} tokens")


def _timed(run, prompt_sets) -> tuple[list[float], object]:
    """run(prompts) on the first set (warm-up), then the wall time of each other set (and the
    last result)."""
    result = run(prompt_sets[0])
    times = []
    for prompts in prompt_sets[1:]:
        t0 = time.perf_counter()
        result = run(prompts)
        times.append(time.perf_counter() - t0)
    return times, result


def _layer_loop() -> str:
    """--layer_loop when given, else unrolled (the CPU's fast layout; the scan needs tp > 1)."""
    return FLAGS.layer_loop if FLAGS["layer_loop"].present or FLAGS.tp > 1 else "unroll"


def _engine_config() -> ji.EngineConfig:
    return ji.EngineConfig(tp=FLAGS.tp, layer_loop=_layer_loop(), decode_steps=FLAGS.decode_steps)


def bench_engine(model: ji.Model, prompt_sets, new_tokens: int) -> dict:
    engine = ji.Engine(model, _engine_config())
    sp = ji.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    walls, outs = _timed(lambda prompts: engine.generate(prompts, sp), prompt_sets)
    return dict(tokens_per_s=len(outs) * new_tokens / min(walls), walls_s=walls,
                ttft_s=float(np.mean([o.metrics["ttft_s"] for o in outs])), tokens=[o.token_ids for o in outs])


def bench_hf(hf, prompt_sets, new_tokens: int) -> dict:
    import torch  # noqa: PLC0415  (the optional [peers] extra)

    def generate(prompts, n):
        ids = torch.tensor(prompts)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    walls, tokens = _timed(lambda prompts: generate(prompts, new_tokens), prompt_sets)
    ttfts, _ = _timed(lambda prompts: generate(prompts, 1), prompt_sets)
    return dict(tokens_per_s=len(tokens) * new_tokens / min(walls), walls_s=walls, ttft_s=min(ttfts), tokens=tokens)


def bench_llama_cpp(llm, prompt_sets, new_tokens: int) -> dict:
    def generate(prompts):
        llm.reset()  # forget the last prompt: llama-cpp-python would reuse its KV otherwise
        t0 = time.perf_counter()
        tokens, first = [], None
        for token in llm.generate(prompts[0], temp=0.0, top_k=1, reset=True):
            first = first or time.perf_counter() - t0
            tokens.append(int(token))
            if len(tokens) == new_tokens:
                break
        return first, tokens

    walls, (first, tokens) = _timed(generate, prompt_sets)
    return dict(tokens_per_s=new_tokens / min(walls), walls_s=walls, ttft_s=first, tokens=[tokens])


class LlamaBatched:
    """llama.cpp decoding several sequences at once through its low-level batch API (what its own
    `llama-batched` example and server slots do): one `llama_decode` of every prompt's tokens, then
    one per step holding each sequence's last token, greedy (argmax of each sequence's logits)."""

    def __init__(self, path: str, batch: int, max_len: int, threads: int):
        lib = llama_cpp
        self.model = lib.llama_model_load_from_file(path.encode(), lib.llama_model_default_params())
        params = lib.llama_context_default_params()
        params.n_ctx = batch * max_len
        params.n_batch = params.n_ubatch = max(512, batch * max_len)  # every prompt in one decode
        params.n_seq_max, params.n_threads, params.n_threads_batch = batch, threads, threads
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama_cpp.Llama (batch 1) sets it
        self.ctx = lib.llama_init_from_model(self.model, params)
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(params.n_batch, 0, 1)

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """tokens: (token, position, sequence, wants logits)."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if llama_cpp.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,))))

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        """(seconds to the first generated tokens, each sequence's greedy tokens)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        self._decode([(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)])
        ends = np.cumsum([len(ids) for ids in prompts]) - 1
        out = [[self._argmax(int(e))] for e in ends]
        first = time.perf_counter() - t0
        for j in range(1, new_tokens):
            self._decode([(seq[-1], len(ids) + j - 1, s, True) for s, (ids, seq) in enumerate(zip(prompts, out))])
            for s, seq in enumerate(out):
                seq.append(self._argmax(s))
        return first, out

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def bench_llama_cpp_batched(path: str, prompt_sets, new_tokens: int) -> dict:
    runner = LlamaBatched(path, len(prompt_sets[0]), FLAGS.prompt_tokens + new_tokens, FLAGS.threads)
    try:
        walls, (first, tokens) = _timed(lambda prompts: runner.generate(prompts, new_tokens), prompt_sets)
    finally:
        runner.close()
    return dict(tokens_per_s=len(tokens) * new_tokens / min(walls), walls_s=walls, ttft_s=first, tokens=tokens)


def cpu_busy(seconds: float = 2.0) -> float | None:
    """Share of all CPUs' time spent busy over `seconds` before the run, from /proc/stat (None off
    Linux): work of other tenants on a shared machine shows here and in every figure."""
    if not os.path.exists("/proc/stat"):
        return None

    def ticks():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # (idle + iowait, total)

    idle0, total0 = ticks()
    time.sleep(seconds)
    idle1, total1 = ticks()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def _max_row_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float((np.linalg.norm(actual - expected, axis=-1) / np.linalg.norm(expected, axis=-1)).max())


def check_flags() -> tuple[str, list[int]]:
    """Refuse bad flags and a missing [peers] extra before any model loads; (the GGUF file, the batch sizes)."""
    unknown = set(FLAGS.systems) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"--systems has {sorted(unknown)}, not among {SYSTEMS}")
    for name in ("prompt_tokens", "new_tokens", "repeats", "threads"):
        if FLAGS[name].value < 1:
            raise ValueError(f"--{name}={FLAGS[name].value} must be >= 1")
    if FLAGS.heldout_tokens < 0:
        raise ValueError(f"--heldout_tokens={FLAGS.heldout_tokens} must be >= 0")
    batches = common.value_or("batch_sizes", ["1", "8"])
    if not all(b.isdigit() and int(b) >= 1 for b in batches):
        raise ValueError(f"--batch_sizes={','.join(batches)}: every value must be an integer >= 1")
    if "hf" in FLAGS.systems or FLAGS.heldout_tokens:
        common.require("--systems=hf or --heldout_tokens > 0 (HF transformers as the reference)", "torch",
                       "transformers")
    path = _gguf_path(_model())
    if not os.path.isfile(path):
        raise ValueError(f"--model={_model()}: no GGUF file at {path}")
    return path, [int(b) for b in batches]


def run(path: str, batches: list[int]) -> dict:
    busy = cpu_busy()
    packed = ji.load_model(_model(), dtype=FLAGS.dtype)
    dense = ji.Model(packed.config, dequantize_params(packed.params), packed.tokenizer, packed.name)
    engines = {"jaxinfer": dense, "jaxinfer-packed": packed}
    if "jaxinfer-bf16" in FLAGS.systems:
        half = ji.load_model(_model(), dtype="bfloat16")
        engines["jaxinfer-bf16"] = ji.Model(half.config, dequantize_params(half.params), half.tokenizer, half.name)
    for system, scheme in (("jaxinfer-w8a8", "w8a8"), ("jaxinfer-w8a8-head", "w8a8-head")):
        if system in FLAGS.systems:
            engines[system] = quant.quantize_model(dense, scheme_from_name(scheme), progress=False)
    hf = None
    if "hf" in FLAGS.systems or FLAGS.heldout_tokens:
        import torch  # noqa: PLC0415  (the optional [peers] extra)
        import transformers  # noqa: PLC0415

        torch.set_num_threads(FLAGS.threads)
        folder, name = os.path.split(os.path.abspath(path))
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        result_hf = dict(attn_implementation=hf.config._attn_implementation, torch_version=torch.__version__,
                         transformers_version=transformers.__version__)
    llm = None
    if "llama.cpp" in FLAGS.systems and llama_cpp is not None:
        llm = llama_cpp.Llama(model_path=path, n_threads=FLAGS.threads, n_threads_batch=FLAGS.threads,
                              n_ctx=512, n_batch=512, verbose=False)

    result: dict = dict(model=packed.name, gguf=path,
                        prompt_tokens=FLAGS.prompt_tokens, new_tokens=FLAGS.new_tokens, repeats=FLAGS.repeats,
                        threads=FLAGS.threads, dtype=FLAGS.dtype, layer_loop=_layer_loop(),
                        decode_steps=FLAGS.decode_steps, runs=[], not_measured=[], cpu_busy_before=busy,
                        hf=result_hf if hf is not None else None,
                        llama_cpp=None if llm is None else importlib.metadata.version("llama_cpp_python"))
    for batch in batches:
        prompt_sets = _prompt_sets(packed.tokenizer, FLAGS.repeats + 1, batch, FLAGS.prompt_tokens)
        for system in FLAGS.systems:
            if system in engines:
                figures = bench_engine(engines[system], prompt_sets, FLAGS.new_tokens)
            elif system == "hf":
                figures = bench_hf(hf, prompt_sets, FLAGS.new_tokens)
            elif llm is None:
                result["not_measured"].append(f"llama.cpp batch {batch}: llama-cpp-python is not installed")
                continue
            elif batch != 1:
                figures = bench_llama_cpp_batched(path, prompt_sets, FLAGS.new_tokens)
            else:
                figures = bench_llama_cpp(llm, prompt_sets, FLAGS.new_tokens)
            result["runs"].append(dict(system=system, batch=batch, **figures))
            print(f"{system:16s} batch {batch}: {figures['tokens_per_s']:7.1f} tok/s, "
                  f"TTFT {figures['ttft_s'] * 1e3:7.1f} ms", flush=True)

    if hf is not None and FLAGS.heldout_tokens:
        text = " ".join(topics.topics[name] for name in sorted(topics.topics)[-40:])
        ids = packed.tokenizer.encode(text, add_special_tokens=False)[: FLAGS.heldout_tokens]
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0].numpy()
        ours = np.asarray(ji.forward_logits(dense, np.array([ids])))[0]
        result["logits_max_row_rel_error"] = _max_row_error(ours, expected)
        if llm is not None:  # llama.cpp's logits of every position need an instance that keeps them all
            scorer = llama_cpp.Llama(model_path=path, n_threads=FLAGS.threads, n_ctx=512, logits_all=True,
                                     verbose=False)
            scorer.eval(ids)
            scores = np.array(scorer.scores[: len(ids)])
            result["llama_cpp_logits_max_row_rel_error"] = _max_row_error(scores, expected)

    messages = [{"role": "user", "content": FLAGS.chat_prompt}]
    chat_ids = packed.tokenizer.apply_chat_template(messages, tokenize=True)
    answers = {}
    sp = ji.SamplingParams(max_tokens=32, temperature=0.0)
    for system in [s for s in FLAGS.systems if s in engines]:
        engine = ji.Engine(engines[system], _engine_config())
        answers[system] = engine.generate([chat_ids], sp)[0].text
    if hf is not None:
        with torch.no_grad():
            out = hf.generate(torch.tensor([chat_ids]), max_new_tokens=32, do_sample=False, pad_token_id=0)
        answers["hf"] = packed.tokenizer.decode(out[0, len(chat_ids):].tolist())
    if llm is not None:
        reply = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, max_tokens=32)
        answers["llama.cpp"] = reply["choices"][0]["message"]["content"]
    result["chat_answers"] = answers
    return result


def main(argv):
    del argv
    result = run(*check_flags())
    if result["cpu_busy_before"] is not None:
        print(f"CPUs busy with other work just before the run: {result['cpu_busy_before']:.0%}")
    print(f"{'system':16s} {'batch':>5s} {'tok/s':>8s} {'TTFT ms':>8s}")
    for r in result["runs"]:
        print(f"{r['system']:16s} {r['batch']:5d} {r['tokens_per_s']:8.1f} {r['ttft_s'] * 1e3:8.1f}")
    for key, system in (("logits_max_row_rel_error", "jaxinfer"),
                        ("llama_cpp_logits_max_row_rel_error", "llama.cpp")):
        if key in result:
            print(f"{system} logits vs HF's, {FLAGS.heldout_tokens} held-out tokens: max row relative error "
                  f"{result[key]:.2e}")
    for system, answer in result["chat_answers"].items():
        print(f"{system} answers {FLAGS.chat_prompt!r}: {answer!r}")
    for line in result["not_measured"]:
        print(f"not measured: {line}")
    if FLAGS.out:
        metrics = {f"{r['system']}/b={r['batch']}": {"tokens_per_s": r["tokens_per_s"], "ttft_s": r["ttft_s"]}
                   for r in result["runs"]}
        metrics.update({k: result[k] for k in ("logits_max_row_rel_error", "llama_cpp_logits_max_row_rel_error")
                        if k in result})
        common.write_json(FLAGS.out, common.record(__name__, metrics, **result))


if __name__ == "__main__":
    common.run(main)
