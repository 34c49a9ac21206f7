"""The server's HTTP surface under generated and hostile traffic (slow tier).

A property-based test draws request bodies from the server's own /openapi.json (hypothesis-jsonschema)
and mutates some of them (unknown fields, dropped or retyped fields, random JSON): no answer is a
5xx, a body the published schema refuses (checked by jsonschema, an independent validator) is
always a 400, a body it accepts is served unless only the model can refuse it (its name, its
prompt's tokens), every error has OpenAI's shape; afterwards the server is healthy and the
engine's KV pages are all free. A second test runs `python -m experiments.serve` as a user
does and sends it oversized bodies, deep JSON nesting, huge token-id lists and a thousand concurrent
connections while two clients stream, measuring the process's memory throughout; it prints the
table in benchmarks/results/reliability.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import pytest
from helpers import REPO
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from test_server_hostile import AUTH, KEY, MB, _chunked_body, _declared_body, _stream

import jaxinfer as ji
from jaxinfer.serving import server
from jaxinfer.serving.limits import ServerLimits

pytestmark = pytest.mark.slow

TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
ROUTES = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest"}
# What a body the schema accepts may still be refused for: the model's own checks (its name, the prompt's tokens, a
# logit_bias id past the vocabulary) and the checks between fields a JSON schema cannot state (best_of against n,
# min_tokens against max_tokens, top_logprobs without logprobs, max_tokens 0 without echo, echo or prompt_logprobs with
# stream), and a structured output constraint that does not compile against the tokenizer (or names two).
MODEL_CHECKS = ("model", "prompt", "messages", "best_of", "logit_bias", "min_tokens", "top_logprobs", "max_tokens",
                "echo", "prompt_logprobs", "response_format", "structured_outputs")
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def fuzzed():
    """A server with a short context and few samples per request, so that every generated request
    is cheap to serve; its OpenAPI description; a strategy for each route's bodies."""
    engine = ji.Engine(ji.load_model("tiny"), ji.EngineConfig(max_seq_len=64))
    limits = ServerLimits(max_n=2, max_stop=3, max_messages=4)
    app = server.build_app(engine, chat_template=TEMPLATE, limits=limits, api_key=KEY)
    with server.BackgroundServer(app) as s:
        spec = httpx.get(s.url + "/openapi.json").json()
        components = {"components": spec["components"]}
        schemas = {path: {**spec["components"]["schemas"][name], **components} for path, name in ROUTES.items()}
        yield app, s, schemas, {path: from_schema(schema) for path, schema in schemas.items()}


def _mutate(data, body: dict) -> dict:
    """The body unchanged, or with one field added, dropped, or given a random JSON value."""
    kind = data.draw(st.sampled_from(["none", "none", "add", "drop", "retype"]))
    body = dict(body)
    if kind == "add":
        body[data.draw(st.text(min_size=1, max_size=12))] = data.draw(JSON)
    elif kind == "drop" and body:
        body.pop(data.draw(st.sampled_from(sorted(body))))
    elif kind == "retype" and body:
        body[data.draw(st.sampled_from(sorted(body)))] = data.draw(JSON)
    return body


def _check_answer(r: httpx.Response, stream: bool) -> None:
    """A 200 holds a response (or a stream of chunks ending in [DONE]); anything else OpenAI's error body."""
    if r.status_code != 200:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["type"] == "invalid_request_error"
        assert error["param"] is None or isinstance(error["param"], str)
        return
    if not stream:
        assert r.json()["choices"]
        return
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all("choices" in json.loads(e) for e in events[:-1])


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(data=st.data())
def test_requests_drawn_from_the_openapi_description_get_no_5xx(fuzzed, data):
    _, s, schemas, bodies = fuzzed
    path = data.draw(st.sampled_from(sorted(ROUTES)))
    body = data.draw(bodies[path])
    model = data.draw(st.sampled_from(["tiny", None, "keep"]))  # mostly a model that exists
    if model != "keep":
        body.pop("model", None)
        body.update({"model": model} if model else {})
    body = _mutate(data, body)
    valid = jsonschema.Draft202012Validator(schemas[path]).is_valid(body)
    r = httpx.post(s.url + path, json=body, headers=AUTH, timeout=300)
    assert r.status_code in (200, 400), (body, r.status_code, r.text[:500])
    param = r.json()["error"]["param"] if r.status_code == 400 else ""
    event(f"{'valid' if valid else 'invalid'} body: {r.status_code} "
          f"{param if param in schemas[path]['properties'] or not param else 'unknown field'}")  # for
    # --hypothesis-show-statistics
    _check_answer(r, r.status_code == 200 and body.get("stream") is True)
    if not valid:
        assert r.status_code == 400, body  # what the published schema refuses, the server refuses
    elif r.status_code == 400:
        assert r.json()["error"]["param"] in MODEL_CHECKS, (body, r.text)


