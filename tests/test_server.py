"""The OpenAI-compatible server (jaxinfer/serving/server.py), driven by the real `openai` client over HTTP
on a free localhost port, with an API key set: the same tokens as Engine.generate for greedy
requests, streamed or not (the engine in a thread of the server's process, or, in the slow tier,
in an engine core process of its own); many concurrent streams; a client that leaves mid-stream gets its
request aborted and its pages back; bad requests (unknown or unsupported fields, malformed
messages, values out of range) get a 400 naming the field and the server keeps serving; a prompt
over the context is refused, one that fits but leaves less room than max_tokens runs until the
context is full; /v1/models follows the adapters the engine holds."""

from __future__ import annotations

import asyncio
import copy
import json
import time

import httpx
import openai
import pytest
from helpers import run_main

import jaxinfer as ji
from experiments import bench_serving
from jaxinfer import lora
from jaxinfer.serving import core, core_client, server

# The shipped tiny model has no chat template: the server is given this one.
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
PROMPTS = ["def fibonacci(n):", "import numpy as np\n", "class Stack:", "for i in range(10):"]
KEY = "sk-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model():
    return ji.load_model("tiny")


@pytest.fixture(scope="module", params=["thread", pytest.param("process", marks=pytest.mark.slow)])
def served(model, request):
    """A server over its own engine, on a free port for the whole module: the engine in a thread of
    this process, or in an engine core process of its own (jaxinfer/serving/core.py)."""
    if request.param == "thread":
        app = server.build_app(ji.Engine(model, ji.EngineConfig()), chat_template=TEMPLATE, api_key=KEY)
        with server.BackgroundServer(app) as s:
            yield s
        return
    proc = core.spawn_core(core.CoreSpec(model))
    try:
        app = server.build_app(core_client.CoreClient(proc.address, process=proc), chat_template=TEMPLATE,
                               api_key=KEY)
        with server.BackgroundServer(app) as s:
            yield s
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def reference(model):
    """An engine of the same config in this thread: what the server must return."""
    engine = ji.Engine(model, ji.EngineConfig())

    def generate(prompt, **sampling) -> ji.RequestOutput:
        (out,) = engine.generate([prompt], ji.SamplingParams(**sampling))
        return out

    return generate


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)


def _health(served) -> dict:
    return httpx.get(served.url + "/health").json()


def _wait_idle(served, limit_s: float = 120.0) -> dict:
    """/health once the engine has no running or waiting request (a bound, not a timing check)."""
    deadline = time.monotonic() + limit_s
    while True:
        h = _health(served)
        if h["running"] == 0 and h["waiting"] == 0:
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine still has work after {limit_s} s: {h}")
        time.sleep(0.05)


@pytest.mark.parametrize("stop", [None, "e"])
def test_completion_equals_engine_generate(client, reference, stop):
    for prompt in PROMPTS[:2]:
        ref = reference(prompt, max_tokens=12, temperature=0.0, stop=() if stop is None else (stop,))
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=stop)
        assert r.choices[0].text == ref.text
        assert r.choices[0].finish_reason == ref.finish_reason
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == len(ref.token_ids)
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=stop,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
        assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
        if stop is None:  # one chunk per generated token
            assert len([c for c in chunks if c.choices]) == len(ref.token_ids)


def test_token_id_prompt(client, reference, model):
    ids = model.tokenizer.encode(PROMPTS[2])
    ref = reference(ids, max_tokens=8, temperature=0.0)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == ref.text and r.usage.prompt_tokens == len(ids)


def test_chat_equals_engine_generate_through_the_template(client, reference, model):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop, please."}]
    tok = copy.copy(model.tokenizer)
    tok.chat_template = TEMPLATE
    ref = reference(tok.apply_chat_template(messages, tokenize=True), max_tokens=10, temperature=0.0)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_n_samples_stream_like_the_whole_response(client):
    kwargs = dict(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=1.0, n=3, seed=11)
    whole = client.completions.create(**kwargs)
    assert sorted(c.index for c in whole.choices) == [0, 1, 2]
    texts = {i: "" for i in range(3)}
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {c.index: c.text for c in whole.choices}
    assert len({c.text for c in whole.choices}) > 1  # independent samples
    assert whole.usage.completion_tokens >= 3


