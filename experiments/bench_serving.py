"""Serving benchmark over HTTP: a load generator against the OpenAI-compatible server, beside the
same workload run in-process, so the server's own overhead is visible.

  python -m jaxinfer.experiments.bench_serving --model=tiny                    # rates 20,100,1000 and 64 clients
  python -m jaxinfer.experiments.bench_serving --model=tiny --rates=2,4 --concurrency= --num_requests=32
  python -m jaxinfer.experiments.bench_serving --model=smollm2-135m --dequantize --rates=1 --markdown=/tmp/serving.md
  python -m jaxinfer.experiments.bench_serving --url=http://localhost:8000 --model=tiny   # a server started elsewhere

The workload is bench_batching's (--prompt_dist, --output_dist, --prompt_len, --output_len, --sigma,
--max_len, or --workload_file): prompts of held-out text as token ids, each generating exactly its
drawn output length (EOS ignored, greedy). Two kinds of load: open loop, requests arriving as a
Poisson process at each of --rates (requests/s, real time; by default 20, 100 and 1,000, past what
the CPU keeps up with), and closed loop, --concurrency clients each sending its next request when
its last one ends (vLLM's benchmark's --max-concurrency; by default 64). Each request is a
streaming client (asyncio + aiohttp, as vLLM's benchmark: a third of httpx's CPU per streamed token,
which matters where the load generator shares the machine) that timestamps every chunk: TTFT is first chunk minus arrival
(closed loop: minus the moment it was sent), TPOT the time per token after the first, end-to-end
the last chunk minus arrival; throughput is output tokens over the wall time from the first
arrival to the last completion.

The same load is first run in-process: Engine.add_request at each arrival time (closed loop: when
a request ends), step() while anything runs, the first and last token of each request timed as
step() returns them. Then the server is started over an engine of the same config, by --engine
(serve's flag): 'process', an engine core process of its own (jaxinfer/serving/core.py), or
'thread', the engine of the in-process run in a thread of this process; uvicorn serves it from a
thread of this process on a free localhost port; with --url the requests go to that server
instead (it must serve --model). Every engine compiles first (--warmup, as in bench_batching; an
engine core compiles the buckets, or, with replay, is sent the workload once unmeasured), so no
run pays for compiling: the `compiles` column counts the programs compiled during a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time

from absl import flags

import jaxinfer as ji
from jaxinfer.engine import runner as runner_lib

from . import bench_batching, common, serve

FLAGS = flags.FLAGS
flags.DEFINE_string("url", "", "Send the requests to the server at this URL ('' = start one in this process).")
flags.DEFINE_bool("in_process", True, "Also run the workload in-process (Engine.add_request / step) for comparison.")
flags.DEFINE_string("markdown", "", "Write the markdown table to this file ('' = print it only).")
flags.DEFINE_list("concurrency", ["64"], "Closed-loop runs: this many clients, each sending its next request when its "
                  "last one ends ('' = none).")
flags.DEFINE_list("engine_cpus", [], "Pin the engine to these CPUs and this process (its in-process runs' engine "
                  "too, unless --engine=process) to the others: with --engine=process, the engine core gets these "
                  "CPUs and the HTTP server and the load generator the rest, while the in-process runs' engine gets "
                  "the rest alone ('' = no pinning). Give as many CPUs as remain, so both engines get equal shares.")
DEFAULT_RATES = (20.0, 100.0, 1000.0)
_START_CPUS = frozenset(os.sched_getaffinity(0))  # without --rates: up to saturation on the tiny model
for _name in ("model", "dtype", "seed", "out", "num_requests", "prompt_len", "output_len", "rates", "prompt_dist",
              "output_dist", "sigma", "max_len", "workload_file", "warmup", "dequantize", "lora", "served_model_name",
              "default_timeout_s", "engine", *serve.SERVE_FLAGS, *common.ENGINE_FLAGS, *common.SPEC_FLAGS):
    flags.declare_key_flag(_name)


def summarize(mode: str, load: str, timings: list[dict], wall: float) -> dict:
    """Throughput and TTFT / TPOT / end-to-end percentiles of one run's per-request timings."""
    generated = sum(t["tokens"] for t in timings)
    return {"mode": mode, "load": load, "wall_s": wall, "generated_tokens": generated,
            "throughput_tok_s": generated / wall,
            "ttft_s": bench_batching.percentiles([t["ttft_s"] for t in timings]),
            "tpot_s": bench_batching.percentiles([t["tpot_s"] for t in timings if t["tokens"] > 1]),
            "latency_s": bench_batching.percentiles([t["latency_s"] for t in timings]),
            "requests": timings}


