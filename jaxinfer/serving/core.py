"""The engine core in its own process: it owns the devices and the step loop; API servers, in
other processes, talk to it over a Unix or TCP socket (jaxinfer/serving/wire.py; vLLM v1's split
of API server and engine core).

  proc = spawn_core(CoreSpec("tiny", config=ji.EngineConfig()))   # python -m jaxinfer.serving.core ADDRESS
  client = CoreClient(proc.address, process=proc)                 # jaxinfer/serving/core_client.py

The core listens; each API server connects once. Every message is one pickled tuple. From an API
server:

  ("hello",)                                  -> ("info", Info)
  ("add", rid, prompt, sampling, adapter)     -> ("added", rid) or ("refused", rid, message)
  ("abort", rid)                              end the request; its pages come back
  ("call", cid, method, args)                 -> ("result", cid, value, error): add_adapter, remove_adapter
  ("ping",)                                   I am alive (API servers send one every ping_s)
  ("bye",)                                    I am leaving: abort my requests (so does closing)

and from the core, once per step to each API server with requests in it, ("outs", deltas,
snapshot): per request that got tokens or finished, what is new since the last delta (Delta),
never the text: the API server detokenises (the core's engine runs with text off; stop strings,
which end a sequence and free its pages, are still checked in the core, and cost host work only
for the requests that ask for them). Between steps, ("tick", snapshot) every tick_s.

An API server that sends nothing for client_timeout_s (it was killed, or its host is gone) has
its requests aborted: their pages come back and the other API servers are served on. If the
engine fails, the core sends ("failed", message) to every API server and exits.

Across hosts, engine cores run as the processes of one jax.distributed job (`join_group`, before
the engine is built): each is a replica on its own host's devices, publishes its address in the
job's key-value store and waits for every other's; its Info names them all (Info.peers), so an API
server given any one core serves the whole group (core_client.connect). The job is recoverable
(jax_enable_recoverability): a core that dies leaves the others serving, except process 0, which
runs the job's coordination service: JAX ends the other processes when it goes (seconds later).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import selectors
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from jaxinfer import sharding
from jaxinfer.checkpoints.model import Model
from jaxinfer.checkpoints.weights import load_model
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.requests import RequestOutput
from jaxinfer.engine.runner import TRACE_COUNTS
from jaxinfer.quant import dequantize_params
from jaxinfer.serving import wire

log = logging.getLogger("jaxinfer")
METHODS = ("add_adapter", "remove_adapter")  # the engine methods an API server may call
PARENT_ENV = "JAXINFER_CORE_PARENT"  # set by CoreProcess: the pid whose exit ends the core
CPUS_ENV = "JAXINFER_CORE_CPUS"  # the CPUs the core runs on (a benchmark's pinning), comma-separated; unset: any
GROUP_KEY = "jaxinfer/engine_core/"  # + process index: that core's address, in the jax.distributed key-value store


@dataclasses.dataclass(frozen=True)
class CoreSpec:
    """What an engine core builds: the model (a name for ji.load_model, or a loaded Model, sent to
    the core whole), its EngineConfig, LoRA adapters (name -> PEFT directory or LoraAdapter), and
    the programs it compiles before serving (warmup: Engine.warmup's (max_prompt_len, max_len), or
    () for all of them; None: compile on first use)."""

    model: str | Model
    config: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    dtype: str = "float32"
    dequantize: bool = False
    adapters: dict[str, Any] = dataclasses.field(default_factory=dict)
    warmup: tuple | None = None

    def build(self) -> Engine:
        model = self.model if isinstance(self.model, Model) else load_model(self.model, dtype=self.dtype)
        if self.dequantize:
            model = dataclasses.replace(model, params=dequantize_params(model.params))
        if self.config.tp * self.config.ep > 1 and in_group():  # a replica of a group: this host's devices, not the job's
            model = sharding.shard_model(model, sharding.make_mesh(self.config.tp, ep=self.config.ep,
                                                                   devices=_jax().local_devices()))
        engine = Engine(model, self.config, detokenize=False)
        for name, adapter in self.adapters.items():
            engine.add_adapter(name, adapter)
        if self.warmup is not None:
            engine.warmup(*self.warmup)
        return engine


@dataclasses.dataclass(frozen=True)
class Info:
    """What an API server needs from the core to check and render requests: the model without its
    weights (config, tokenizer, name), the context, the KV page size (prefix-aware balancing) and
    the structured-output backend."""

    model: Model
    max_seq_len: int
    page_size: int
    structured_backend: str
    snapshot: dict
    peers: tuple[str, ...] = ()  # every core of this one's jax.distributed group (join_group), by process index


@dataclasses.dataclass(frozen=True)
class Delta:
    """What one step added to one request: per sample, its new tokens and their Logprobs (None: not
    asked), its finish reason and error; once the request is done, its metrics and its prompt's
    Logprobs."""

    rid: int
    samples: list[tuple[list[int], list | None, str | None, str | None]]
    finished: bool
    metrics: dict | None = None
    prompt_logprobs: list | None = None


def snapshot(engine: Engine, aborted: int = 0) -> dict:
    """The core's figures: requests, pages, adapters, aborts, and the programs compiled so far."""
    s, a = engine.scheduler, engine.allocator
    return {"running": len(s.running), "waiting": len(s.waiting), "pages_in_use": a.num_used,
            "pages_free": a.num_free, "num_pages": a.num_pages, "adapters": tuple(sorted(engine.adapters.store)),
            "aborted": aborted, "compiles": sum(TRACE_COUNTS.values())}


