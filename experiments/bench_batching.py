"""Serving benchmark: a synthetic workload through the engine under one batching / KV-layout policy.

  python -m jaxinfer.experiments.bench_batching --batching=continuous --output_dist=lognormal
  python -m jaxinfer.experiments.bench_batching --batching=static --kv_layout=contiguous --out=/tmp/static.json
  python -m jaxinfer.experiments.bench_batching --arrival=poisson --rates=2,4,8 --plot=/tmp/latency.png

Prompts are slices of held-out text; each request generates exactly its drawn output length
(EOS ignored). Requests arrive all at once or as a Poisson process (--rate requests/s, real time).
The engine first compiles every program its config can run for the workload's longest prompt
(`Engine.warmup`); the measured run follows and counts any program compiled during it (0 expected).
Prints throughput, TTFT / TPOT percentiles, KV waste, preemptions, the host share of step time and
an estimate of the share of wall time the device sat idle waiting for the host, and writes a JSON
with the config, the environment and every request's figures.

  python -m jaxinfer.experiments.bench_batching --model=random:llama3_8b --dtype=bfloat16 --step_overhead=256

times batch-1 decode through the engine against the same jitted step run back to back.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from tqdm.auto import tqdm

import jaxinfer as ji
from jaxinfer import data
from jaxinfer.engine import programs
from jaxinfer.engine import runner as runner_lib
from jaxinfer.engine.batch import DecodeInputs
from jaxinfer.sampling.sampler import SamplingBatch

from . import common

FLAGS = flags.FLAGS
flags.DEFINE_enum("arrival", "all", ["all", "poisson"], "All requests at t=0, or Poisson arrivals at --rate.")
flags.DEFINE_list("rates", ["4"], "Poisson arrival rates (requests/s); one run per rate.")
flags.DEFINE_enum("prompt_dist", "uniform", ["fixed", "uniform", "lognormal"], "Prompt length distribution.")
flags.DEFINE_enum("output_dist", "lognormal", ["fixed", "uniform", "lognormal"], "Output length distribution.")
flags.DEFINE_float("sigma", 1.0, "Log-normal sigma (spread) of lognormal lengths.")
flags.DEFINE_integer("max_len", 400, "Upper cap for drawn prompt and output lengths.")
flags.DEFINE_string("workload_file", "", "JSONL of {prompt_len, output_len} rows (overrides the distributions).")
flags.DEFINE_integer("step_overhead", 0, "If > 0: instead of a workload, decode this many tokens at batch 1 and "
                     "compare the engine's time per token with the same jitted decode step run back to back.")
flags.DEFINE_enum("warmup", "buckets", ["buckets", "replay"], "Before the measured run, compile every program the "
                  "engine can run for the workload's lengths (Engine.warmup), or replay the workload once unmeasured "
                  "(compiles only what that run hits; fewer programs for a large model on a short GPU session).")
PROMPT_LEN = 48  # default --prompt_len; --plot: latency against throughput, one point per rate
for _name in ("model", "dtype", "seed", "out", "num_requests", "prompt_len", "output_len", "plot", *common.ENGINE_FLAGS,
              *common.SPEC_FLAGS):
    flags.declare_key_flag(_name)


@dataclasses.dataclass(frozen=True)
class Request:
    arrival_s: float
    prompt: list[int]
    output_len: int


def draw_lengths(rng, dist: str, mean: int, n: int, sigma: float, cap: int) -> np.ndarray:
    if dist == "fixed":
        x = np.full(n, mean)
    elif dist == "uniform":
        x = rng.integers(1, 2 * mean, size=n)
    else:  # log-normal with the given mean
        x = rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, size=n)
    return np.clip(np.round(x), 1, cap).astype(int)


def read_workload_file(path: str) -> list[dict]:
    """The rows of a --workload_file: one JSON object per line with integer prompt_len and
    output_len >= 1; ValueError naming the line and the field of a bad one."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"--workload_file={path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where} is not an object with prompt_len and output_len")
            for field in ("prompt_len", "output_len"):
                value = row.get(field)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{where}: {field}={value!r} must be an integer >= 1")
            rows.append(row)
    if not rows:
        raise ValueError(f"--workload_file={path} has no rows")
    return rows