def timing(arrival: float, first: float, last: float, tokens: int) -> dict:
    """One request's figures; times in seconds from the start of the run."""
    return {"arrival_s": arrival, "ttft_s": first - arrival, "latency_s": last - arrival, "tokens": tokens,
            "tpot_s": (last - first) / (tokens - 1) if tokens > 1 else 0.0}


def wall_time(timings: list[dict]) -> float:
    """Seconds from the start of the run to the last request's last token."""
    return max(t["arrival_s"] + t["latency_s"] for t in timings)


def run_in_process(engine: ji.Engine, workload: list, clients: int | None = None) -> list[dict]:
    """The workload through engine.add_request / step() in real time, by its arrival times, or
    (clients) with that many requests in flight; per-request timings, in workload order."""
    pending = sorted(range(len(workload)), key=lambda i: workload[i].arrival_s)
    index: dict[int, int] = {}
    arrival: dict[int, float] = {}
    first: dict[int, float] = {}
    done: dict[int, dict] = {}
    start = time.perf_counter()

    def add(i: int, now: float) -> None:
        sp = ji.SamplingParams(max_tokens=workload[i].output_len, temperature=0.0, ignore_eos=True)
        index[engine.add_request(workload[i].prompt, sp)] = i
        arrival[i] = now if clients else workload[i].arrival_s

    if clients:
        for _ in range(min(clients, len(pending))):
            add(pending.pop(0), 0.0)
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while not clients and pending and workload[pending[0]].arrival_s <= now:
            add(pending.pop(0), now)
        if not engine.has_unfinished():
            time.sleep(max(0.0, workload[pending[0]].arrival_s - (time.perf_counter() - start)))
            continue
        outs = engine.step()
        now = time.perf_counter() - start
        for out in outs:
            i = index[out.request_id]
            first.setdefault(i, now)
            if out.finished:
                done[i] = timing(arrival[i], first[i], now, len(out.token_ids))
                if clients and pending:
                    add(pending.pop(0), now)
    return [done[i] for i in range(len(workload))]


async def _stream(http, url: str, model: str, req) -> tuple[float, float, int]:
    """One streaming request: when its first and last chunks with tokens came (perf_counter) and its
    tokens (the usage chunk's)."""
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    first = last = None
    tokens = 0
    async with http.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise ValueError(f"the server answered {r.status}: {(await r.read()).decode()[:500]}")
        async for line in r.content:  # one SSE line at a time
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            if "error" in chunk:
                raise ValueError(f"the server failed a request: {chunk['error']['message']}")
            if chunk["choices"]:
                last = time.perf_counter()
                first = last if first is None else first
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, last, tokens


async def _run_http(url: str, model: str, workload: list, clients: int | None) -> list[dict]:
    import aiohttp  # noqa: PLC0415  (the optional [serve] extra)

    n = clients or len(workload)
    timings: list[dict | None] = [None] * len(workload)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n),
                                     timeout=aiohttp.ClientTimeout(total=None)) as http:
        start = time.perf_counter()

        async def one(i: int, arrival: float | None) -> None:
            if arrival is None:  # open loop: at its arrival time
                arrival = workload[i].arrival_s
                await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
            first, last, tokens = await _stream(http, url, model, workload[i])
            timings[i] = timing(arrival, first - start, last - start, tokens)

        if clients is None:
            await asyncio.gather(*(one(i, None) for i in range(len(workload))))
        else:
            order = iter(range(len(workload)))

            async def client():
                for i in order:
                    await one(i, time.perf_counter() - start)

            await asyncio.gather(*(client() for _ in range(min(clients, len(workload)))))
    return timings


