"""Serving: the OpenAI-compatible HTTP surface over one engine.

  openai_api   the wire format: request bodies to engine calls, outputs to responses
  engine_loop  the thread that drives the engine's steps for many concurrent requests
  server       the ASGI app (FastAPI; the [serve] extra)
"""