def test_sixteen_concurrent_streams_each_equal_its_whole_response(served, client):
    """More clients than max_batch (8): requests wait, join the running batch, and all finish."""
    prompts = [f"{PROMPTS[i % 4]}{' ' * (i // 4)}" for i in range(16)]
    lengths = [6 + i % 7 for i in range(16)]
    whole = [client.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0).choices[0].text
             for p, n in zip(prompts, lengths)]
    aclient = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)

    async def stream(prompt, n):
        text = ""
        async for chunk in await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=n,
                                                            temperature=0, stream=True):
            text += chunk.choices[0].text
        return text

    async def all_streams():
        try:
            return await asyncio.gather(*(stream(p, n) for p, n in zip(prompts, lengths)))
        finally:
            await aclient.close()

    assert asyncio.run(all_streams()) == whole
    assert _wait_idle(served)["pages_in_use"] == 0


def test_client_leaving_mid_stream_aborts_its_request_and_frees_its_pages(served):
    start = _wait_idle(served)
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=served.url, timeout=60, headers=AUTH) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [line for line, _ in zip((x for x in lines if x.startswith("data: ")), range(3))]
            assert len(got) == 3 and _health(served)["pages_in_use"] > start["pages_in_use"]
    end = _wait_idle(served)
    assert end["aborted"] == start["aborted"] + 1  # ended by the abort, not by running out of tokens
    assert end["pages_in_use"] == start["pages_in_use"]


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
BAD = [
    ("completions", {"model": "nope", "prompt": "x"}, "model", "nope"),
    ("completions", {"model": "tiny", "prompt": "x" * 600}, "prompt", "601 tokens"),  # over the context: tokens
    ("completions", {"model": "tiny", "prompt": "x" * 5000}, "prompt", "5000 characters"),  # refused untokenised
    ("completions", {"model": "tiny", "prompt": [5] * 513}, "prompt", "513 token ids, over the limit of 512"),
    ("completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens", "needs echo: true"),
    ("completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    ("completions", {"model": "tiny", "prompt": "x", "max_tokens": 600}, "max_tokens", "512"),
    ("completions", {"model": "tiny", "prompt": "x", "max_tokens": 100000000}, "max_tokens", "512"),
    ("completions", {"model": "tiny", "prompt": "x", "max_tokens": "8"}, "max_tokens", "'8'"),
    ("completions", {"model": "tiny", "prompt": "x", "max_tokens": 8.0}, "max_tokens", "8.0"),
    ("completions", {"model": "tiny", "prompt": "x", "top_p": 1.5}, "top_p", "1.5"),
    ("completions", {"model": "tiny", "prompt": "x", "top_p": 0}, "top_p", "greater than 0"),
    ("completions", {"model": "tiny", "prompt": "x", "temperature": -0.5}, "temperature", "-0.5"),
    ("completions", {"model": "tiny", "prompt": "x", "temperature": True}, "temperature", "True"),
    ("completions", {"model": "tiny", "prompt": "x", "n": 0}, "n", "n:"),
    ("completions", {"model": "tiny", "prompt": "x", "n": 17}, "n", "less than or equal to 16"),
    ("completions", {"model": "tiny", "prompt": "x", "best_of": 3}, "best_of", "best_of=3"),
    ("completions", {"model": "tiny", "prompt": "x", "stop": [""]}, "stop", "stop[0]"),
    ("completions", {"model": "tiny", "prompt": "x", "stop": ["a"] * 17}, "stop", "17 items, over the limit of 16"),
    ("completions", {"model": "tiny", "prompt": "x", "stop": "a" * 257}, "stop", "257 characters"),
    ("completions", {"model": "tiny", "prompt": "x", "seed": -1}, "seed", "-1"),
    ("completions", {"model": "tiny", "prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    ("completions", {"model": "tiny", "prompt": "x", "logprobs": True}, "logprobs", "True"),
    ("chat/completions", {**CHAT, "echo": True}, "echo", "not supported by /v1/chat/completions"),
    ("completions", {"model": "tiny", "prompt": "x", "frobnicate": 1}, "frobnicate", "not a field"),
    ("completions", {"model": "tiny", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format",
     "response_format.json_schema.schema: structured.json_schema does not compile (llguidance): Invalid type"),
    ("completions", {"model": "tiny", "prompt": "x", "structured_outputs": {"regex": "a[b"}}, "structured_outputs",
     "structured_outputs.regex: structured.regex does not compile (llguidance)"),
    ("completions", {"model": "tiny", "prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}},
     "structured_outputs", "exactly one of json, regex, choice, grammar"),
    ("completions", {"model": "tiny", "prompt": "x", "structured_outputs": {"regex": "a"},
                     "response_format": {"type": "json_object"}}, "structured_outputs", "send one"),
    ("completions", {"model": "tiny", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty",
     "less than or equal to 2"),
    ("completions", {"model": "tiny", "prompt": "x", "frequency_penalty": -3}, "frequency_penalty",
     "greater than or equal to -2"),
    ("completions", {"model": "tiny", "prompt": "x", "repetition_penalty": 0}, "repetition_penalty",
     "greater than or equal to 0.0000000000000000000000000000000000001"),  # 1e-37
    ("completions", {"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias",
     "keys must be token ids in [0, 258), got 'abc'"),
    ("completions", {"model": "tiny", "prompt": "x", "logit_bias": {"300": 1}}, "logit_bias", "got '300'"),
    ("completions", {"model": "tiny", "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias", "less than or equal"),
    ("completions", {"model": "tiny", "prompt": "x", "min_tokens": 20}, "min_tokens", "max_tokens=16"),
    ("completions", {"model": "tiny", "prompt": "x", "stream_options": {"foo": True}}, "stream_options",
     "stream_options.foo"),
    ("completions", {"model": "tiny", "prompt": ""}, "prompt", "prompt"),
    ("completions", {"model": "tiny", "prompt": [1, 999]}, "prompt", "prompt[1]"),
    ("completions", {"model": "tiny", "prompt": [[1, 2], [3]]}, "prompt", "batched prompts are not supported"),
    ("completions", {"model": "tiny", "prompt": {"text": "x"}}, "prompt", "a string, a list of token ids"),
    ("completions", {"model": "tiny"}, "prompt", "prompt is required"),
    ("chat/completions", {"model": "tiny"}, "messages", "messages is required"),
    ("chat/completions", {"model": "tiny", "messages": []}, "messages", "at least 1"),
    ("chat/completions", {"model": "tiny", "messages": [{"content": "hi"}]}, "messages", "messages[0].role"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages",
     "messages[0].role"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user"}]}, "messages", "messages[0].content"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": None}]}, "messages",
     "messages[0].content"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]},
     "messages", "messages[0].tool_call_id"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages", "messages[0].content[0].type"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 600}]}, "messages", "tokens"),
    ("chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs: true"),
    ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ("chat/completions", {**CHAT, "logprobs": 1}, "logprobs", "logprobs"),
    ("chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools", "not supported"),
    ("chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format",
     "response_format.json_schema.json_schema is required"),
    ("chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format", "response_format"),
    ("chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens"),
    ("completions", "{not json", None, "not valid JSON"),
    ("completions", '{"model": "tiny", "prompt": "x", "temperature": NaN}', None, "NaN"),
    ("completions", '{"model": "tiny", "prompt": "x", "seed": 1' + "0" * 5000 + "}", None, "not valid JSON"),
    ("completions", "[" * 100_000 + "]" * 100_000, None, "not valid JSON"),
    ("completions", '{"prompt": "\\ud800"}', "prompt", "prompt"),
    ("completions", "[1, 2]", None, "JSON object"),
]


@pytest.mark.parametrize("path,body,param,words", BAD, ids=[f"{p}-{f}-{i}" for i, (p, _, f, _) in enumerate(BAD)])
def test_bad_request_is_a_400_naming_the_field_and_the_server_goes_on(served, client, path, body, param, words):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{served.url}/v1/{path}", content=content, headers={"content-type": "application/json", **AUTH})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] is None
    assert words in error["message"], error["message"]
    if param is not None:
        assert param in error["message"] or param == "model", error["message"]
    assert _health(served)["status"] == "ok"


def test_after_the_bad_requests_the_server_serves(served, client):
    ok = client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1 and _wait_idle(served)["pages_in_use"] == 0


def test_fields_openai_defines_that_change_nothing_are_accepted(client, reference):
    """`user`, `service_tier`, `parallel_tool_calls` (ignored) and unsupported fields at their no-op
    values give the same tokens as a request without them."""
    ref = reference(PROMPTS[1], max_tokens=6, temperature=0.0)
    extra = {"user": "u-1", "service_tier": "auto", "logprobs": None, "echo": False, "presence_penalty": 0,
             "frequency_penalty": 0.0, "logit_bias": {}, "response_format": {"type": "text"}, "tool_choice": "none",
             "store": False, "metadata": None}
    r = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0, extra_body=extra)
    assert r.choices[0].text == ref.text
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x", "name": "ann"}],
                                       max_tokens=2, temperature=0, parallel_tool_calls=False, user="u-1")
    assert r.usage.completion_tokens >= 1


def test_sampling_fields_and_logprobs_equal_the_engines(client, reference, model):
    """OpenAI's presence / frequency penalties and logit_bias, vLLM's repetition_penalty and
    min_tokens, and logprobs: the tokens and log-probabilities Engine.generate gives with the same
    SamplingParams, whole and streamed, in the completions and the chat shapes."""
    def text(t):
        return model.tokenizer.decode([t])

    def check_top(top: dict, ref_top):
        texts = [text(a) for a, _ in ref_top]
        for (a, x), t in zip(ref_top, texts):
            if texts.count(t) == 1:  # two tokens that decode alike share one key
                assert top[t] == pytest.approx(x, abs=1e-5)

    vllm = dict(repetition_penalty=1.2, min_tokens=4)
    ref = reference(PROMPTS[0], max_tokens=8, temperature=0.0, logprobs=3, presence_penalty=0.5, frequency_penalty=0.3,
                    logit_bias={101: 3.0}, **vllm)
    plain = reference(PROMPTS[0], max_tokens=8, temperature=0.0)
    assert ref.token_ids != plain.token_ids  # the fields change the output
    kwargs = dict(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=3, presence_penalty=0.5,
                  frequency_penalty=0.3, logit_bias={"101": 3.0}, extra_body=vllm)
    choice = client.completions.create(**kwargs).choices[0]
    lp = choice.logprobs
    assert choice.text == ref.text and lp.tokens == [text(t) for t in ref.token_ids]
    assert lp.token_logprobs == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-5)
    assert lp.text_offset == [len("".join(lp.tokens[:j])) for j in range(len(lp.tokens))]
    for top, t, x in zip(lp.top_logprobs, ref.token_ids, ref.logprobs):
        assert top[text(t)] == pytest.approx(x.logprob, abs=1e-5)
        check_top(top, x.top)
    chunks = [c.choices[0].logprobs for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert sum((c.tokens for c in chunks), []) == lp.tokens
    assert sum((c.text_offset for c in chunks), []) == lp.text_offset

    messages = [{"role": "user", "content": "A loop, please."}]
    tok = copy.copy(model.tokenizer)
    tok.chat_template = TEMPLATE
    ref = reference(tok.apply_chat_template(messages, tokenize=True), max_tokens=6, temperature=0.0, logprobs=2,
                    presence_penalty=0.5)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2, presence_penalty=0.5)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [text(t) for t in ref.token_ids]
    assert [c.bytes for c in content] == [list(text(t).encode()) for t in ref.token_ids]
    assert [c.logprob for c in content] == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-5)
    for c, x in zip(content, ref.logprobs):
        assert [e.logprob for e in c.top_logprobs] == pytest.approx([v for _, v in x.top], abs=1e-5)
        assert [e.token for e in c.top_logprobs] == [text(a) for a, _ in x.top]
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=2).choices[0].logprobs is None