def run_http(url: str, model: str, workload: list, clients: int | None = None) -> list[dict]:
    """The workload as streaming clients against the server at url (open or closed loop)."""
    return asyncio.run(_run_http(url, model, workload, clients))


def measured(mode: str, load: str, run, compiles) -> dict:
    """summarize() of run(), with the programs compiled during it (compiles(): the count so far)."""
    before = compiles()
    timings = run()
    result = summarize(mode, load, timings, wall_time(timings))
    result["compiles_during_run"] = compiles() - before
    return result


def local_compiles() -> int:
    return sum(runner_lib.TRACE_COUNTS.values())


def warm_up(engine: ji.Engine, workloads: list[list]) -> float:
    """Compile what the workloads need (bench_batching's --warmup); returns the seconds it took."""
    t0 = time.perf_counter()
    if FLAGS.warmup == "replay":
        for w in workloads:
            run_in_process(engine, [type(r)(0.0, r.prompt, r.output_len) for r in w])
    else:
        engine.warmup(*warmup_lengths(workloads, engine.max_seq_len))
    return time.perf_counter() - t0


def warmup_lengths(workloads: list[list], context: int) -> tuple[int, int]:
    """Engine.warmup's (max_prompt_len, max_len) for these workloads, in a context of `context`."""
    every = [r for w in workloads for r in w]
    return max(len(r.prompt) for r in every), min(max(len(r.prompt) + r.output_len for r in every), context)


@contextlib.contextmanager
def started_server(model: ji.Model, engine: ji.Engine | None, workloads: list[list], name: str):
    """(url, compiles()) of the server the runs go to: --url, or one started here over --engine
    (thread: `engine`, which the in-process runs use too, while the server's loop waits)."""
    if FLAGS.url:
        yield FLAGS.url, lambda: 0
        return
    from jaxinfer.serving import server  # noqa: PLC0415  (fastapi and uvicorn are an optional extra)

    if FLAGS.engine == "thread":
        with server.BackgroundServer(server.build_app(engine, name)) as s:
            yield s.url, local_compiles
        return
    context = FLAGS.max_seq_len or model.config.max_position_embeddings
    warmup = None if FLAGS.warmup == "replay" else warmup_lengths(workloads, context)
    client, procs = serve.start_cores(serve.core_spec(warmup=warmup), cpus=engine_cpus())
    try:
        with server.BackgroundServer(server.build_app(client, name)) as s:
            if FLAGS.warmup == "replay":
                for w in workloads:
                    run_http(s.url, name, [type(r)(0.0, r.prompt, r.output_len) for r in w])
            yield s.url, lambda: client.snapshot.get("compiles", 0)
    finally:
        for p in procs:
            p.stop()


def engine_cpus() -> tuple[int, ...]:
    """--engine_cpus as CPU numbers, each one this process could run on at its start, leaving it at least one."""
    cpus = tuple(sorted({int(c) for c in FLAGS.engine_cpus})) if FLAGS.engine_cpus else ()
    allowed = _START_CPUS
    if cpus and (not set(cpus) < allowed):
        raise ValueError(f"--engine_cpus={','.join(FLAGS.engine_cpus)}: must be some, not all, of this process's "
                         f"CPUs {sorted(allowed)}")
    return cpus


def check_flags() -> list[tuple[str, float | None, int | None]]:
    """Refuse bad flags and missing extras before any work; returns the loads: (label, rate, clients)."""
    common.require("experiments.bench_serving", "aiohttp", *(() if FLAGS.url else ("fastapi", "uvicorn")))
    rates = bench_batching.parse_rates() if FLAGS["rates"].present else list(DEFAULT_RATES)
    clients = []
    for c in FLAGS.concurrency:
        if not c.isdigit() or int(c) < 1:
            raise ValueError(f"--concurrency: {c!r} is not a number of clients >= 1")
        clients.append(int(c))
    bench_batching.check_workload_flags()
    serve.adapters()
    return [(f"rate={r:g}", r, None) for r in rates] + [(f"concurrency={c}", None, c) for c in clients]


