"""The API server's side of an engine core in another process (jaxinfer/serving/core.py), and
several cores behind one API with a prefix-aware balancer.

  proc = core.spawn_core(core.CoreSpec("tiny"))
  client = CoreClient(proc.address, process=proc)     # waits for the core's answer (it may be compiling)
  app = server.build_app(client)                      # the same server as over an in-process Engine

CoreClient has the surface the server uses of EngineLoop (jaxinfer/serving/engine_loop.py): `add`
(a request id and an asyncio queue of RequestOutputs), `abort`, `call` (add or remove an adapter),
`snapshot`, `alive`, `error`, `model` (weights left in the core), `max_seq_len`, `grammars` (to
compile a constraint before the request reaches the core). Its connection (wire.Connection) lives
on the server's event loop: `start` there, `stop` at shutdown. The host work the core leaves out happens
here, once per step for all of a step's requests: the tokens of each delta are appended, a
streamed request's text is decoded incrementally (StopChecker.stream_text: never taken back) and
its RequestOutput queued; a request that is not streamed is rendered once, when it finishes.

If the core exits or its connection drops, every request waiting on it gets EngineUnavailable
(the server answers 503) and so does every new one.

Replicas puts several cores (data parallel: one per device or tensor-parallel group) behind one
API: a request goes to the live replica that most likely holds the longest prefix of its prompt
in its KV cache (the full pages of prompts it was sent, remembered up to its number of pages,
least recently used forgotten first; the same adapter only), else to the least loaded one.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import itertools
import logging
from typing import Any

from jaxinfer import structured
from jaxinfer.engine.requests import RequestOutput, StopChecker, StopRules, request_output
from jaxinfer.sampling.params import SamplingParams
from jaxinfer.sampling.processors import Vocab
from jaxinfer.serving import wire
from jaxinfer.serving.core import Info
from jaxinfer.serving.engine_loop import EngineUnavailable

log = logging.getLogger("jaxinfer")


@dataclasses.dataclass(eq=False)
class _Sample:
    checker: StopChecker  # its stream_text: the incremental detokenisation of a streamed sample
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list | None = None
    reason: str | None = None
    error: str | None = None


@dataclasses.dataclass(eq=False)
class _Request:
    rid: int
    prompt: list[int]
    sampling: SamplingParams
    stream: bool
    outputs: asyncio.Queue
    accepted: asyncio.Future  # the core's answer to the add
    samples: list[_Sample] = dataclasses.field(default_factory=list)


def handshake(address: str, process=None, timeout_s: float = 600.0) -> Info:
    """Ask the core at `address` for its Info, waiting while it starts (loads, compiles); RuntimeError
    if its process exits first or it does not answer in timeout_s."""

    def gone() -> str | None:
        if process is not None and process.exit_code() is not None:
            return f"the engine core for {address} exited with code {process.exit_code()} before it served"
        return None

    return wire.request(address, ("hello",), "info", timeout_s, gone)[1]


class CoreClient:
    def __init__(self, address: str, *, process=None, connect_timeout_s: float = 600.0, ping_s: float = 0.5,
                 id_offset: int = 0, id_stride: int = 1):
        """A client of the core at `address` (`process`: the CoreProcess that runs it, watched for its
        exit); request ids are id_offset + k * id_stride (Replicas gives each core its own)."""
        self.address, self.process, self.ping_s = address, process, ping_s
        info = handshake(address, process, connect_timeout_s)
        self.model, self.max_seq_len, self.page_size = info.model, info.max_seq_len, info.page_size
        self.snapshot: dict[str, Any] = info.snapshot
        self.peers = info.peers  # the core's jax.distributed group (core.join_group), () when alone
        self.rules = StopRules(self.model)
        self.grammars = structured.for_tokenizer(self.model.tokenizer, self.model.config.vocab_size,
                                                 Vocab.of(self.model).eos_ids, info.structured_backend)
        self.error: EngineUnavailable | None = None
        self._ids = itertools.count(id_offset, id_stride)
        self._requests: dict[int, _Request] = {}  # live requests by id
        self._calls: dict[int, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conn: wire.Connection | None = None

    # The server's lifespan ---------------------------------------------------------------------

    def start(self) -> None:
        """Connect on the running event loop (the server's); read outputs and send pings there."""
        self.loop = asyncio.get_running_loop()
        self.conn = wire.Connection(wire.connect(self.address, 10.0, self._gone))
        self.loop.add_reader(self.conn.fileno(), self._readable)
        self._send(("hello",))
        self._tasks = [self.loop.create_task(self._ping())]

    def stop(self) -> None:
        """Leave the core (it aborts this server's requests); the core itself runs on."""
        for t in self._tasks:
            t.cancel()
        if self.conn is not None and self.conn.sock.fileno() >= 0:
            self._send(("bye",))
            self._close()
        self._fail("the API server stopped", quiet=True)

    @property
    def alive(self) -> bool:
        return self.error is None and (self.process is None or self.process.exit_code() is None)

    @property
    def aborted(self) -> int:
        return self.snapshot.get("aborted", 0)

    @property
    def load(self) -> int:
        """Requests this client has in the core now."""
        return len(self._requests)

    # Requests ----------------------------------------------------------------------------------

    async def add(self, prompt: list[int], sampling: SamplingParams, adapter: str | None = None,
                  stream: bool = True) -> tuple[int, asyncio.Queue]:
        """Send a request to the core; its id and the queue its outputs arrive on (only the last one
        when not `stream`). ValueError: the core's engine refused it; EngineUnavailable: no core."""
        if not self.alive:
            raise self.error or EngineUnavailable(f"the engine core at {self.address} has exited")
        rid = next(self._ids)
        req = _Request(rid, list(prompt), sampling, stream, asyncio.Queue(), self.loop.create_future())
        self._requests[rid] = req
        self._send(("add", rid, req.prompt, sampling, adapter))
        try:
            await req.accepted
        except asyncio.CancelledError:
            self.abort(rid)
            raise
        except BaseException:
            self._requests.pop(rid, None)
            raise
        return rid, req.outputs

    def abort(self, request_id: int) -> None:
        """End a request (a no-op once it has finished); its pages come back at the core's next turn."""
        if self._requests.pop(request_id, None) is not None and self.error is None:
            self._send(("abort", request_id))

    def call(self, method: str, *args) -> concurrent.futures.Future:
        """engine.method(*args) in the core (add_adapter, remove_adapter), from any thread; the future
        holds what it returned or raised."""
        if self.loop is None:
            raise RuntimeError("the client is not started (the server's lifespan starts it)")

        async def call():
            cid = next(self._ids)
            self._calls[cid] = reply = self.loop.create_future()
            self._send(("call", cid, method, args))
            return await reply

        return asyncio.run_coroutine_threadsafe(call(), self.loop)

    # On the event loop ---------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        if self.conn is None or self.conn.sock.fileno() < 0:
            return
        try:
            if self.conn.send(message):  # the rest when the socket takes it
                self.loop.add_writer(self.conn.fileno(), self._writable)
        except OSError as e:
            self._fail(f"the connection to the engine core at {self.address} dropped ({e})")

    def _writable(self) -> None:
        try:
            if not self.conn.flush():
                self.loop.remove_writer(self.conn.fileno())
        except OSError as e:
            self._fail(f"the connection to the engine core at {self.address} dropped ({e})")

    def _readable(self) -> None:
        try:
            messages = self.conn.receive()
            if messages is None:  # its process ended, or its host went away
                self._fail(f"the connection to the engine core at {self.address} dropped")
                return
            for msg in messages:
                self._receive(msg)
        except Exception as e:  # a message this client cannot read: no request could go on
            self._fail(f"reading from the engine core at {self.address} failed: {e!r}")

    def _close(self) -> None:
        if self.conn is not None and self.conn.sock.fileno() >= 0:
            self.loop.remove_reader(self.conn.fileno())
            self.loop.remove_writer(self.conn.fileno())
            self.conn.close()

    def _gone(self) -> str | None:
        if self.process is not None and self.process.exit_code() is not None:
            return f"the engine core exited with code {self.process.exit_code()}"
        return None

    def _receive(self, msg: tuple) -> None:
        """One message from the core: outputs, figures, answers to adds and calls, its failure."""
        kind = msg[0]
        if kind == "outs":
            self.snapshot = msg[2]
            for delta in msg[1]:
                self._apply(delta)
        elif kind == "tick":
            self.snapshot = msg[1]
        elif kind in ("added", "refused"):
            req = self._requests.get(msg[1])
            if req is not None and not req.accepted.done():
                if kind == "added":
                    req.accepted.set_result(msg[1])
                else:
                    req.accepted.set_exception(ValueError(msg[2]))
        elif kind == "result":
            _, cid, value, error, self.snapshot = msg
            reply = self._calls.pop(cid, None)
            if reply is not None and not reply.done():
                reply.set_result(value) if error is None else reply.set_exception(error)
        elif kind == "failed":
            self._fail(msg[1])

    def _apply(self, delta) -> None:
        """A step's delta of one request: its samples' new tokens; its output queued if streamed or done."""
        req = self._requests.get(delta.rid)
        if req is None:  # aborted here after the core sent it
            return
        room = self.max_seq_len + 1 - len(req.prompt)
        for i, (tokens, logprobs, reason, error) in enumerate(delta.samples):
            if i == len(req.samples):
                req.samples.append(_Sample(self.rules.checker(req.sampling, room),
                                           logprobs=None if req.sampling.logprobs is None else []))
            s = req.samples[i]
            s.tokens += tokens
            if logprobs is not None:
                s.logprobs += logprobs
            s.reason, s.error = reason, error
        if delta.finished:
            del self._requests[delta.rid]
            req.outputs.put_nowait(self._output(req, delta))
        elif req.stream:
            req.outputs.put_nowait(self._output(req, None))

    def _output(self, req: _Request, done) -> RequestOutput:
        """The request's RequestOutput so far (done: the core's final delta), as Engine.step gives it."""
        finished = done is not None
        samples = []
        for s in req.samples:
            text = (self.rules.completion_text(req.sampling, s.tokens) if finished
                    else s.checker.stream_text(s.tokens))
            samples.append(RequestOutput(req.prompt, list(s.tokens), text, s.reason, done.metrics if finished else {},
                                         error=s.error, request_id=req.rid, finished=finished,
                                         logprobs=None if s.logprobs is None else list(s.logprobs),
                                         prompt_logprobs=done.prompt_logprobs if finished else None))
        return request_output(samples, finished, req.sampling.n)

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(self.ping_s)
            if self.process is not None and self.process.exit_code() is not None:
                self._fail(f"the engine core exited with code {self.process.exit_code()}")
                return
            self._send(("ping",))

    def _fail(self, message: str, quiet: bool = False) -> None:
        """No core any more: every live request and call gets EngineUnavailable, and so will new ones."""
        if self.error is not None:
            return
        self.error = EngineUnavailable(message)
        self._close()
        if not quiet:
            log.error("%s", message)
        for req in self._requests.values():
            if req.accepted.done():
                req.outputs.put_nowait(self.error)
            else:
                req.accepted.set_exception(self.error)
        self._requests.clear()
        for reply in self._calls.values():
            if not reply.done():
                reply.set_exception(self.error)
        self._calls.clear()


class Replicas:
    """Engine cores (CoreClients) behind one API; the same surface as one CoreClient."""

    def __init__(self, clients: list[CoreClient]):
        if not clients:
            raise ValueError("Replicas needs at least one engine core")
        self.clients = clients
        first = clients[0]
        self.model, self.max_seq_len, self.page_size, self.grammars = (first.model, first.max_seq_len,
                                                                       first.page_size, first.grammars)
        self.cached = [collections.OrderedDict() for _ in clients]  # per replica: prefix hashes sent, LRU order
        self.sent = [0] * len(clients)  # requests sent to each replica
        self._turn = 0

    def start(self) -> None:
        for c in self.clients:
            c.start()

    def stop(self) -> None:
        for c in self.clients:
            c.stop()

    @property
    def alive(self) -> bool:
        return any(c.alive for c in self.clients)

    @property
    def error(self) -> EngineUnavailable | None:
        return None if self.alive else self.clients[0].error

    @property
    def aborted(self) -> int:
        return sum(c.aborted for c in self.clients)

    @property
    def snapshot(self) -> dict:
        snaps = [c.snapshot for c in self.clients if c.alive] or [self.clients[0].snapshot]
        total = {k: sum(s.get(k, 0) for s in snaps) for k in ("running", "waiting", "pages_in_use", "pages_free",
                                                                "num_pages", "aborted", "compiles")}
        return {**total, "adapters": snaps[0]["adapters"], "replicas": len(snaps)}

    def prefix_hashes(self, prompt: list[int], adapter: str | None) -> list[int]:
        """One hash per full page of the prompt, each over the pages before it (and the adapter)."""
        p, h, out = self.page_size, hash(adapter), []
        for i in range(len(prompt) // p):
            h = hash((h, tuple(prompt[i * p:(i + 1) * p])))
            out.append(h)
        return out

    def choose(self, hashes: list[int]) -> int:
        """The live replica holding the most leading pages of the prompt; ties (no hit included) go
        to the least loaded, then round-robin."""
        live = [i for i, c in enumerate(self.clients) if c.alive]
        if not live:
            raise self.clients[0].error or EngineUnavailable("no engine core is running")

        def held(i: int) -> int:
            n = 0
            while n < len(hashes) and hashes[n] in self.cached[i]:
                n += 1
            return n

        order = sorted(live, key=lambda i: (-held(i), self.clients[i].load, (i - self._turn) % len(self.clients)))
        self._turn = order[0] + 1
        return order[0]

    def _remember(self, i: int, hashes: list[int]) -> None:
        cache, capacity = self.cached[i], max(1, self.clients[i].snapshot["num_pages"])
        for h in hashes:
            cache[h] = None
            cache.move_to_end(h)
        while len(cache) > capacity:
            cache.popitem(last=False)

    async def add(self, prompt: list[int], sampling: SamplingParams, adapter: str | None = None,
                  stream: bool = True) -> tuple[int, asyncio.Queue]:
        hashes = self.prefix_hashes(prompt, adapter)
        i = self.choose(hashes)
        rid, outputs = await self.clients[i].add(prompt, sampling, adapter, stream)
        self._remember(i, hashes)
        self.sent[i] += 1
        return rid, outputs

    def abort(self, request_id: int) -> None:
        self.clients[request_id % len(self.clients)].abort(request_id)

    def call(self, method: str, *args) -> concurrent.futures.Future:
        """engine.method(*args) on every live replica; the future holds the first's result, or an error."""
        futures = [c.call(method, *args) for c in self.clients if c.alive]
        done: concurrent.futures.Future = concurrent.futures.Future()

        def settle(_):
            if all(f.done() for f in futures) and not done.done():
                errors = [f.exception() for f in futures if f.exception() is not None]
                done.set_exception(errors[0]) if errors else done.set_result(futures[0].result())

        for f in futures:
            f.add_done_callback(settle)
        return done


def connect(addresses: list[str], processes: list | None = None, connect_timeout_s: float = 600.0):
    """A CoreClient for one address, Replicas for several (processes: their CoreProcesses, or None).
    One address of a core in a jax.distributed group (core.join_group) stands for its whole group."""
    processes = processes or [None] * len(addresses)
    n = len(addresses)
    clients = [CoreClient(a, process=p, connect_timeout_s=connect_timeout_s, id_offset=i, id_stride=n)
               for i, (a, p) in enumerate(zip(addresses, processes))]
    if n == 1 and len(clients[0].peers) > 1:
        n = len(clients[0].peers)
        clients = [CoreClient(a, connect_timeout_s=connect_timeout_s, id_offset=i, id_stride=n)
                   for i, a in enumerate(clients[0].peers)]
    return clients[0] if n == 1 else Replicas(clients)
