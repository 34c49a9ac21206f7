"""The engine core in its own process (jaxinfer/serving/core.py) behind the server: what crosses the
process boundary arrives intact (tokens, text, logprobs, n samples, LoRA adapters, refusals,
deadlines); one core serves several API servers, and an API server killed outright leaves the core
and the other API servers serving, its requests' pages back; a core that dies is a 503, not a hang;
a client that leaves frees its pages; two replicas behind one API, with the prefix-aware balancer
sending a request to the replica that holds its prompt's prefix in its cache. (The whole server
suite runs against the split server too: tests/test_server.py, slow tier.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from helpers import REPO

import jaxinfer as ji
from jaxinfer import data, lora
from jaxinfer.serving import core, core_client, server
from jaxinfer.serving.limits import ServerLimits

PROMPT = "def fibonacci(n):"
CONFIG = ji.EngineConfig(max_adapters=2, max_lora_rank=8, num_pages=24)  # 24 pages of 16: 384 tokens of KV


@pytest.fixture(scope="module")
def model():
    return ji.load_model("tiny")


@pytest.fixture(scope="module")
def adapter(model):
    return lora.random_adapter(model.config, 8, std=0.5, seed=3)


@pytest.fixture(scope="module")
def reference(model, adapter):
    engine = ji.Engine(model, CONFIG)
    engine.add_adapter("ada", adapter)
    return engine


@pytest.fixture(scope="module")
def engine_core(model, adapter):
    """One engine core process for the module; it forgets an API server after 2 s of silence."""
    proc = core.spawn_core(core.CoreSpec(model, CONFIG, adapters={"ada": adapter}), client_timeout_s=2.0)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def served(engine_core):
    app = server.build_app(core_client.CoreClient(engine_core.address, process=engine_core))
    with server.BackgroundServer(app) as s:
        yield s


def _health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


def _wait(url: str, done, limit_s: float = 60.0) -> dict:
    """/health once done(health) holds (a bound, not a timing check)."""
    deadline = time.monotonic() + limit_s
    while True:
        h = _health(url)
        if done(h):
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {limit_s} s: {h}")
        time.sleep(0.05)


def _idle(h: dict) -> bool:
    return h["running"] == 0 and h["waiting"] == 0 and h["pages_in_use"] == 0


def test_outputs_cross_the_boundary_intact(served, reference):
    """Greedy text, stop strings, n samples streamed and whole, logprobs and LoRA adapters: the
    engine's own outputs, decoded in the API server."""
    c = openai.OpenAI(base_url=served.url + "/v1", api_key="-", max_retries=0)
    for stop, adapter in ((None, None), ("    ", None), (None, "ada")):
        r = c.completions.create(model=adapter or "tiny", prompt=PROMPT, max_tokens=24, temperature=0, logprobs=2,
                                 stop=stop)
        (want,) = reference.generate([PROMPT], ji.SamplingParams(max_tokens=24, temperature=0.0, logprobs=2,
                                                                 stop=() if stop is None else (stop,)),
                                     adapters=[adapter])
        assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
        assert r.choices[0].logprobs.token_logprobs == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-5)
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop="    ")
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 24  # the stop string ended it
    whole = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0.8, seed=5, n=2)
    chunks = list(c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0.8, seed=5, n=2,
                                       stream=True))
    for i in range(2):
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == i) == \
            whole.choices[i].text
    assert whole.choices[0].text != whole.choices[1].text


def test_refusals_adapters_and_deadlines_cross_the_boundary(served, engine_core, adapter, reference):
    """The core's engine refuses a prompt its KV cannot hold (400 naming the prompt); an adapter
    added through the client serves; a second API server on the same core, with a short deadline,
    ends its request with "timeout" while the first serves on."""
    c = openai.OpenAI(base_url=served.url + "/v1", api_key="-", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="the KV cache holds 384"):
        c.completions.create(model="tiny", prompt=[5] * 400, max_tokens=2)
    client = served.server.config.app.state.engine_loop
    client.call("add_adapter", "bea", adapter).result(timeout=60)
    assert [m.id for m in c.models.list()] == ["tiny", "ada", "bea"]
    r = c.completions.create(model="bea", prompt=PROMPT, max_tokens=8, temperature=0)
    (want,) = reference.generate([PROMPT], ji.SamplingParams(max_tokens=8, temperature=0.0), adapters=["ada"])
    assert r.choices[0].text == want.text
    with pytest.raises(ValueError, match="nope"):  # the engine's refusal comes back through the future
        client.call("remove_adapter", "nope").result(timeout=60)
    hasty = server.build_app(core_client.CoreClient(engine_core.address), limits=ServerLimits(request_timeout_s=0.2))
    with server.BackgroundServer(hasty) as s:
        c2 = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        r = c2.completions.create(model="tiny", prompt=PROMPT, max_tokens=500, temperature=0, extra_body={
            "ignore_eos": True})
        assert r.choices[0].finish_reason == "timeout" and 0 < r.usage.completion_tokens < 495
        assert c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4).usage.completion_tokens == 4
    _wait(served.url, _idle)