def check_workload_flags() -> None:
    """Refuse bad workload flags (bench_batching's and bench_serving's) before any work."""
    for name in ("num_requests", "prompt_len", "output_len", "max_len"):
        if FLAGS[name].value is not None and FLAGS[name].value < 1:
            raise ValueError(f"--{name}={FLAGS[name].value} must be >= 1")
    if not FLAGS.sigma > 0:
        raise ValueError(f"--sigma={FLAGS.sigma} must be > 0")
    if FLAGS.workload_file:
        read_workload_file(FLAGS.workload_file)


def make_workload(rate: float | None, model) -> list[Request]:
    rng = np.random.default_rng(FLAGS.seed)
    n = FLAGS.num_requests
    if FLAGS.workload_file:
        rows = read_workload_file(FLAGS.workload_file)
        prompt_lens = np.array([r["prompt_len"] for r in rows])
        output_lens = np.array([r["output_len"] for r in rows])
        n = len(rows)
    else:
        prompt_lens = draw_lengths(rng, FLAGS.prompt_dist, common.value_or("prompt_len", PROMPT_LEN), n, FLAGS.sigma,
                                   FLAGS.max_len)
        output_lens = draw_lengths(rng, FLAGS.output_dist, FLAGS.output_len, n, FLAGS.sigma, FLAGS.max_len)
    context = model.config.max_position_embeddings
    prompt_lens = np.minimum(prompt_lens, context - 1)
    output_lens = np.minimum(output_lens, context - prompt_lens + 1)
    if model.tokenizer is None:
        raise ValueError(f"--model={FLAGS.model} has no tokenizer: the prompts are held-out text in its tokens")
    text = data.heldout_stream(model.tokenizer).ids
    bos = [] if model.tokenizer.bos_id is None else [model.tokenizer.bos_id]
    starts = rng.integers(0, text.size - prompt_lens.max() - 1, size=n)
    arrivals = np.zeros(n) if rate is None else np.cumsum(rng.exponential(1.0 / rate, size=n))
    return [
        Request(float(a), (bos + text[s : s + p].tolist())[:p], int(o))
        for a, s, p, o in zip(arrivals, starts, prompt_lens, output_lens)
    ]


def serve(engine: ji.Engine, workload: list[Request], progress: bool) -> tuple[list[ji.RequestOutput], float]:
    """Run the workload in real time; returns outputs in workload order and the wall time."""
    pending = sorted(range(len(workload)), key=lambda i: workload[i].arrival_s)
    ids: dict[int, int] = {}
    outs: dict[int, ji.RequestOutput] = {}
    bar = tqdm(total=len(workload), desc="requests", unit="req", disable=not progress)
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and workload[pending[0]].arrival_s <= now:
            i = pending.pop(0)
            r = workload[i]
            sp = ji.SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
            ids[engine.add_request(r.prompt, sp)] = i
        if not engine.has_unfinished():
            time.sleep(max(0.0, workload[pending[0]].arrival_s - (time.perf_counter() - start)))
            continue
        for out in engine.step():
            if out.finished:
                outs[ids[out.request_id]] = out
                bar.update()
    wall = time.perf_counter() - start
    bar.close()
    return [outs[i] for i in range(len(workload))], wall


def percentiles(x) -> dict[str, float]:
    x = np.asarray(x, float)
    return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p90": float(np.percentile(x, 90)),
            "p99": float(np.percentile(x, 99))}


