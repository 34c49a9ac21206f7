"""Structured output's costs: grammar compile time, mask time per token, and the throughput and
TPOT of constrained against unconstrained requests.

  python -m experiments.bench_structured --model=tiny --batch_sizes=1,8 --max_tokens=32 --num_schemas=8
  python -m experiments.bench_structured --model=smollm2-135m --out=structured.json    # batch 1, 8, 32
  python -m experiments.bench_structured --model=tiny --spec=draft --spec_draft=tiny-draft --spec_tokens=4

Compile: per schema of the corpus (experiments/_structured_schemas.py), cold (first compile of its
text, the backend's tokenizer tables already built; their build is timed once apart) and cached
(the same text again), and building a matcher from it. Throughput: at each batch size B, B requests
with JSON schemas (temperature 1, the corpus in turn) and B unconstrained requests of the same
prompt run as two workloads of one engine each; each is run once to compile its programs, then
timed --runs times (the fastest run: generated tokens / wall, mean TPOT; no prefix cache, so the
timed run repeats the first run's programs). Unconstrained request i ignores EOS and generates as
many tokens as constrained output i, so both workloads decode the same batch shapes step by step.
Mask: each constrained output's tokens replayed through a fresh matcher, timing the fill of every
position's bitmask (p50 / p99); in the engine, the fill of each decode call's masks (ms per call) and the share of
them done before the device finished the call's forward pass (hidden). Writes a JSON to --out and
prints tables; compile time is reported apart (the first run's wall, its programs compiled).
"""

from __future__ import annotations

import collections
import time

import numpy as np
from absl import flags

import jaxinfer as ji

from . import common
from ._structured_schemas import corpus
from .common import environment

FLAGS = flags.FLAGS
for _name in ("model", "dtype", "dequantize", "seed", "out", "batch_sizes", "max_tokens", "runs", *common.SPEC_FLAGS):
    flags.declare_key_flag(_name)
_NUM_SCHEMAS = flags.DEFINE_integer("num_schemas", 33, "Schemas of the corpus to compile and sample (at most "
                                    f"{len(corpus())}).")
_BACKEND = flags.DEFINE_enum("structured_backend", "llguidance", ["llguidance", "xgrammar"],
                             "Grammar backend (xgrammar: pip install 'jaxinfer[structured-xgrammar]').")
PROMPT = "Reply with one JSON value:"
BATCH_SIZES = (1, 8, 32)
MAX_TOKENS = 64
RUNS = 3


def _compile_times(grammars, schemas) -> dict:
    t0 = time.perf_counter()
    backend = grammars.backend
    tokenizer_s = time.perf_counter() - t0
    cold, cached, matcher = [], [], []
    for _, schema in schemas:
        spec = ji.StructuredOutput(json_schema=schema)
        t0 = time.perf_counter()
        compiled = grammars.compile(spec)
        t1 = time.perf_counter()
        grammars.compile(spec)
        t2 = time.perf_counter()
        backend.matcher(compiled)
        t3 = time.perf_counter()
        cold.append(t1 - t0), cached.append(t2 - t1), matcher.append(t3 - t2)
    ms = lambda xs: {"p50_ms": 1e3 * float(np.percentile(xs, 50)), "p99_ms": 1e3 * float(np.percentile(xs, 99))}
    return {"tokenizer_s": tokenizer_s, "cold": ms(cold), "cached": ms(cached), "matcher": ms(matcher)}


