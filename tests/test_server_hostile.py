"""The server under hostile input, over real HTTP on a free localhost port with an API key: a
200 MB body is refused with 413 within a second while the process's memory stays where it was; a
10-million-character prompt under the body limit is refused with 400 before the tokenizer runs; other
clients' streams go on, token for token, through all of it; every /v1 route wants the key; past
the admission limit a request gets 429 with Retry-After; /openapi.json describes the request bodies
as the server checks them (checked with jsonschema, an independent validator)."""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import json
import os
import socket
import threading
import time

import httpx
import jsonschema
import openai
import pytest
from helpers import run_main

import jaxinfer as ji
from experiments import serve
from jaxinfer.serving import guards, server
from jaxinfer.serving.limits import ServerLimits

KEY = "sk-hostile-test"
AUTH = {"authorization": f"Bearer {KEY}"}
BODY_LIMIT = 12 << 20  # above a 10-million-character prompt's body, far below 200 MB
MAX_CONCURRENT = 3
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
MB = 1 << 20


class CountingTokenizer:
    """The model's tokenizer, counting the calls that tokenise text."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def encode(self, text, add_special_tokens=True):
        self.calls += 1
        return self.inner.encode(text, add_special_tokens)

    def apply_chat_template(self, messages, **kwargs):
        self.calls += 1
        return self.inner.apply_chat_template(messages, **kwargs)

    def __getattr__(self, name):  # vocab_size, decode, chat_template, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def model():
    return ji.load_model("tiny")


@pytest.fixture(scope="module")
def counting(model):
    """The model's tokenizer with TEMPLATE as its chat template, counting its tokenising calls."""
    inner = copy.copy(model.tokenizer)
    inner.chat_template = TEMPLATE
    return CountingTokenizer(inner)


@pytest.fixture(scope="module")
def app(model, counting):
    engine = ji.Engine(dataclasses.replace(model, tokenizer=counting), ji.EngineConfig())
    limits = ServerLimits(max_body_bytes=BODY_LIMIT, max_concurrent_requests=MAX_CONCURRENT)
    return server.build_app(engine, limits=limits, api_key=KEY)


@pytest.fixture(scope="module")
def served(app):
    with server.BackgroundServer(app) as s:
        yield s


def _rss() -> int:
    """This process's resident memory in bytes (the server runs in it, in a thread)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The most resident memory seen (sampled every millisecond) while the block runs, above the
    memory when it began."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.growth = self.peak - self.start


def _declared_body(url: str, size: int, headers: dict[str, str]) -> tuple[int, dict, float]:
    """POST headers declaring a body of `size` bytes and wait for the answer before sending any of
    it: the status, the JSON body and the seconds to the answer. (A client that kept sending would
    race the server closing the connection, and might see a broken pipe instead of the 413.)"""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in {"host": host, "content-type": "application/json",
                                                       "content-length": str(size), **headers}.items())
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\n{head}\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    elapsed = time.monotonic() - start
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), elapsed


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            return int(value)
    return 1 << 30


def _chunked_body(url: str, size: int, headers: dict[str, str] = AUTH) -> tuple[httpx.Response, float]:
    """POST `size` bytes with no declared length (chunked transfer), one MB at a time."""
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        block = b"a" * MB
        for _ in range(size // MB):
            yield block

    start = time.monotonic()
    r = httpx.post(url + "/v1/completions", content=chunks(), headers=headers, timeout=30)
    return r, time.monotonic() - start


def test_a_200mb_body_is_refused_with_413_within_a_second_and_memory_unchanged(served):
    for attempt in ("declared", "chunked"):
        with PeakRSS() as mem:
            if attempt == "declared":
                status, body, elapsed = _declared_body(served.url, 200 * MB, AUTH)
            else:
                r, elapsed = _chunked_body(served.url, 200 * MB)
                status, body = r.status_code, r.json()
        assert status == 413, (attempt, body)
        assert body["error"]["type"] == "invalid_request_error" and str(BODY_LIMIT) in body["error"]["message"]
        assert elapsed < 1.0, (attempt, elapsed)
        # A body read whole would hold 200 MB; the chunked one is read up to the 12 MB limit.
        assert mem.growth < 48 * MB, (attempt, mem.growth / MB)
    assert httpx.get(served.url + "/health").json()["refused"]["413"] >= 2


def test_a_10m_character_prompt_under_the_body_limit_is_refused_before_tokenising(served, counting):
    prompt = "a" * 10_000_000
    bodies = [("completions", {"model": "tiny", "prompt": prompt}, "prompt"),
              ("completions", {"model": "tiny", "prompt": [prompt]}, "prompt"),
              ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": prompt}]}, "messages"),
              ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": prompt[:1500]}] * 2},
               "messages")]
    for path, body, param in bodies:
        content = json.dumps(body).encode()
        assert len(content) < BODY_LIMIT
        calls = counting.calls
        r = httpx.post(f"{served.url}/v1/{path}", content=content, headers=AUTH, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and "over the limit of 2048" in error["message"], error
        assert counting.calls == calls  # refused before any tokenising
    r = httpx.post(f"{served.url}/v1/completions", json={"model": "tiny", "prompt": "a" * 2048, "max_tokens": 1},
                   headers=AUTH, timeout=60)  # at the limit: tokenised, then over the context in tokens
    assert r.status_code == 400 and "tokens" in r.json()["error"]["message"] and counting.calls > calls


def _stream(url: str, prompt: str, max_tokens: int, log: list) -> None:
    """A streaming client: appends (time, text) for each chunk to `log`, then ("done", None)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}  # the same request as the whole response it is compared with
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=300) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                log.append(("done", None))
            elif line.startswith("data: "):
                log.append((time.monotonic(), json.loads(line[6:])["choices"][0]["text"]))


