"""Serving benchmark over HTTP: a load generator against the OpenAI-compatible server, beside the
same workload run in-process, so the server's own overhead is visible.

  python -m jaxinfer.experiments.bench_serving --model=tiny --rates=2,4 --num_requests=32
  python -m jaxinfer.experiments.bench_serving --model=smollm2-135m --dequantize --rates=1 --markdown=/tmp/serving.md
  python -m jaxinfer.experiments.bench_serving --url=http://localhost:8000 --model=tiny   # a server started elsewhere

The workload is bench_batching's (--prompt_dist, --output_dist, --prompt_len, --output_len, --sigma,
--max_len, or --workload_file): prompts of held-out text as token ids, each generating exactly its
drawn output length (EOS ignored, greedy), arriving as a Poisson process at each of --rates
(requests/s, real time). Each request is a streaming client (asyncio + httpx) that sends at its
arrival time and timestamps every chunk: TTFT is first chunk minus arrival, TPOT the time per
token after the first, end-to-end the last chunk minus arrival; throughput is output tokens over
the wall time from the first arrival to the last completion.

The same schedule is first replayed in-process: Engine.add_request at each arrival time, step()
while anything runs, the first and last token of each request timed as step() returns them. Then
the server is started in this process (uvicorn in a thread, a free localhost port) over the same
engine, its compiled programs warm, and the workload is sent over HTTP; with --url the requests go
to that server instead (it must serve --model). The engine compiles first (--warmup, as in
bench_batching), so neither run pays for compiling.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
for _name in ("model", "dtype", "seed", "out", "num_requests", "prompt_len", "output_len", "rates", "prompt_dist",
              "output_dist", "sigma", "max_len", "workload_file", "warmup", "dequantize", "lora", "served_model_name",
              "default_timeout_s", *serve.SERVE_FLAGS, *common.ENGINE_FLAGS, *common.SPEC_FLAGS):
    flags.declare_key_flag(_name)


def summarize(mode: str, rate: float, timings: list[dict], wall: float) -> dict:
    """Throughput and TTFT / TPOT / end-to-end percentiles of one run's per-request timings."""
    generated = sum(t["tokens"] for t in timings)
    return {"mode": mode, "rate": rate, "wall_s": wall, "generated_tokens": generated,
            "throughput_tok_s": generated / wall,
            "ttft_s": bench_batching.percentiles([t["ttft_s"] for t in timings]),
            "tpot_s": bench_batching.percentiles([t["tpot_s"] for t in timings if t["tokens"] > 1]),
            "latency_s": bench_batching.percentiles([t["latency_s"] for t in timings]),
            "requests": timings}


def measured(mode: str, rate: float, run) -> dict:
    """summarize() of run(), with the programs compiled during it (0 when the warm-up covered it)."""
    traces = sum(runner_lib.TRACE_COUNTS.values())
    result = summarize(mode, rate, *run())
    result["compiles_during_run"] = sum(runner_lib.TRACE_COUNTS.values()) - traces
    return result


def timing(arrival: float, first: float, last: float, tokens: int) -> dict:
    return {"ttft_s": first - arrival, "latency_s": last - arrival, "tokens": tokens,
            "tpot_s": (last - first) / (tokens - 1) if tokens > 1 else 0.0}


def run_in_process(engine: ji.Engine, workload: list) -> tuple[list[dict], float]:
    """The workload through engine.add_request / step() in real time; per-request timings and wall time."""
    pending = sorted(range(len(workload)), key=lambda i: workload[i].arrival_s)
    index: dict[int, int] = {}
    first: dict[int, float] = {}
    done: dict[int, dict] = {}
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and workload[pending[0]].arrival_s <= now:
            i = pending.pop(0)
            sp = ji.SamplingParams(max_tokens=workload[i].output_len, temperature=0.0, ignore_eos=True)
            index[engine.add_request(workload[i].prompt, sp)] = i
        if not engine.has_unfinished():
            time.sleep(max(0.0, workload[pending[0]].arrival_s - (time.perf_counter() - start)))
            continue
        outs = engine.step()
        now = time.perf_counter() - start
        for out in outs:
            i = index[out.request_id]
            first.setdefault(i, now)
            if out.finished:
                done[i] = timing(workload[i].arrival_s, first[i], now, len(out.token_ids))
    timings = [done[i] for i in range(len(workload))]
    return timings, wall_time(timings, workload)


def wall_time(timings: list[dict], workload: list) -> float:
    """Seconds from the start of the schedule to the last request's last token."""
    return max(t["latency_s"] + r.arrival_s for t, r in zip(timings, workload))