def test_a_client_leaving_frees_its_pages_in_the_core(served):
    start = _wait(served.url, _idle)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 300, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=served.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            got = [line for line, _ in zip((x for x in r.iter_lines() if x.startswith("data: ")), range(3))]
            assert len(got) == 3
            assert _health(served.url)["pages_in_use"] > 0
    end = _wait(served.url, _idle)
    assert end["aborted"] == start["aborted"] + 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_killing_an_api_server_leaves_the_core_and_the_others_serving(model):
    """An API server process (experiments.serve --engine_cores) killed with SIGKILL mid-stream: the
    core and the other API server serve on, and the core aborts the dead one's request when its
    connection closes, not after the client timeout (600 s here, longer than the test may wait): its
    pages come back. (The core's attention runs as the interpreted Pallas kernel, about 20 ms a step,
    so the 480-token request would otherwise run for seconds.)"""
    proc = core.spawn_core(core.CoreSpec(model, ji.EngineConfig(attention="pallas")), client_timeout_s=600.0)
    port = _free_port()
    api = None
    try:
        app = server.build_app(core_client.CoreClient(proc.address, process=proc))
        with server.BackgroundServer(app) as served:
            api = subprocess.Popen([sys.executable, "-m", "experiments.serve", f"--engine_cores={proc.address}",
                                    f"--port={port}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert api.poll() is None and time.monotonic() < deadline, "the API server did not start"
                time.sleep(0.2)
            start = _wait(served.url, _idle)
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 480, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions",
                                                                           json=body) as r:
                next(x for x in r.iter_lines() if x.startswith("data: "))
                os.kill(api.pid, signal.SIGKILL)
                api.wait(30)
            c = openai.OpenAI(base_url=served.url + "/v1", api_key="-", max_retries=0)
            assert c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4).usage.completion_tokens == 4
            end = _wait(served.url, _idle, limit_s=30)  # the request alone would run for seconds more
            assert end["aborted"] == start["aborted"] + 1 and proc.exit_code() is None
    finally:
        if api is not None:
            api.kill()
            api.wait()
        proc.stop()


def test_an_engine_core_that_dies_is_a_503_not_a_hang(model):
    proc = core.spawn_core(core.CoreSpec(model))
    try:
        app = server.build_app(core_client.CoreClient(proc.address, process=proc))
        with server.BackgroundServer(app) as s:
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 480, "temperature": 0, "ignore_eos": True}

            async def in_flight():
                async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                    whole = asyncio.ensure_future(http.post("/v1/completions", json=body))
                    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        lines = r.aiter_lines()
                        first = await anext(x async for x in lines if x.startswith("data: "))
                        assert "choices" in first
                        proc.process.kill()
                        rest = [x async for x in lines if x.startswith("data: ")]
                    return await whole, rest

            whole, rest = asyncio.run(asyncio.wait_for(in_flight(), 60))
            assert whole.status_code == 503 and "engine core" in whole.json()["error"]["message"]
            assert "engine core" in json.loads(rest[-1][len("data: "):])["error"]["message"]
            r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=30)
            assert r.status_code == 503
            assert httpx.get(s.url + "/health", timeout=30).status_code == 503
    finally:
        proc.stop()