def _hostile(url: str) -> list[int]:
    """Requests an attacker sends, one after another; their statuses."""
    statuses = [_declared_body(url, 200 * MB, AUTH)[0], _chunked_body(url, 200 * MB)[0].status_code]
    deep = b"[" * 5_000_000 + b"]" * 5_000_000  # 10 MB of nesting, under the limit
    many_ids = json.dumps({"model": "tiny", "prompt": [1] * 2_000_000}).encode()  # 6 MB of token ids
    for content in (deep, many_ids, json.dumps({"model": "tiny", "prompt": "a" * 10_000_000}).encode(),
                    bytes(range(256)) * 4000, b'{"prompt": "x", "max_tokens": 1' + b"0" * 100_000 + b"}"):
        statuses.append(httpx.post(url + "/v1/completions", content=content, headers=AUTH, timeout=30).status_code)
    statuses.append(httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=30).status_code)  # no key
    return statuses


def test_other_clients_streams_continue_during_hostile_requests(served):
    """Each stream's text equals the same server's whole response to the same request asked with no
    attack going on (test_server.py checks those against Engine.generate)."""
    prompts, n = ["def fibonacci(n):", "class Stack:"], 200
    body = {"model": "tiny", "max_tokens": n, "temperature": 0, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # batched together, as the streams will be
        want = list(pool.map(lambda p: httpx.post(served.url + "/v1/completions", json={**body, "prompt": p},
                                                  headers=AUTH, timeout=300).json()["choices"][0]["text"], prompts))
    assert all(len(text) >= n // 2 for text in want)
    logs = [[], []]
    threads = [threading.Thread(target=_stream, args=(served.url, p, n, log)) for p, log in zip(prompts, logs)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while min(len(log) for log in logs) < 3:  # both streams are running
        assert time.monotonic() < deadline, "the streams did not start"
        time.sleep(0.01)
    begun = time.monotonic()
    statuses = _hostile(served.url)
    for t in threads:
        t.join(timeout=300)
    assert statuses == [413, 413, 400, 400, 400, 400, 400, 401]
    for log, text in zip(logs, want):
        assert log[-1] == ("done", None)
        assert "".join(t for _, t in log[:-1]) == text  # token for token what the engine gives alone
        assert any(at > begun for at, _ in log[:-1])  # the stream went on after the attack began
    h = httpx.get(served.url + "/health").json()
    assert h["status"] == "ok" and h["in_flight"] == 0 and h["pages_free"] == h["num_pages"]


def test_without_the_key_every_route_is_401_and_health_is_open(app, served):
    routes = [(r.path, m) for r in app.routes if r.path.startswith("/v1") for m in getattr(r, "methods", ())]
    assert {p for p, _ in routes} >= {"/v1/models", "/v1/completions", "/v1/chat/completions"}
    routes += [("/v1/no-such-route", "GET"), ("/admin", "POST"), ("/", "GET")]  # asked before routing
    for path, method in routes:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {KEY}"},
                        {"authorization": KEY}, {"authorization": f"Bearer {KEY}x"}):
            r = httpx.request(method, served.url + path, headers=headers, json={"prompt": "x"})
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(served.url + "/health").status_code == 200
    for path in ("/openapi.json", "/docs"):
        assert httpx.get(served.url + path).status_code == 200
    assert httpx.get(served.url + "/v1/models", headers=AUTH).status_code == 200


def test_past_the_admission_limit_a_request_gets_429_with_retry_after(served):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=120) as http:
        streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(MAX_CONCURRENT)]
        responses = [s.__enter__() for s in streams]
        try:
            assert [r.status_code for r in responses] == [200] * MAX_CONCURRENT
            c = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model="tiny", prompt="x", max_tokens=1)
            assert e.value.response.headers["retry-after"] == "1"
            assert e.value.body["code"] == "rate_limit_exceeded" and str(MAX_CONCURRENT) in e.value.message
        finally:
            for s in streams:
                s.__exit__(None, None, None)  # the clients leave: their requests are aborted
    deadline = time.monotonic() + 60
    while (h := httpx.get(served.url + "/health").json())["in_flight"] or h["running"] or h["waiting"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    r = httpx.post(served.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1}, headers=AUTH)
    assert r.status_code == 200 and h["pages_free"] == h["num_pages"]