def test_a_prompt_over_the_context_is_refused_one_that_fits_runs_until_it_is_full(model, client, reference):
    """One limits policy with the library: over the context, a 400 naming the prompt and both
    lengths (the engine raises ValueError for it); leaving less room than max_tokens, the request
    runs and ends when the context is full, as Engine.generate's "context" (on the wire, "length")."""
    ids = [int(t) for t in model.tokenizer.encode(PROMPTS[0] * 60)][:500]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=(ids * 2)[:513], max_tokens=4)
    assert e.value.body["param"] == "prompt" and "513" in e.value.message and "512" in e.value.message
    ref = reference(ids, max_tokens=100, temperature=0.0, ignore_eos=True)
    assert ref.finish_reason == "context" and len(ref.token_ids) < 100
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=100, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == len(ref.token_ids)
    assert r.choices[0].text == ref.text


def test_the_openai_client_sees_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", top_p=2.0)
    assert e.value.status_code == 400 and "top_p" in str(e.value)


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    h = _health(served)
    assert h["status"] == "ok" and h["num_pages"] > 0


@pytest.mark.slow  # plumbing, 6 s: the fast tier stays under 5 minutes
def test_bench_serving_runs_the_same_workload_both_ways(tmp_path):
    """A few requests in-process and through a server it starts itself (the engine in a core process
    of its own), open loop and closed loop: every request's tokens counted on both sides, nothing
    compiled during a run, the record and the table hold both modes at both loads."""
    out, table = tmp_path / "serving.json", tmp_path / "serving.md"
    run_main(bench_serving, "--model=tiny", "--rates=20", "--concurrency=2", "--num_requests=4", "--prompt_dist=fixed",
             "--prompt_len=8", "--output_dist=fixed", "--output_len=6", "--max_len=16", f"--out={out}",
             f"--markdown={table}")
    record = json.loads(out.read_text())
    runs = {(r["mode"], r["load"]): r for r in record["results"]}
    assert set(runs) == {(m, load) for m in ("in-process", "server") for load in ("rate=20", "concurrency=2")}
    for r in runs.values():
        assert [q["tokens"] for q in r["requests"]] == [6] * 4 and r["compiles_during_run"] == 0
        assert r["throughput_tok_s"] > 0 and 0 < r["ttft_s"]["p50"] <= r["latency_s"]["p50"]
    assert record["metrics"]["server/rate=20/generated_tokens"] == 24
    assert record["metrics"]["server/concurrency=2/generated_tokens"] == 24
    text = table.read_text()
    assert all(f"| {load} | {mode} |" in text for mode, load in runs)


