"""Serving: the OpenAI-compatible HTTP surface over an engine, in-process or in engine core processes.

  openai_api   the wire format: checked requests to engine calls, outputs to responses
  schema       the request bodies as pydantic models (checks and /openapi.json), the error body
  limits       the bounds on one request and on the requests held at once
  guards       the ASGI middleware before the app: API key, body size, admission (401, 413, 429)
  engine_loop  the thread that drives the engine's steps for many concurrent requests
  core         the engine core in a process of its own (over a socket): the step loop, token ids out
  core_client  the API server's side of a core (detokenising), and Replicas behind one API
  server       the ASGI app (FastAPI; the [serve] extra)
"""
