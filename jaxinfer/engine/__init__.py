"""The engine: requests in, tokens out, over a paged KV cache.

  engine       Engine, the request facade (add_request, step, stream, generate, abort)
  config       EngineConfig
  scheduler    which sequences run each step (continuous / static batching, chunked prefill)
  kv_manager   the host side of the paged cache: pages, reference counts, prefix cache
  runner       the jitted programs over the device state; mock_runner: the same verbs, no model
  pipeline     multi-step decode calls and overlap; speculation: verify passes
  lifecycle    requests, their sequences and what each step's tokens do to them
  requests     request checks, outputs and stop rules
  metrics      per-step counters and run-level figures
  baseline     contiguous-cache generation, the reference the engine is checked against
"""

from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import Engine

__all__ = ["Engine", "EngineConfig"]