def test_model_selects_a_loaded_lora_adapter(model):
    """`model: NAME` serves under that adapter: the tokens of Engine.generate(adapters=[NAME]),
    not the base model's; /v1/models lists the adapters the engine holds, those added after the
    app was built included (before it starts, and while it serves through the engine loop)."""
    adapter = lora.random_adapter(model.config, 8, std=0.5, seed=3)
    engines = [ji.Engine(model, ji.EngineConfig(max_adapters=2, max_lora_rank=8)) for _ in range(2)]
    engines[1].add_adapter("ada", adapter)
    sp = ji.SamplingParams(max_tokens=8, temperature=0.0)
    ref, base = engines[1].generate([PROMPTS[0]] * 2, sp, adapters=["ada", None])
    assert ref.token_ids != base.token_ids  # the adapter changes the output
    app = server.build_app(engines[0], api_key=KEY)
    engines[0].add_adapter("ada", adapter)  # after the app was built
    with server.BackgroundServer(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in c.models.list()] == ["tiny", "ada"]
        for name, want in (("ada", ref), ("tiny", base)):
            r = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=0)
            assert r.choices[0].text == want.text and r.model == name
        loop = app.state.engine_loop
        loop.submit(lambda e: e.add_adapter("bea", adapter)).result(timeout=60)  # while serving
        assert [m.id for m in c.models.list()] == ["tiny", "ada", "bea"]
        r = c.completions.create(model="bea", prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert r.choices[0].text == ref.text  # the same weights as "ada"
        loop.submit(lambda e: e.remove_adapter("ada")).result(timeout=60)
        assert [m.id for m in c.models.list()] == ["tiny", "bea"]
        with pytest.raises(openai.BadRequestError, match="ada"):
            c.completions.create(model="ada", prompt=PROMPTS[0], max_tokens=2)
        with pytest.raises(ValueError, match="nope"):  # the engine's refusal comes back through the future
            loop.submit(lambda e: e.remove_adapter("nope")).result(timeout=60)