def test_openapi_describes_the_request_bodies_as_the_server_checks_them(served):
    spec = httpx.get(served.url + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, name in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        op = spec["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert op["security"] == [{"bearer": []}] and {"400", "401", "413", "429"} <= set(op["responses"])
        assert schemas[name]["additionalProperties"] is False
    fields = schemas["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "n", "stop", "temperature", "top_p", "seed", "stream"} <= set(fields)
    assert max(s.get("maximum", 0) for s in fields["max_tokens"]["anyOf"]) == 512
    assert max(s.get("maximum", 0) for s in fields["n"]["anyOf"]) == ServerLimits().max_n
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant"]
    resolver = {"components": spec["components"]}

    def valid(name: str, body) -> bool:
        return jsonschema.Draft202012Validator({**schemas[name], **resolver}).is_valid(body)

    cases = [("completions", "CompletionRequest", {"model": "tiny", "prompt": "x", "max_tokens": 2}),
             ("completions", "CompletionRequest", {"model": "tiny", "prompt": [1, 2], "stop": ["a"], "n": 2,
                                                   "max_tokens": 2}),
             ("completions", "CompletionRequest", {"prompt": "x", "frobnicate": 1}),
             ("completions", "CompletionRequest", {"prompt": "x", "max_tokens": 513}),
             ("completions", "CompletionRequest", {"prompt": "x" * 2049}),
             ("chat/completions", "ChatCompletionRequest", {"messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 2}),
             ("chat/completions", "ChatCompletionRequest", {"messages": [{"role": "wizard", "content": "hi"}]}),
             ("chat/completions", "ChatCompletionRequest", {"messages": [{"role": "user"}]})]
    for path, name, body in cases:
        r = httpx.post(f"{served.url}/v1/{path}", json=body, headers=AUTH, timeout=60)
        assert (r.status_code == 200) == valid(name, body), (body, r.text)


def test_serve_refuses_an_open_address_without_a_key(monkeypatch):
    monkeypatch.delenv(serve.API_KEY_ENV, raising=False)
    with pytest.raises(ValueError, match="--allow_unauthenticated"):
        run_main(serve, "--model=tiny", "--host=0.0.0.0")  # refused before the model loads
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        guards.check_bind(host, None, False)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        with pytest.raises(ValueError, match=host):
            guards.check_bind(host, None, False)
        guards.check_bind(host, "key", False)
        guards.check_bind(host, None, True)
    monkeypatch.setenv(serve.API_KEY_ENV, "from-env")
    with pytest.raises(ValueError, match="--max_n"):  # the key from the environment let it past the bind check
        run_main(serve, "--model=tiny", "--host=0.0.0.0", "--max_n=0")
