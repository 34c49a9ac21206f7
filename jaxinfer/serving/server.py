"""An OpenAI-compatible HTTP server over an Engine (FastAPI + uvicorn: `pip install 'jaxinfer[serve]'`).

  app = build_app(engine)                       # an ASGI app; uvicorn.run(app, port=8000)
  with BackgroundServer(app) as server:         # or in a thread on a free localhost port
      openai.OpenAI(base_url=server.url + "/v1", api_key="-").completions.create(...)

Endpoints: POST /v1/completions and /v1/chat/completions (request format in jaxinfer/serving/openai_api.py;
`stream: true` answers with server-sent events, one chunk per engine output, then `data: [DONE]`),
GET /v1/models (the base model and every loaded LoRA adapter, which `model` selects) and GET
/health (the engine loop's state: running and waiting requests, pages in use).

Every connection's requests go to one EngineLoop (jaxinfer/serving/engine_loop.py), the only thread that
touches the engine, which batches them continuously. A client that disconnects before its
request finishes (mid-stream or while waiting for a whole response) aborts it; its pages come
back at the loop's next turn. Bad requests get HTTP 400 with OpenAI's error body naming the field;
the server keeps serving.
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
import uvicorn
from fastapi.responses import JSONResponse, StreamingResponse

from jaxinfer.engine.engine import Engine
from jaxinfer.serving import openai_api
from jaxinfer.serving.engine_loop import EngineLoop
from jaxinfer.serving.openai_api import RequestError


def build_app(engine: Engine, name: str | None = None, chat_template: str | None = None) -> fastapi.FastAPI:
    """The ASGI app serving `engine` (its adapters as added now) as the model `name` (default the
    model's own name); `chat_template` (jinja, as in HF tokenizer configs) replaces the model's own for
    /v1/chat/completions. Its lifespan starts the engine loop and stops it at shutdown."""
    tokenizer = engine.model.tokenizer
    if tokenizer is None:
        raise ValueError(f"the model {engine.model.name!r} has no tokenizer: the server takes and returns text")
    if chat_template is not None:
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = chat_template
    served = openai_api.ServedModel(name or engine.model.name or "model", tuple(sorted(engine.adapters.store)),
                                    tokenizer, engine.model, engine.max_seq_len)
    loop = EngineLoop(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        loop.stop()

    app = fastapi.FastAPI(title="jaxinfer", lifespan=lifespan)
    app.state.engine_loop = loop

    @app.exception_handler(RequestError)
    async def request_error(request: fastapi.Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = loop.alive and loop.error is None
        return JSONResponse({"status": "ok" if ok else "error", "error": repr(loop.error) if loop.error else None,
                             **loop.snapshot, "aborted": loop.aborted}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "jaxinfer",
             "root": served.name, "parent": None if m == served.name else served.name}
            for m in [served.name, *served.adapters]]}

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return await _serve(request, openai_api.parse(await _body(request), "completion", served), loop)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        return await _serve(request, openai_api.parse(await _body(request), "chat", served), loop)

    return app


async def _body(request: fastapi.Request):
    """The request's JSON body; RequestError (400) if it is not JSON."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None


async def _serve(request: fastapi.Request, parsed: openai_api.Parsed, loop: EngineLoop):
    """Add the request to the engine loop; answer with a whole response or a stream of chunks."""
    try:
        rid, outputs = await loop.add(parsed.prompt, parsed.sampling, parsed.adapter)
    except ValueError as e:
        raise openai_api.engine_error(e, parsed) from None
    if parsed.stream:
        return StreamingResponse(_events(parsed, rid, outputs, loop), media_type="text/event-stream")
    final = await _until_finished(request, rid, outputs, loop)
    return JSONResponse(openai_api.response(parsed, final, openai_api.new_id(parsed)))


async def _next(outputs: asyncio.Queue):
    """The request's next output; the engine loop's failure, raised."""
    out = await outputs.get()
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
    return result.result()


async def _events(parsed: openai_api.Parsed, rid: int, outputs: asyncio.Queue, loop: EngineLoop):
    """Server-sent events for a streamed request; a client that leaves early (the response task is
    cancelled) aborts it."""
    writer = openai_api.ChunkWriter(parsed, openai_api.new_id(parsed))
    finished = False
    try:
        while not finished:
            out = await _next(outputs)
            finished = out.finished
            for chunk in writer.chunks(out):
                yield f"data: {json.dumps(chunk)}\n\n"
        if parsed.include_usage:
            yield f"data: {json.dumps(writer.usage_chunk(out))}\n\n"
        yield "data: [DONE]\n\n"
    except RequestError as e:  # the engine failed the request after the stream began
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        if not finished:
            loop.abort(rid)


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