def run_once(model, rate: float | None) -> dict:
    workload = make_workload(rate, model)
    t0 = time.perf_counter()
    if FLAGS.warmup == "replay":
        traces = sum(runner_lib.TRACE_COUNTS.values())
        serve(ji.Engine(model, common.engine_config()), workload, progress=False)
        compiled = sum(runner_lib.TRACE_COUNTS.values()) - traces
    engine = ji.Engine(model, common.engine_config())
    if FLAGS.warmup == "buckets":
        compiled = engine.warmup(max_prompt_len=max(len(r.prompt) for r in workload),
                                 max_len=min(max(len(r.prompt) + r.output_len for r in workload), engine.max_seq_len))
    warm_s = time.perf_counter() - t0
    traces = sum(runner_lib.TRACE_COUNTS.values())
    outs, wall = serve(engine, workload, progress=True)
    compiles_during_run = sum(runner_lib.TRACE_COUNTS.values()) - traces
    generated = sum(len(o.token_ids) for o in outs)
    steps = engine.stats["steps"]
    host, device = engine.stats["host_s"], engine.stats["device_s"]
    return {
        "rate": rate,
        "wall_s": wall,
        "warmup_s": warm_s,
        "warmup_compiled": compiled,
        "throughput_tok_s": generated / wall,
        "generated_tokens": generated,
        "prompt_tokens": int(sum(len(r.prompt) for r in workload)),
        "ttft_s": percentiles([o.metrics["ttft_s"] for o in outs]),
        "tpot_s": percentiles([o.metrics["tpot_s"] for o in outs if o.metrics["generated_tokens"] > 1]),
        "latency_s": percentiles([o.metrics["latency_s"] for o in outs]),
        "kv_waste": engine.kv_waste(),
        "kv_slots": engine.allocator.num_pages * engine.allocator.page_size,
        "peak_running": engine.stats["peak_running"],
        "preemptions": engine.stats["preemptions"],
        "steps": steps,
        "compiled_programs": len(engine.buckets),
        "compiles_during_run": compiles_during_run,  # programs the warm-up missed: 0 expected
        "host_share": host / (host + device) if host + device else 0.0,
        "device_idle_share": engine.stats["device_idle_s"] / wall,  # estimate: see ModelRunner._mark_dispatch
        "lookahead_calls": engine.stats["lookahead_calls"],
        "requests": [
            {"prompt_len": len(r.prompt), "output_len": r.output_len, "arrival_s": r.arrival_s, **o.metrics}
            for r, o in zip(workload, outs)
        ],
    }