@pytest.mark.slow
def test_two_replicas_behind_one_api_and_the_prefix_aware_balancer(model):
    """Two engine cores (processes, each with its own CPU device) behind one Replicas: two
    different prompts go to different replicas, each prompt's continuation goes to the replica
    that served it and is served from its prefix cache there; the API serves through both."""
    procs = [core.spawn_core(core.CoreSpec(model)) for _ in range(2)]
    try:
        replicas = core_client.connect([p.address for p in procs], procs)
        text = data.heldout_stream(model.tokenizer).ids.tolist()
        a, b = text[:64], text[1000:1064]  # four full pages each

        async def run():
            replicas.start()
            try:
                outs = []
                for prompt in (a, b, a + text[64:70], b + text[1064:1070]):
                    rid, queue = await replicas.add(prompt, ji.SamplingParams(max_tokens=3, temperature=0.0),
                                                    stream=False)
                    outs.append((rid % 2, await queue.get()))
                return outs
            finally:
                replicas.stop()

        (ra, _), (rb, _), (ra2, out_a2), (rb2, out_b2) = asyncio.run(run())
        assert ra != rb and (ra2, rb2) == (ra, rb) and replicas.sent == [2, 2]
        assert out_a2.metrics["cached_tokens"] >= 48 and out_b2.metrics["cached_tokens"] >= 48
        app = server.build_app(core_client.connect([p.address for p in procs], procs))
        with server.BackgroundServer(app) as s:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
            for prompt in ("hi", "yo"):  # no full page: no prefix to follow, so the two replicas take turns
                assert c.completions.create(model="tiny", prompt=prompt, max_tokens=3).usage.completion_tokens == 3
            assert _health(s.url)["replicas"] == 2 and app.state.engine_loop.sent == [1, 1]
    finally:
        for p in procs:
            p.stop()


@pytest.mark.slow
def test_a_core_started_on_its_own_serves_api_servers_over_tcp(reference):
    """experiments.serve --core_only on a TCP address (as on another host), an API server connecting
    to it by address: the same greedy text as the engine; the core killed, the API answers 503."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "experiments.serve", "--model=tiny",
                             f"--core_only=tcp://127.0.0.1:{port}"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        client = core_client.CoreClient(f"tcp://127.0.0.1:{port}", connect_timeout_s=120)
        with server.BackgroundServer(server.build_app(client)) as s:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
            r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
            (want,) = reference.generate([PROMPT], ji.SamplingParams(max_tokens=8, temperature=0.0))
            assert r.choices[0].text == want.text
            proc.kill()
            proc.wait(30)
            _wait(s.url, lambda h: h["status"] == "error")
            with pytest.raises(openai.InternalServerError, match="503"):
                c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_engine_cores_of_a_jax_distributed_job_serve_one_api(reference):
    """Two engine cores as the processes of one jax.distributed job (as on two hosts): an API server
    given one core's address serves both (each gets a request); the second core killed, the first
    serves on (the job is recoverable) and /health counts one replica; SIGTERM stops a core."""
    coordinator, ports = _free_port(), [_free_port(), _free_port()]
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.serve", "--model=tiny", f"--core_only=tcp://*:{port}",
                               "--core_host=127.0.0.1", f"--coordinator=127.0.0.1:{coordinator}", "--num_processes=2",
                               f"--process_id={i}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i, port in enumerate(ports)]
    try:
        replicas = core_client.connect([f"tcp://127.0.0.1:{ports[1]}"], connect_timeout_s=120)
        assert isinstance(replicas, core_client.Replicas)
        assert [c.address for c in replicas.clients] == [f"tcp://127.0.0.1:{p}" for p in ports]
        app = server.build_app(replicas)
        with server.BackgroundServer(app) as s:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
            prompts = ["hi", "yo"]  # no full page of prompt: the replicas take turns
            want = [o.text for o in reference.generate(prompts, ji.SamplingParams(max_tokens=8, temperature=0.0))]
            for prompt, text in zip(prompts, want):
                r = c.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
                assert r.choices[0].text == text
            assert replicas.sent == [1, 1] and _health(s.url)["replicas"] == 2
            procs[1].kill()
            procs[1].wait(30)
            _wait(s.url, lambda h: h.get("replicas") == 1)
            for prompt, text in zip(prompts, want):
                r = c.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
                assert r.choices[0].text == text
            assert replicas.sent == [3, 1] and procs[0].poll() is None
        procs[0].terminate()  # a core told to stop, stops (JAX's preemption handler would swallow SIGTERM)
        procs[0].wait(60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
