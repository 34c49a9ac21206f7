"""An OpenAI-compatible HTTP server over an Engine (FastAPI + uvicorn: `pip install 'jaxinfer[serve]'`).

  app = build_app(engine, api_key="sk-...")     # an ASGI app; uvicorn.run(app, port=8000)
  with BackgroundServer(app) as server:         # or in a thread on a free localhost port
      openai.OpenAI(base_url=server.url + "/v1", api_key="sk-...").completions.create(...)

Endpoints: POST /v1/completions and /v1/chat/completions (request bodies: the pydantic models of
jaxinfer/serving/schema.py, described in /openapi.json; `stream: true` answers with server-sent
events, one chunk per engine output, then `data: [DONE]`), GET /v1/models (the base model and
every LoRA adapter the engine holds now, which `model` selects) and GET /health (the engine loop's
state: running and waiting requests, pages in use, requests refused by status).

Every connection's requests go to one EngineLoop (jaxinfer/serving/engine_loop.py), the only thread that
touches the engine, which batches them continuously; or, with the engine core in its own process
(jaxinfer/serving/core.py), to a CoreClient or to Replicas of several cores (core_client.py), and this
process keeps only the HTTP work, tokenising and detokenising. An engine that has stopped is a 503. A client that disconnects before its
request finishes (mid-stream or while waiting for a whole response) aborts it; its pages come
back at the loop's next turn. Requests are bounded before work (jaxinfer/serving/guards.py and
limits.py): the API key, the body's size, the requests held at once, then every field's type,
range and length; bad requests get a 4xx with OpenAI's error body naming the field, and the
server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import socket
import threading
import time

import fastapi
import pydantic
import uvicorn
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from jaxinfer.engine.engine import Engine
from jaxinfer.serving import openai_api, schema
from jaxinfer.serving.engine_loop import EngineLoop, EngineUnavailable
from jaxinfer.serving.guards import Guards, GuardState
from jaxinfer.serving.limits import ServerLimits, prompt_char_limit
from jaxinfer.serving.schema import RequestError

ROUTES = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}  # generation routes -> request kind


def build_app(engine, name: str | None = None, chat_template: str | None = None, *,
              limits: ServerLimits | None = None, api_key: str | None = None) -> fastapi.FastAPI:
    """The ASGI app serving `engine` as the model `name` (default the model's own name). `engine`
    is an Engine, driven by an EngineLoop thread in this process, or a client of engine cores in
    other processes (jaxinfer/serving/core_client.py: CoreClient, Replicas);
    `chat_template` (jinja, as in HF tokenizer configs) replaces the model's own for
    /v1/chat/completions; `limits` bound each request (default ServerLimits()); with `api_key`,
    every route but /health and the API's description needs it as a bearer token. Its lifespan starts the engine loop and stops it at
    shutdown."""
    loop = EngineLoop(engine) if isinstance(engine, Engine) else engine
    tokenizer = loop.model.tokenizer
    if tokenizer is None:
        raise ValueError(f"the model {loop.model.name!r} has no tokenizer: the server takes and returns text")
    if api_key is not None and not api_key:
        raise ValueError("api_key is empty: pass None to serve without a key")
    limits = ServerLimits() if limits is None else limits
    if chat_template is not None:
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = chat_template
    served = openai_api.ServedModel(name or loop.model.name or "model", tokenizer, loop.model,
                                    loop.max_seq_len, limits.request_timeout_s)
    models = schema.request_models(limits, loop.max_seq_len, loop.model.config.vocab_size,
                                   prompt_char_limit(loop.max_seq_len, tokenizer, limits))
    guards = GuardState()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        loop.stop()

    app = fastapi.FastAPI(title="jaxinfer", summary="An OpenAI-compatible server over a jaxinfer Engine",
                          lifespan=lifespan)
    app.state.engine_loop, app.state.guards, app.state.request_models = loop, guards, models
    app.add_middleware(Guards, state=guards, api_key=api_key, max_body_bytes=limits.max_body_bytes,
                       max_concurrent=limits.max_concurrent_requests, retry_after_s=limits.retry_after_s,
                       counted=tuple(ROUTES))

    @app.exception_handler(RequestError)
    async def request_error(request: fastapi.Request, e: RequestError) -> JSONResponse:
        headers = {"connection": "close"} if e.status == 413 else None  # read no more of a body refused
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: fastapi.Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(RequestError(str(e.detail), None, status=e.status_code).body(), status_code=e.status_code,
                            headers=e.headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = loop.alive and loop.error is None
        snapshot = {k: v for k, v in loop.snapshot.items() if k != "adapters"}
        return JSONResponse({"status": "ok" if ok else "error", "error": repr(loop.error) if loop.error else None,
                             **snapshot, "aborted": loop.aborted, "in_flight": guards.in_flight,
                             "refused": {str(k): v for k, v in sorted(guards.refused.items())}},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models_list() -> dict:
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "jaxinfer",
             "root": served.name, "parent": None if m == served.name else served.name}
            for m in [served.name, *loop.snapshot["adapters"]]]}

    errors = {status: {"model": ErrorResponse, "description": text} for status, text in ERRORS.items()}
    for path, kind in ROUTES.items():
        model = models.completion if kind == "completion" else models.chat
        body = {"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}
        summary = "OpenAI's chat completions" if kind == "chat" else "OpenAI's completions"
        app.add_api_route(path, _endpoint(kind, model, models, served, loop), methods=["POST"], openapi_extra=body,
                          responses=errors, name=kind, summary=summary)
    app.openapi = lambda: _openapi(app, models, api_key is not None)
    return app


def _endpoint(kind: str, model: type[pydantic.BaseModel], models: schema.RequestModels,
              served: openai_api.ServedModel, loop):
    """The endpoint of one generation route: the body checked by `model`, parsed, served."""

    async def generate(request: fastapi.Request):
        parsed = openai_api.parse(await _body(request, model, models), kind, served, loop.snapshot["adapters"])
        return await _serve(request, parsed, loop)

    return generate


class ErrorResponse(pydantic.BaseModel):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: dict[str, str | None]


ERRORS = {400: "a bad request: `param` names the field", 401: "no valid API key", 413: "the body is over the limit",
          429: "the server holds its limit of requests: retry after Retry-After seconds"}


def _openapi(app: fastapi.FastAPI, models: schema.RequestModels, secured: bool) -> dict:
    """FastAPI's OpenAPI description, with the request models (and the models inside them) as
    components, and the bearer key where one is required."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in (models.completion, models.chat):
            s = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(s.pop("$defs", {}))
            components[model.__name__] = s
        if secured:
            spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, item in spec["paths"].items():
                for operation in item.values() if path.startswith("/v1") else ():
                    operation["security"] = [{"bearer": []}]
        app.openapi_schema = spec
    return app.openapi_schema


async def _body(request: fastapi.Request, model: type[pydantic.BaseModel], models: schema.RequestModels):
    """The request's JSON body checked by `model`; RequestError (400) if it is not JSON or not
    valid, BodyTooLarge (413) out of the guards' receive if it is too big."""
    raw = await request.body()
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise RequestError(f"the request body is not valid JSON: {_short_error(e)}") from None
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        raise schema.validation_error(e, models) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _short_error(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


async def _serve(request: fastapi.Request, parsed: openai_api.Parsed, loop):
    """Add the request to the engine loop; answer with a whole response or a stream of chunks. A
    structured output constraint is compiled first on a worker thread (cached by its text), so a
    large schema neither holds up the engine's steps nor reaches it when it does not compile."""
    try:
        if parsed.sampling.structured is not None:
            await asyncio.to_thread(loop.grammars.compile, parsed.sampling.structured)
        rid, outputs = await loop.add(parsed.prompt, parsed.sampling, parsed.adapter, stream=parsed.stream)
    except ValueError as e:
        raise openai_api.engine_error(e, parsed) from None
    except EngineUnavailable as e:
        raise RequestError(str(e), None, status=503) from None
    if parsed.stream:
        return _EventStream(_events(parsed, outputs), rid, loop)
    final = await _until_finished(request, rid, outputs, loop)
    return JSONResponse(openai_api.response(parsed, final, openai_api.new_id(parsed)))


class _EventStream(StreamingResponse):
    """Server-sent events of one request; however the response ends (finished, the client gone
    before or during the stream), the request is aborted if it still runs."""

    def __init__(self, events, rid: int, loop: EngineLoop):
        super().__init__(events, media_type="text/event-stream")
        self.rid, self.loop = rid, loop

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.loop.abort(self.rid)


async def _next(outputs: asyncio.Queue):
    """The request's next output; the engine loop's failure, raised."""
    out = await outputs.get()
    if isinstance(out, EngineUnavailable):
        raise RequestError(str(out), None, status=503)
    if isinstance(out, BaseException):
        raise RequestError(f"the engine failed: {out!r}", None, status=500)
    return out


async def _until_finished(request: fastapi.Request, rid: int, outputs: asyncio.Queue, loop: EngineLoop):
    """The request's final output; if the client disconnects first, the request is aborted."""
    async def last():
        while True:
            out = await _next(outputs)
            if out.finished:
                return out

    async def disconnected():  # returns when the client has gone
        while True:
            if (await request.receive())["type"] == "http.disconnect":
                return

    result, watch = asyncio.ensure_future(last()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({result, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not result.done():
            result.cancel()
            loop.abort(rid)
    if result.cancelled():  # nobody to answer: nginx's 499 "client closed request", never sent
        raise RequestError("the client disconnected before the request finished", None, status=499)
    return result.result()


async def _events(parsed: openai_api.Parsed, outputs: asyncio.Queue):
    """Server-sent events for a streamed request (_EventStream aborts it if the client leaves)."""
    writer = openai_api.ChunkWriter(parsed, openai_api.new_id(parsed))
    finished = False
    try:
        while not finished:
            out = await _next(outputs)
            finished = out.finished
            chunks = writer.chunks(out)  # every choice's chunk of this step, written together
            if chunks:
                yield "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks)
        if parsed.include_usage:
            yield f"data: {json.dumps(writer.usage_chunk(out))}\n\n"
        yield "data: [DONE]\n\n"
    except RequestError as e:  # the engine failed the request after the stream began
        yield f"data: {json.dumps(e.body())}\n\n"


class BackgroundServer:
    """uvicorn serving an app in a thread, on a free port of `host` (or `port`); a context manager."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout_s: float = 60.0) -> BackgroundServer:
        """Start serving; returns once the server accepts connections."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