async def _request(http, model: str, req, start: float) -> dict:
    """One streaming request sent at its arrival time; its timings from the chunks' arrival."""
    await asyncio.sleep(max(0.0, start + req.arrival_s - time.perf_counter()))
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    first = last = None
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise ValueError(f"the server answered {r.status_code}: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise ValueError(f"the server failed a request: {chunk['error']['message']}")
            if chunk["choices"]:
                last = time.perf_counter() - start
                first = last if first is None else first
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return timing(req.arrival_s, first, last, tokens)


async def _run_http(url: str, model: str, workload: list) -> tuple[list[dict], float]:
    import httpx  # noqa: PLC0415  (the optional [serve] extra)

    limits = httpx.Limits(max_connections=len(workload), max_keepalive_connections=len(workload))
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        start = time.perf_counter()
        timings = await asyncio.gather(*(_request(http, model, r, start) for r in workload))
    return list(timings), wall_time(timings, workload)


def run_http(url: str, model: str, workload: list) -> tuple[list[dict], float]:
    """The workload as concurrent streaming clients against the server at url."""
    return asyncio.run(_run_http(url, model, workload))


def warm_up(engine: ji.Engine, workloads: list[list]) -> float:
    """Compile what the workloads need (bench_batching's --warmup); returns the seconds it took."""
    t0 = time.perf_counter()
    if FLAGS.warmup == "replay":
        for w in workloads:
            run_in_process(engine, [type(r)(0.0, r.prompt, r.output_len) for r in w])
    else:
        every = [r for w in workloads for r in w]
        engine.warmup(max_prompt_len=max(len(r.prompt) for r in every),
                      max_len=min(max(len(r.prompt) + r.output_len for r in every), engine.max_seq_len))
    return time.perf_counter() - t0


def check_flags() -> list[float]:
    """Refuse bad flags and missing extras before any work; returns the arrival rates."""
    common.require("experiments.bench_serving", "httpx", *(() if FLAGS.url else ("fastapi", "uvicorn")))
    rates = bench_batching.parse_rates()
    bench_batching.check_workload_flags()
    serve.adapters()
    return rates


def main(argv):
    del argv
    rates = check_flags()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request
    from jaxinfer.serving import server  # noqa: PLC0415  (fastapi and uvicorn are an optional extra)

    model = serve.load_model()
    workloads = [bench_batching.make_workload(rate, model) for rate in rates]
    results = []
    engine = serve.build_engine(model) if FLAGS.in_process or not FLAGS.url else None
    warm_s = warm_up(engine, workloads) if engine else 0.0
    print(f"compiled in {warm_s:.1f} s (--warmup={FLAGS.warmup}); then each run in real time: "
          f"{', '.join(f'{len(w)} requests over {w[-1].arrival_s:.1f} s' for w in workloads)}", flush=True)
    name = FLAGS.served_model_name or model.name
    for rate, w in zip(rates, workloads):  # in-process then server at each rate: drift in the machine's load hits both
        if FLAGS.in_process:
            results.append(measured("in-process", rate, lambda: run_in_process(engine, w)))
        if FLAGS.url:
            results.append(measured("server", rate, lambda: run_http(FLAGS.url, name, w)))
        else:
            with server.BackgroundServer(server.build_app(engine, name)) as s:
                results.append(measured("server", rate, lambda: run_http(s.url, name, w)))
    results.sort(key=lambda r: (r["rate"], r["mode"] != "in-process"))
    env_extra = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "warmup_s": warm_s}
    summaries = {f"{r['mode']}/rate={r['rate']:g}": {k: v for k, v in r.items() if k not in ("requests", "mode")}
                 for r in results}
    record = common.record(__name__, summaries, results=results, host=env_extra)
    table = markdown(results, record["env"]["device"])
    print(table)
    if FLAGS.markdown:
        common.write_text(FLAGS.markdown, table)
    if FLAGS.out:
        common.write_json(FLAGS.out, record)


def markdown(results: list[dict], device: str) -> str:
    """One row per rate and mode; beside each server row, its throughput and TTFT p50 against in-process."""
    lines = [f"{FLAGS.model}, {FLAGS.num_requests} requests per rate, max_batch={FLAGS.max_batch}, on {device}", "",
             "| rate (req/s) | mode | tok/s | vs in-process | TTFT p50 | p90 | p99 | TPOT p50 | p90 | e2e p50 | p90 "
             "| p99 | compiles |", "|" + "---|" * 13]
    base = {r["rate"]: r for r in results if r["mode"] == "in-process"}
    for r in results:
        t, p, e = r["ttft_s"], r["tpot_s"], r["latency_s"]
        ref = base.get(r["rate"])
        versus = "" if ref is None or ref is r else (f"{r['throughput_tok_s'] / ref['throughput_tok_s'] - 1:+.1%} tok/s, "
                                                     f"TTFT p50 {(t['p50'] - ref['ttft_s']['p50']) * 1e3:+.1f} ms")
        ms = [f"{x * 1e3:.1f} ms" for x in (t["p50"], t["p90"], t["p99"], p["p50"], p["p90"], e["p50"], e["p90"],
                                            e["p99"])]
        lines.append(f"| {r['rate']:g} | {r['mode']} | {r['throughput_tok_s']:.1f} | {versus} | " + " | ".join(ms)
                     + f" | {r.get('compiles_during_run', '')} |")
    return "\n".join(lines)


def cli() -> None:
    """The `jaxinfer-bench-serving` console script (the same as python -m jaxinfer.experiments.bench_serving)."""
    common.run(main)


if __name__ == "__main__":
    cli()