def _mask_times(backend, schemas, outputs, vocab_size: int) -> list[float]:
    """Seconds to fill each position's mask, replaying each output through a fresh matcher."""
    words = np.zeros(-(-vocab_size // 32), np.int32)
    times = []
    for (_, schema), out in zip(schemas, outputs):
        m = backend.matcher(backend.compile(ji.StructuredOutput(json_schema=schema)))
        for token in out.token_ids:
            t0 = time.perf_counter()
            m.fill(words)
            times.append(time.perf_counter() - t0)
            if not m.advance(token):
                break
    return times


def _run(model, batch: int, params: list) -> tuple[dict, list]:
    # No prefix cache: the timed run must run the programs the first run compiled (a cache hit
    # would prefill a shorter chunk, a new program).
    engine = ji.Engine(model, common.engine_config(max_batch=batch, prefix_cache=False,
                                                   structured_backend=_BACKEND.value))
    t0 = time.perf_counter()
    engine.generate([PROMPT] * len(params), params)
    first_s = time.perf_counter() - t0
    # (wall, mean TPOT, outputs) of each timed run; the fastest is reported: a request whose matcher
    # is still being built is admitted a step later, so a run's prompt chunks may group differently
    # from the first run's and need a program it did not compile.
    runs = []
    for _ in range(common.value_or("runs", RUNS)):
        counts = lambda: engine.stats + (engine.speculator.stats if engine.speculator else collections.Counter())
        before = counts()
        outs = engine.generate([PROMPT] * len(params), params)
        tpot = [o.metrics["tpot_s"] for o in outs if o.metrics["generated_tokens"] > 1]
        stats = counts()
        stats.subtract(before)
        runs.append((engine.last_run["wall_s"], float(np.mean(tpot)) if tpot else 0.0, outs, stats))
    wall, tpot, outs, stats = min(runs, key=lambda r: r[0])
    tokens = sum(len(o.token_ids) for o in outs)
    # The grammar masks of a decode call are filled while the device computes its forward pass
    # (jaxinfer.sampling.processors.Processor.late): "hidden" counts the fills done before it was.
    fills = stats["late_fills"]
    return {"first_run_s": first_s, "wall_s": wall, "tokens": tokens, "throughput_tok_s": tokens / wall,
            "tpot_ms": 1e3 * tpot, "finished_stop": sum(o.finish_reason == "stop" for o in outs),
            "decode_calls_lookahead": stats["lookahead_calls"], "mask_fills": fills,
            "mask_fill_ms_per_call": 1e3 * stats["late_fill_s"] / fills if fills else 0.0,
            "mask_fills_hidden_share": stats["late_fills_hidden"] / fills if fills else None,
            "device_idle_share": stats["device_idle_s"] / wall,
            "spec_tokens_per_pass": stats["spec_emitted"] / stats["spec_passes"] if stats["spec_passes"] else None,
            }, outs


def main(argv):
    del argv
    batch_sizes = [int(b) for b in common.value_or("batch_sizes", BATCH_SIZES)]
    max_tokens = common.value_or("max_tokens", MAX_TOKENS)
    for name, value in (("num_schemas", _NUM_SCHEMAS.value), ("max_tokens", max_tokens),
                        ("runs", common.value_or("runs", RUNS)), *(
            ("batch_sizes", b) for b in batch_sizes)):
        if value < 1:
            raise ValueError(f"--{name}={value} must be >= 1")
    schemas = corpus()[: _NUM_SCHEMAS.value]
    model = common.load_bench_model(FLAGS.model, FLAGS.dtype)
    grammars = ji.Engine(model, common.engine_config(max_batch=1, structured_backend=_BACKEND.value)).grammars
    compile_times = _compile_times(grammars, schemas)
    rows, mask = [], []
    for batch in batch_sizes:
        picked = [schemas[i % len(schemas)] for i in range(batch)]
        constrained = [ji.SamplingParams(max_tokens=max_tokens, seed=FLAGS.seed + i,
                                         structured=ji.StructuredOutput(json_schema=s)) for i, (_, s) in
                       enumerate(picked)]
        c, outs = _run(model, batch, constrained)
        # The same workload unconstrained: request i generates as many tokens as constrained output i.
        free = [ji.SamplingParams(max_tokens=max(1, len(o.token_ids)), seed=FLAGS.seed + i, ignore_eos=True)
                for i, o in enumerate(outs)]
        u, _ = _run(model, batch, free)
        mask += _mask_times(grammars.backend, picked, outs, model.config.vocab_size)
        rows.append({"batch": batch, "constrained": c, "unconstrained": u,
                     "throughput_ratio": c["throughput_tok_s"] / u["throughput_tok_s"]})
    result = {"environment": environment(__name__), "model": FLAGS.model, "backend": grammars.backend.name,
              "speculative": None if FLAGS.spec == "none" else {n: FLAGS[n].value for n in common.SPEC_FLAGS},
              "max_tokens": max_tokens, "schemas": len(schemas), "compile": compile_times,
              "mask": {"positions": len(mask), "p50_us": 1e6 * float(np.percentile(mask, 50)),
                       "p99_us": 1e6 * float(np.percentile(mask, 99))}, "results": rows}
    if FLAGS.out:
        common.write_json(FLAGS.out, result)
    ct, m = compile_times, result["mask"]
    spec = "" if FLAGS.spec == "none" else f", speculative {FLAGS.spec} k={FLAGS.spec_tokens}"
    print(f"structured output on {FLAGS.model} ({result['backend']}{spec}), {len(schemas)} schemas")
    print(f"tokenizer tables {ct['tokenizer_s']:.3f} s; compile p50/p99 ms: cold {ct['cold']['p50_ms']:.3f}/"
          f"{ct['cold']['p99_ms']:.3f}, cached {ct['cached']['p50_ms']:.4f}/{ct['cached']['p99_ms']:.4f}, "
          f"matcher {ct['matcher']['p50_ms']:.3f}/{ct['matcher']['p99_ms']:.3f}")
    print(f"mask fill per token ({m['positions']} positions): p50 {m['p50_us']:.1f} us, p99 {m['p99_us']:.1f} us")
    print(f"{'batch':>5} {'constr tok/s':>13} {'free tok/s':>11} {'ratio':>6} {'constr TPOT ms':>15} "
          f"{'free TPOT ms':>13} {'stop':>5} {'fill ms':>8} {'hidden':>7} {'tok/pass':>13} {'1st run s':>10}")
    for r in rows:
        c, u = r["constrained"], r["unconstrained"]
        hidden = "-" if c["mask_fills_hidden_share"] is None else f"{c['mask_fills_hidden_share']:.0%}"
        print(f"{r['batch']:>5} {c['throughput_tok_s']:>13.1f} {u['throughput_tok_s']:>11.1f} "
              f"{r['throughput_ratio']:>6.2f} {c['tpot_ms']:>15.2f} {u['tpot_ms']:>13.2f} "
              f"{c['finished_stop']:>5} {c['mask_fill_ms_per_call']:>8.3f} {hidden:>7} "
              f"{c['spec_tokens_per_pass'] or 0:>6.2f}/{u['spec_tokens_per_pass'] or 0:<6.2f} "
              f"{c['first_run_s']:>10.2f}")


if __name__ == "__main__":
    common.run(main)