def main(argv):
    del argv
    loads = check_flags()
    if FLAGS.engine_cpus:  # before JAX starts its threads: they inherit it
        os.sched_setaffinity(0, os.sched_getaffinity(0) - set(engine_cpus()))
    model = serve.load_model()
    rate_of = {label: rate for label, rate, _ in loads}
    workloads = {label: bench_batching.make_workload(rate if rate is not None else 1.0, model)
                 for label, rate, _ in loads}
    in_process = FLAGS.in_process or (not FLAGS.url and FLAGS.engine == "thread")
    engine = serve.build_engine(model) if in_process else None
    warm_s = warm_up(engine, list(workloads.values())) if engine else 0.0
    print(f"compiled in {warm_s:.1f} s (--warmup={FLAGS.warmup}); then each run in real time: "
          f"{', '.join(f'{label}: {len(w)} requests' for label, w in workloads.items())}", flush=True)
    name = FLAGS.served_model_name or model.name
    results = []
    with started_server(model, engine, list(workloads.values()), name) as (url, compiles):
        for label, _, clients in loads:  # in-process then server at each load: drift in the machine's load hits both
            if FLAGS.in_process:
                results.append(measured("in-process", label,
                                        lambda: run_in_process(engine, workloads[label], clients), local_compiles))
            results.append(measured("server", label, lambda: run_http(url, name, workloads[label], clients), compiles))
    results.sort(key=lambda r: ([x[0] for x in loads].index(r["load"]), r["mode"] != "in-process"))
    env_extra = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "warmup_s": warm_s,
                 "server_engine": "url" if FLAGS.url else FLAGS.engine, "engine_cpus": list(engine_cpus()),
                 "bench_cpus": sorted(os.sched_getaffinity(0))}
    summaries = {f"{r['mode']}/{r['load']}": {k: v for k, v in r.items() if k not in ("requests", "mode", "load")}
                 for r in results}
    for r in results:
        r["rate"] = rate_of[r["load"]]
    record = common.record(__name__, summaries, results=results, host=env_extra)
    table = markdown(results, record["env"]["device"])
    print(table)
    if FLAGS.markdown:
        common.write_text(FLAGS.markdown, table)
    if FLAGS.out:
        common.write_json(FLAGS.out, record)


def markdown(results: list[dict], device: str) -> str:
    """One row per load (rate or clients) and mode; beside each server row, its throughput and TTFT p50 against in-process."""
    server = "url" if FLAGS.url else f"--engine={FLAGS.engine}"
    lines = [f"{FLAGS.model}, {FLAGS.num_requests} requests per load, max_batch={FLAGS.max_batch}, server {server}, "
             f"on {device}", "",
             "| load | mode | tok/s | vs in-process | TTFT p50 | p90 | p99 | TPOT p50 | p90 | e2e p50 | p90 "
             "| p99 | compiles |", "|" + "---|" * 13]
    base = {r["load"]: r for r in results if r["mode"] == "in-process"}
    for r in results:
        t, p, e = r["ttft_s"], r["tpot_s"], r["latency_s"]
        ref = base.get(r["load"])
        versus = "" if ref is None or ref is r else (f"{r['throughput_tok_s'] / ref['throughput_tok_s'] - 1:+.1%} tok/s, "
                                                     f"TTFT p50 {(t['p50'] - ref['ttft_s']['p50']) * 1e3:+.1f} ms")
        ms = [f"{x * 1e3:.1f} ms" for x in (t["p50"], t["p90"], t["p99"], p["p50"], p["p90"], e["p50"], e["p90"],
                                            e["p99"])]
        lines.append(f"| {r['load']} | {r['mode']} | {r['throughput_tok_s']:.1f} | {versus} | " + " | ".join(ms)
                     + f" | {r.get('compiles_during_run', '')} |")
    return "\n".join(lines)


def cli() -> None:
    """The `jaxinfer-bench-serving` console script (the same as python -m jaxinfer.experiments.bench_serving)."""
    common.run(main)


if __name__ == "__main__":
    cli()