def test_after_the_fuzzing_the_server_is_healthy_and_every_page_is_free(fuzzed):
    app, s, _, _ = fuzzed
    deadline = time.monotonic() + 120
    while (h := httpx.get(s.url + "/health").json())["running"] or h["waiting"] or h["in_flight"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["status"] == "ok"
    free, total = app.state.engine_loop.submit(lambda e: (e.allocator.num_free, e.allocator.num_pages)).result(60)
    assert free == total == h["pages_free"]
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=AUTH, timeout=60)
    assert r.status_code == 200


# The `experiments.serve` process under hostile traffic -------------------------------------------

CONNECTIONS = 4000


def _memory(pid: int) -> tuple[int, int]:
    """The process's resident memory now and at its peak (VmRSS, VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return tuple(int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _many(url: str, n: int, body: bytes) -> dict[int, int]:
    """`n` connections at once, each sending one request; how many got each status."""
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {KEY}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")
    request = head.encode() + body

    async def one() -> int:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        await reader.read()
        writer.close()
        return status

    statuses = await asyncio.gather(*(one() for _ in range(n)))
    return {s: statuses.count(s) for s in sorted(set(statuses))}


def test_hostile_traffic_against_the_serve_process():
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "JAXINFER_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.serve", "--model=tiny", f"--port={port}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        prompts, n = ["def fibonacci(n):", "class Stack:"], 300
        body = {"model": "tiny", "max_tokens": n, "temperature": 0, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(16) as pool:  # compiles what the attack will run
            want = list(pool.map(lambda p: httpx.post(url + "/v1/completions", json={**body, "prompt": p},
                                                      headers=AUTH, timeout=600).json()["choices"][0]["text"], prompts))
            list(pool.map(lambda _: httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                                               headers=AUTH, timeout=600), range(64)))
        rows = [("after start and warm-up", "", 0.0, *_memory(proc.pid))]
        logs = [[], []]
        threads = [threading.Thread(target=_stream, args=(url, p, n, log)) for p, log in zip(prompts, logs)]
        for t in threads:
            t.start()
        attacks = {
            "200 MB body, Content-Length declared": lambda: _declared_body(url, 200 * MB, AUTH)[0],
            "200 MB body, chunked": lambda: _chunked_body(url, 200 * MB, AUTH)[0].status_code,
            "4 MB of nested arrays": lambda: _post(url, b"[" * 2_000_000 + b"]" * 2_000_000),
            "4 MB of nesting in prompt": lambda: _post(url, b'{"prompt": ' + b"[" * 1_999_990 + b"]" * 1_999_990
                                                       + b"}"),
            "1.3 M token ids": lambda: _post(url, json.dumps({"prompt": [1] * 1_300_000}).encode()),
            "4 M-character prompt": lambda: _post(url, json.dumps({"prompt": "a" * 4_000_000}).encode()),
            "10 M-character prompt": lambda: _post(url, json.dumps({"prompt": "a" * 10_000_000}).encode()),
            f"{CONNECTIONS} connections at once": lambda: asyncio.run(
                _many(url, CONNECTIONS, json.dumps({"prompt": "x", "max_tokens": 1}).encode())),
        }
        for what, attack in attacks.items():
            start = time.monotonic()
            outcome = attack()
            rows.append((what, outcome, time.monotonic() - start, *_memory(proc.pid)))
        for t in threads:
            t.join(timeout=600)
        h = httpx.get(url + "/health").json()
        rows.append(("after", h["status"], 0.0, *_memory(proc.pid)))
        print("\n| attack | answer | seconds | RSS MB | peak RSS MB |\n| --- | --- | ---: | ---: | ---: |")
        for what, outcome, seconds, rss, peak in rows:
            print(f"| {what} | {outcome} | {seconds:.2f} | {rss} | {peak} |")
        statuses = [outcome for _, outcome, _, _, _ in rows[1:-1]]
        assert statuses[:7] == [413, 413, 400, 400, 400, 400, 413]
        assert set(statuses[7]) <= {200, 429} and sum(statuses[7].values()) == CONNECTIONS
        for log, text in zip(logs, want):
            assert log[-1] == ("done", None) and "".join(t for _, t in log[:-1]) == text
        assert h["status"] == "ok" and h["in_flight"] == 0 and h["pages_free"] == h["num_pages"]
        assert rows[-1][4] - rows[0][4] < 256, rows  # the peak grew by less than the body of one attack
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _post(url: str, content: bytes) -> int:
    return httpx.post(url + "/v1/completions", content=content, headers=AUTH, timeout=120).status_code