class Core:
    """The core's loop over one engine and the connections of its API servers (in the core's process)."""

    def __init__(self, engine: Engine, address: str, *, client_timeout_s: float = 10.0, tick_s: float = 0.5,
                 parent: int | None = None):
        """parent: the pid of the process that started this core; the core exits when that one has.
        self.peers: the addresses of this core's group (publish_address), () when alone."""
        self.engine = engine
        self.client_timeout_s, self.tick_s = client_timeout_s, tick_s
        self.listener, self.address = wire.listen(address)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.clients: dict[int, wire.Connection] = {}  # API server (a number) -> its connection
        self.seen: dict[int, float] = {}  # API server -> when it last sent anything
        self.owner: dict[int, tuple[int, int]] = {}  # engine request id -> (API server, its request id)
        self.ids: dict[tuple[int, int], int] = {}  # (API server, its request id) -> engine request id
        self.sent: dict[int, list[tuple[int, int]]] = {}  # engine request id -> per sample (tokens, logprobs) sent
        self.aborted = 0
        self.parent = parent
        self.peers: tuple[str, ...] = ()
        self._next_client = 0

    def run(self) -> None:
        last_tick = 0.0
        try:
            while True:
                self._poll(0 if self.engine.has_unfinished() else self.tick_s)
                self._expire_clients()
                if self.engine.has_unfinished():
                    self._deliver(self.engine.step())
                if time.monotonic() - last_tick >= self.tick_s:
                    last_tick = time.monotonic()
                    if self.parent is not None and os.getppid() != self.parent:
                        log.warning("the process that started this engine core has exited: so does the core")
                        return
                    self._broadcast(("tick", snapshot(self.engine, self.aborted)))
        except BaseException as e:
            log.exception("the engine core stopped")
            self._broadcast(("failed", f"the engine core failed: {e!r}"))
            raise
        finally:
            self.close()

    def close(self) -> None:
        for client in list(self.clients):
            self._drop(client)
        self.selector.close()
        self.listener.close()
        wire.remove(self.address)

    def _send(self, client: int, message: tuple) -> None:
        conn = self.clients.get(client)
        if conn is None:
            return
        try:
            pending = conn.send(message)
        except OSError:  # it has gone
            self._drop(client)
            return
        if pending:  # the rest goes when the socket is writable (_poll)
            self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _broadcast(self, message: tuple) -> None:
        for client in list(self.clients):
            self._send(client, message)

    def _poll(self, timeout_s: float) -> None:
        """Take new API servers, their messages, and write what waits to be written."""
        for key, mask in self.selector.select(timeout_s):
            if key.fileobj is self.listener:
                self._accept()
                continue
            client = key.data
            conn = self.clients.get(client)
            if conn is None:
                continue
            if mask & selectors.EVENT_WRITE:
                try:
                    if not conn.flush():
                        self.selector.modify(conn.sock, selectors.EVENT_READ, client)
                except OSError:
                    self._drop(client)
                    continue
            if mask & selectors.EVENT_READ:
                messages = conn.receive()
                if messages is None:  # it closed its end (left, or its process ended)
                    self._drop(client)
                    continue
                self.seen[client] = time.monotonic()
                for msg in messages:
                    if client not in self.clients:  # it said bye
                        break
                    self._handle(client, msg)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            client, self._next_client = self._next_client, self._next_client + 1
            self.clients[client] = wire.Connection(sock)
            self.seen[client] = time.monotonic()
            self.selector.register(sock, selectors.EVENT_READ, client)

    def _handle(self, client: int, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            self._add(client, *msg[1:])
        elif kind == "abort":
            self._abort(client, msg[1])
        elif kind == "hello":
            e = self.engine
            self._send(client, ("info", Info(dataclasses.replace(e.model, params=None, placement=None),
                                             e.max_seq_len, e.allocator.page_size, e.config.structured_backend,
                                             snapshot(e, self.aborted), self.peers)))
        elif kind == "call":
            self._call(client, *msg[1:])
        elif kind == "bye":
            self._drop(client)

    def _add(self, client: int, rid: int, prompt, sampling, adapter) -> None:
        try:
            eid = self.engine.add_request(prompt, sampling, adapter=adapter)
        except ValueError as e:
            self._send(client, ("refused", rid, str(e)))
            return
        self.owner[eid], self.ids[(client, rid)] = (client, rid), eid
        self.sent[eid] = []
        self._send(client, ("added", rid))

    def _abort(self, client: int, rid: int) -> None:
        eid = self.ids.pop((client, rid), None)
        if eid is None:  # finished already
            return
        del self.owner[eid], self.sent[eid]
        self.engine.abort(eid)
        self.aborted += 1

    def _call(self, client: int, cid: int, method: str, args: tuple) -> None:
        value = error = None
        try:
            if method not in METHODS:
                raise ValueError(f"{method!r} is not an engine method an API server may call ({', '.join(METHODS)})")
            value = getattr(self.engine, method)(*args)
        except Exception as e:  # the caller's, as if it had called the engine
            error = e
        self._send(client, ("result", cid, value, error, snapshot(self.engine, self.aborted)))

    def _drop(self, client: int) -> None:
        """An API server left (or is taken for gone): close its connection, abort its requests."""
        self.seen.pop(client, None)
        conn = self.clients.pop(client, None)
        if conn is not None:
            self.selector.unregister(conn.sock)
            conn.close()
        for (c, rid) in [k for k in self.ids if k[0] == client]:
            self._abort(c, rid)

    def _expire_clients(self) -> None:
        now = time.monotonic()
        for client in [c for c, t in self.seen.items() if now - t > self.client_timeout_s]:
            log.warning("API server %r sent nothing for %.0f s: its requests are aborted", client,
                        self.client_timeout_s)
            self._drop(client)

    def _deliver(self, outs: list[RequestOutput]) -> None:
        """One message per API server: the deltas of its requests in this step."""
        batches: dict[int, list[Delta]] = {}
        for out in outs:
            owner = self.owner.get(out.request_id)
            if owner is None:
                continue
            client, rid = owner
            batches.setdefault(client, []).append(self._delta(rid, out))
            if out.finished:
                del self.owner[out.request_id], self.ids[owner], self.sent[out.request_id]
        snap = snapshot(self.engine, self.aborted) if batches else None
        for client, deltas in batches.items():
            self._send(client, ("outs", deltas, snap))

    def _delta(self, rid: int, out: RequestOutput) -> Delta:
        sent = self.sent[out.request_id]
        samples = []
        for i, s in enumerate(out.samples or [out]):
            if i == len(sent):
                sent.append((0, 0))
            k, j = sent[i]
            logprobs = None if s.logprobs is None else s.logprobs[j:]
            sent[i] = (len(s.token_ids), j + len(logprobs or ()))
            samples.append((s.token_ids[k:], logprobs, s.finish_reason, s.error))
        if not out.finished:
            return Delta(rid, samples, False)
        return Delta(rid, samples, True, out.metrics, out.prompt_logprobs)


def _jax():
    import jax  # noqa: PLC0415  (the core's process only: an API server never starts a JAX backend)

    return jax


def in_group() -> bool:
    """Whether this process is one of a jax.distributed job's (join_group)."""
    from jax._src import distributed  # noqa: PLC0415  (its key-value store has no public name)

    return distributed.global_state.client is not None


def join_group(coordinator: str = "", num_processes: int | None = None, process_id: int | None = None) -> None:
    """Make this process an engine core of a jax.distributed job (sharding.initialize's arguments),
    recoverable: one core that dies leaves the others running. Without JAX's preemption service,
    whose SIGTERM handler would keep the core from stopping when told to. Call before anything
    starts a JAX backend (the engine is built after)."""
    jax = _jax()
    jax.config.update("jax_enable_recoverability", True)
    jax.config.update("jax_enable_preemption_service", False)
    sharding.initialize(coordinator, num_processes, process_id)


def publish_address(address: str, host: str, timeout_s: float = 300.0) -> tuple[str, ...]:
    """Put this core's address, reachable at `host` when it was bound to every interface, in the job's
    key-value store, and wait up to timeout_s for every other core's: the group's addresses, by process index."""
    from jax._src import distributed  # noqa: PLC0415

    jax = _jax()
    scheme, _, rest = address.partition("://")
    bound, _, port = rest.rpartition(":")
    if scheme == "tcp" and bound in ("0.0.0.0", "*", "[::]", "::"):
        address = f"tcp://{host}:{port}"
    client = distributed.global_state.client
    client.key_value_set(f"{GROUP_KEY}{jax.process_index()}", address)
    try:
        return tuple(client.blocking_key_value_get(f"{GROUP_KEY}{i}", int(timeout_s * 1000))
                     for i in range(jax.process_count()))
    except Exception as e:  # the store's own error names no process
        raise RuntimeError(f"the engine cores of this jax.distributed job did not all publish their addresses in "
                           f"{timeout_s:.0f} s ({jax.process_count()} processes): {e}") from None


def main(argv: list[str]) -> None:
    """python -m jaxinfer.serving.core ADDRESS [CLIENT_TIMEOUT_S] < pickled CoreSpec: build the
    engine, bind ADDRESS (tcp://HOST:PORT, ipc://PATH), serve until killed."""
    spec: CoreSpec = pickle.load(sys.stdin.buffer)
    if os.environ.get(CPUS_ENV):  # before the engine's threads start: they inherit it
        os.sched_setaffinity(0, {int(c) for c in os.environ[CPUS_ENV].split(",")})
    engine = spec.build()
    parent = os.environ.get(PARENT_ENV)
    core = Core(engine, argv[1], client_timeout_s=float(argv[2]) if len(argv) > 2 else 10.0,
                parent=int(parent) if parent else None)
    log.info("engine core serving %s", core.address)
    core.run()


class CoreProcess:
    """An engine core started as a child process (python -m jaxinfer.serving.core)."""

    def __init__(self, spec: CoreSpec, address: str | None = None, env: dict[str, str] | None = None,
                 client_timeout_s: float = 10.0, cpus: tuple[int, ...] = ()):
        self.address = address or f"ipc://{tempfile.gettempdir()}/jaxinfer-core-{uuid.uuid4().hex[:12]}"
        self.process = subprocess.Popen([sys.executable, "-m", "jaxinfer.serving.core", self.address,
                                         str(client_timeout_s)], stdin=subprocess.PIPE,
                                        env={**os.environ, **(env or {}), PARENT_ENV: str(os.getpid()),
                                             **({CPUS_ENV: ",".join(map(str, cpus))} if cpus else {})})
        self.process.stdin.write(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))
        self.process.stdin.close()

    def exit_code(self) -> int | None:
        return self.process.poll()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn_core(spec: CoreSpec, address: str | None = None, env: dict[str, str] | None = None,
               client_timeout_s: float = 10.0, cpus: tuple[int, ...] = ()) -> CoreProcess:
    """Start an engine core for `spec` in a child process (env: extra environment variables, such
    as the devices it may use; cpus: the only CPUs it may run on); returns at once (CoreClient
    waits for it to answer)."""
    return CoreProcess(spec, address, env, client_timeout_s, cpus)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s core %(levelname)s %(message)s")
    from jaxinfer.serving import core as _module  # the messages' classes pickled by their module's name, not __main__'s

    _module.main(sys.argv)
