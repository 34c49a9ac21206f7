"""The grammar backend interface, and Grammars: one engine's compiled constraints and matchers.

A backend compiles a StructuredOutput against a model's tokenizer (cached by the constraint's
text) and makes a matcher per sequence from a compiled constraint. A matcher follows one
sequence's generated tokens:
  advance(token) -> bool   accept the next token (False: the grammar does not allow it)
  fill(words)              the allowed tokens of the next position as packed int32 words (W,),
                           W = ceil(V / 32), bit t % 32 of word t // 32 = token t allowed (the layout
                           of jaxinfer.sampling.processors.pack_bitmask / apply_bitmask)
  rollback(n)              forget the last n accepted tokens
  complete                 no token but end-of-sequence can follow: the output is finished
  fork()                   an independent copy in the same state (n > 1 samples)
  error                    why the matcher stopped accepting (None while it accepts)

Grammars compiles on the caller's thread (so a constraint that does not compile is refused before
the request is admitted, and the second request with the same constraint pays a dict lookup) and
builds each request's matcher on a thread pool, off the engine's step loop: the engine does not
schedule a sequence whose matcher is still being built.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from jaxinfer.structured.spec import StructuredOutput


class Matcher(Protocol):
    complete: bool
    error: str | None

    def advance(self, token: int) -> bool: ...

    def fill(self, words: np.ndarray) -> None: ...

    def rollback(self, n: int) -> None: ...

    def fork(self) -> Matcher: ...


class Backend(Protocol):
    name: str

    def compile(self, spec: StructuredOutput) -> Any:
        """The compiled constraint; ValueError with the backend's reason if it does not compile."""

    def matcher(self, compiled: Any) -> Matcher:
        """A fresh matcher at the start of the output."""


class Grammars:
    """make_backend() builds the backend on first use (a tokenizer's tables take a fraction of a
    second to build, and most engines never see a constrained request)."""

    def __init__(self, make_backend: Callable[[], Backend], workers: int = 2):
        self._make_backend = make_backend
        self._backend: Backend | None = None
        self._compiled: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._workers = workers

    @property
    def backend(self) -> Backend:
        with self._lock:
            if self._backend is None:
                self._backend = self._make_backend()
            return self._backend

    def compile(self, spec: StructuredOutput) -> Any:
        """The compiled constraint (cached by its text); ValueError naming the field and quoting
        the backend's reason when it does not compile."""
        key = spec.key
        with self._lock:
            hit = self._compiled.get(key)
        if hit is not None:
            return hit
        backend = self.backend
        try:
            compiled = backend.compile(spec)
        except ValueError as e:
            raise ValueError(f"structured.{spec.field} does not compile ({backend.name}): {e}") from None
        with self._lock:
            self._compiled[key] = compiled
        return compiled

    def start(self, spec: StructuredOutput) -> concurrent.futures.Future:
        """Compile (ValueError as compile) and build a fresh matcher for it on the thread pool."""
        compiled = self.compile(spec)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="jaxinfer-grammar")
        return self._pool.submit(self.backend.matcher, compiled)

    def cached(self) -> int:
        with self._lock:
            return len(self._compiled)