def step_overhead(model, num_tokens: int) -> dict:
    """Batch-1 decode: the engine's time per token against its own jitted decode step run back to
    back with the token fed back on device (no host work between steps)."""
    prompt = [model.tokenizer.bos_id] + list(range(97, 97 + 15))
    sp = ji.SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    config = common.engine_config(max_batch=1)
    for _ in range(2):  # the first run compiles
        engine = ji.Engine(model, config)
        (out,) = engine.generate([prompt], sp)
    engine_tpot = out.metrics["tpot_s"]

    seq_pages = -(-(len(prompt) + num_tokens) // config.page_size)
    cache = ji.PagedKVCache.zeros(model.config, seq_pages, config.page_size, model.dtype)
    tables = jnp.arange(seq_pages, dtype=jnp.int32)[None]
    spb = SamplingBatch.from_params([sp], [0])

    def run(cache, n):
        tok = jnp.asarray([prompt[-1]], jnp.int32)
        for i in range(n):
            x = DecodeInputs(tokens=tok, positions=jnp.asarray([len(prompt) - 1 + i], jnp.int32),
                             valid=jnp.ones(1, jnp.int32), block_tables=tables, steps=jnp.asarray([i], jnp.int32),
                             sampling=spb, adapter_ids=jnp.full(1, -1, jnp.int32))
            toks, cache = programs.multi_decode(model.params, model.config, x, cache,
                                                impl=ji.models.decoder.Impl(attention=FLAGS.attention), num_steps=1)
            tok = toks.tokens[0]
        tok.block_until_ready()
        return cache

    cache = run(cache, 2)  # compile
    t0 = time.perf_counter()
    run(cache, num_tokens)
    bare = (time.perf_counter() - t0) / num_tokens
    return {"engine_tpot_s": engine_tpot, "bare_step_s": bare, "overhead": engine_tpot / bare - 1.0,
            "device_idle_share": engine.stats["device_idle_s"] / engine.last_run["wall_s"],
            "tokens": num_tokens}


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["throughput_tok_s"] for r in results]
    for key, label in (("p50", "p50 latency"), ("p90", "p90 latency")):
        ax.plot(xs, [r["latency_s"][key] for r in results], "o-", label=label)
    for r, x in zip(results, xs):
        ax.annotate(f"{r['rate']} req/s" if r["rate"] else "all at once", (x, r["latency_s"]["p50"]), fontsize=7)
    ax.set_xlabel("throughput (generated tokens/s)")
    ax.set_ylabel("request latency (s)")
    ax.set_title(f"{FLAGS.batching} batching, {FLAGS.kv_layout} KV", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_rates() -> list[float]:
    """--rates as numbers of requests per second, each > 0."""
    rates = []
    for r in FLAGS.rates:
        try:
            rates.append(float(r))
        except ValueError:
            raise ValueError(f"--rates: {r!r} is not a number of requests per second") from None
        if not rates[-1] > 0:
            raise ValueError(f"--rates: {r!r} must be > 0")
    return rates


def check_flags() -> list[float | None]:
    """Refuse bad flags before any work; returns the arrival rates to run (None: all at once)."""
    check_workload_flags()
    for name in ("max_batch", "page_size"):
        if FLAGS[name].value < 1:
            raise ValueError(f"--{name}={FLAGS[name].value} must be >= 1")
    if FLAGS["rates"].present and FLAGS.arrival != "poisson":
        raise ValueError("--rates applies to --arrival=poisson only")
    rates = parse_rates()
    if FLAGS.plot:
        common.require("--plot", "matplotlib")
    return [None] if FLAGS.arrival == "all" else rates


def main(argv):
    del argv
    rates = check_flags() if not FLAGS.step_overhead else None
    model = common.load_bench_model(FLAGS.model, FLAGS.dtype)
    if FLAGS.step_overhead:
        r = step_overhead(model, FLAGS.step_overhead)
        print(f"batch-1 decode on {jax.devices()[0].device_kind}, {model.name}: engine {r['engine_tpot_s'] * 1e3:.2f} "
              f"ms/token, bare jitted step {r['bare_step_s'] * 1e3:.2f} ms: overhead {r['overhead']:+.1%}, "
              f"device idle {r['device_idle_share']:.1%} (overlap={FLAGS.overlap}, decode_steps={FLAGS.decode_steps})")
        if FLAGS.out:
            common.write_json(FLAGS.out, common.record(__name__, r))
        return
    results = [run_once(model, rate) for rate in rates]
    summaries = [{k: v for k, v in r.items() if k != "requests"} for r in results]
    metrics = summaries[0] if len(results) == 1 else {f"rate={r['rate']:g}": s for r, s in zip(results, summaries)}
    record = common.record(__name__, metrics, results=results)
    print_table(results, record["env"]["device"])
    if FLAGS.out:
        common.write_json(FLAGS.out, record)
    if FLAGS.plot:
        plot(results, FLAGS.plot)
        print(f"wrote {FLAGS.plot}")


def print_table(results: list[dict], device: str) -> None:
    print(f"\n{FLAGS.batching} batching, {FLAGS.kv_layout} KV, max_batch={FLAGS.max_batch}, "
          f"{FLAGS.num_requests} requests, on {device}")
    header = ("rate", "tok/s", "TTFT mean", "p50", "p90", "p99", "TPOT mean", "p50", "p90", "p99",
              "KV waste", "peak batch", "preempt", "host share", "dev idle", "compiles")
    print(" ".join(f"{h:>10}" for h in header))
    for r in results:
        t, p = r["ttft_s"], r["tpot_s"]
        row = ["all" if r["rate"] is None else f"{r['rate']:g}", f"{r['throughput_tok_s']:.1f}",
               *(f"{t[k] * 1e3:.0f}ms" for k in ("mean", "p50", "p90", "p99")),
               *(f"{p[k] * 1e3:.1f}ms" for k in ("mean", "p50", "p90", "p99")),
               f"{r['kv_waste']:.1%}", str(r["peak_running"]), str(r["preemptions"]), f"{r['host_share']:.1%}",
               f"{r['device_idle_share']:.1%}", str(r["compiles_during_run"])]
        print(" ".join(f"{c:>10}" for c in row))


def cli() -> None:
    """The `jaxinfer-bench-batching` console script (the same as python -m jaxinfer.experiments.bench_batching)."""
    common.run(main)


if __name__ == "__main__":
    cli()
