"""One thread that owns an Engine and serves many asyncio callers (the HTTP server's connections).

The engine is not thread-safe, so only this loop's thread ever touches it. Callers on an asyncio
event loop send it commands (add a request, abort one) through a thread-safe queue; the thread
applies them between steps, calls `engine.step()` while any request is unfinished, and hands each
step's outputs to the queue of the request they belong to with `loop.call_soon_threadsafe`. Every
request added between two steps joins the running batch at the next one: continuous batching
across connections comes from the engine's scheduler, not from this loop.

  loop = EngineLoop(engine); loop.start()
  rid, outputs = await loop.add(prompt_ids, sampling, adapter)   # ValueError: refused
  out = await outputs.get()          # RequestOutput, finished False until the last one
  loop.abort(rid)                    # the client went away: its pages come back
  loop.submit(lambda e: e.add_adapter("a", path)).result()   # any engine call, made on the loop's thread

`snapshot` holds the engine's figures after the last step (requests, pages, the adapters it
holds), readable from any thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from jaxinfer.engine.engine import Engine
from jaxinfer.sampling.sampler import SamplingParams

log = logging.getLogger("jaxinfer")


class EngineUnavailable(RuntimeError):
    """No engine to serve a request: its loop or its core (jaxinfer/serving/core.py) has stopped.
    The server answers 503."""


@dataclasses.dataclass
class _Add:
    prompt: list[int]
    sampling: SamplingParams
    adapter: str | None
    outputs: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    stream: bool  # False: only the last output is delivered
    reply: concurrent.futures.Future  # the request id, or the ValueError that refused it


@dataclasses.dataclass
class _Abort:
    request_id: int


@dataclasses.dataclass
class _Call:
    fn: Callable[[Engine], Any]
    reply: concurrent.futures.Future  # what fn returned, or what it raised


_STOP = object()


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, bool]] = {}  # live id -> its queue
        self._thread = threading.Thread(target=self._run, name="jaxinfer-engine-loop", daemon=True)
        self.error: BaseException | None = None  # what stopped the loop, if it failed
        self.aborted = 0  # requests aborted because their caller left
        self.snapshot = self._snapshot()  # engine figures after the last step, readable from any thread

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after its current step; requests still running get no more outputs."""
        self._commands.put(_STOP)
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def model(self):
        return self.engine.model

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def grammars(self):
        return self.engine.grammars

    async def add(self, prompt: list[int], sampling: SamplingParams, adapter: str | None = None,
                  stream: bool = True) -> tuple[int, asyncio.Queue]:
        """Queue a request; returns its id and the asyncio queue its outputs arrive on (only the
        last one when not `stream`). Raises the engine's ValueError if it refuses the request,
        EngineUnavailable if the loop has stopped."""
        if not self.alive:
            raise EngineUnavailable(f"the engine loop is not running ({self.error!r})")
        loop = asyncio.get_running_loop()
        reply: concurrent.futures.Future = concurrent.futures.Future()
        outputs: asyncio.Queue = asyncio.Queue()
        self._commands.put(_Add(prompt, sampling, adapter, outputs, loop, stream, reply))
        try:
            return await asyncio.wrap_future(reply), outputs
        except asyncio.CancelledError:  # the caller left while the loop was adding it: abort it once added
            reply.add_done_callback(self._abort_added)
            raise

    def _abort_added(self, reply: concurrent.futures.Future) -> None:
        if not reply.cancelled() and reply.exception() is None:
            self.abort(reply.result())

    def abort(self, request_id: int) -> None:
        """End a request at the loop's next turn (a no-op if it has finished by then)."""
        self._commands.put(_Abort(request_id))

    def submit(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Call fn(engine) on the loop's thread between two steps (the engine is not thread-safe):
        add or remove an adapter while serving. The future holds its result or its exception; the
        snapshot is renewed before it resolves."""
        reply: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Call(fn, reply))
        return reply

    def call(self, method: str, *args) -> concurrent.futures.Future:
        """engine.method(*args) on the loop's thread (add_adapter, remove_adapter): CoreClient's call."""
        return self.submit(lambda engine: getattr(engine, method)(*args))

    # The loop thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.snapshot = self._snapshot()  # adapters added between construction and start
            while True:
                busy = self.engine.has_unfinished()
                if not self._apply(block=not busy):
                    return
                if self.engine.has_unfinished():
                    self._deliver(self.engine.step())
                self.snapshot = self._snapshot()
        except BaseException as e:  # the engine failed: no request can go on; callers see it in /health
            log.exception("the engine loop stopped")
            self.error = e
            for loop, outputs, _ in self._sinks.values():
                loop.call_soon_threadsafe(outputs.put_nowait, e)
            raise

    def _apply(self, block: bool) -> bool:
        """Apply the queued commands (waiting for one when the engine is idle); False on stop."""
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd is _STOP:
                return False
            if isinstance(cmd, _Add):
                self._add(cmd)
            elif isinstance(cmd, _Call):
                self._call(cmd)
            elif cmd.request_id in self._sinks:
                self._sinks.pop(cmd.request_id)
                self.engine.abort(cmd.request_id)
                self.aborted += 1

    def _add(self, cmd: _Add) -> None:
        if not cmd.reply.set_running_or_notify_cancel():  # the caller left before the loop got to it
            return
        try:
            rid = self.engine.add_request(cmd.prompt, cmd.sampling, adapter=cmd.adapter)
        except ValueError as e:
            cmd.reply.set_exception(e)
            return
        self._sinks[rid] = (cmd.loop, cmd.outputs, cmd.stream)
        cmd.reply.set_result(rid)

    def _call(self, cmd: _Call) -> None:
        if not cmd.reply.set_running_or_notify_cancel():
            return
        result = error = None
        try:
            result = cmd.fn(self.engine)
        except Exception as e:  # the caller's to handle, as if it had called the engine itself
            error = e
        self.snapshot = self._snapshot()
        if error is None:
            cmd.reply.set_result(result)
        else:
            cmd.reply.set_exception(error)

    def _deliver(self, outs) -> None:
        """Hand each output to its request's queue (a request not streamed: its last only); a finished
        request's queue is dropped."""
        for out in outs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if out.finished:
                del self._sinks[out.request_id]
            loop, outputs, stream = sink
            if stream or out.finished:
                loop.call_soon_threadsafe(outputs.put_nowait, out)

    def _snapshot(self) -> dict[str, Any]:
        s, a = self.engine.scheduler, self.engine.allocator
        return {"running": len(s.running), "waiting": len(s.waiting), "pages_in_use": a.num_used,
                "pages_free": a.num_free, "num_pages": a.num_pages,
                "adapters": tuple(sorted(self.engine.adapters.store))}
