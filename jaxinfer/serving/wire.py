"""The engine core's transport: pickled messages, each after its length, over a stream socket: a
Unix socket (ipc://PATH) on one host, TCP (tcp://HOST:PORT) across hosts.

A send is one system call in the sender's own thread. ZeroMQ, the first transport here, hands each
send to an I/O thread of the sender's process; where the sender shares its CPU (an engine core
whose XLA threads compute the next step while its host hands out the last one, an API server
beside its load), waking that thread cost the sender a scheduling slice: 0.3-0.6 ms a send on
average and 3-5 ms at p99, against 23 us for a Unix socket (benchmarks/results/serving.md).

Messages are pickles: an engine core's address must be reachable only by its API servers.
"""

from __future__ import annotations

import os
import pickle
import selectors
import socket
import struct
import time
from collections.abc import Callable

HEADER = struct.Struct("!I")  # a message's length in bytes


def parse(address: str) -> tuple[int, str | tuple[str, int]]:
    """An address (ipc://PATH, tcp://HOST:PORT; HOST * is every interface, PORT * or 0 a free one)
    as a socket family and a socket address."""
    scheme, _, rest = address.partition("://")
    if scheme == "ipc" and rest:
        return socket.AF_UNIX, rest
    host, _, port = rest.rpartition(":")
    if scheme == "tcp" and host and (port == "*" or port.isdigit()):
        host = "0.0.0.0" if host == "*" else host.strip("[]")
        return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, 0 if port == "*" else int(port))
    raise ValueError(f"engine core address {address!r}: expected ipc://PATH or tcp://HOST:PORT")


def listen(address: str) -> tuple[socket.socket, str]:
    """A listening socket bound to `address`, and the address it is bound to (the port chosen)."""
    family, where = parse(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_UNIX:
        remove(address)  # a socket file left by a core that was killed
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(where)
    sock.listen(64)
    if family == socket.AF_UNIX:
        return sock, address
    host, port = sock.getsockname()[:2]
    return sock, f"tcp://{f'[{host}]' if ':' in host else host}:{port}"


def connect(address: str, timeout_s: float, gone: Callable[[], str | None] = lambda: None) -> socket.socket:
    """A (blocking) socket connected to the core at `address`, trying again while it starts;
    RuntimeError when gone() says why it never will, or after timeout_s. Connection() it to use it."""
    family, where = parse(address)
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect(where)
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            if (why := gone()) is not None:
                raise RuntimeError(why) from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine core at {address} did not answer in {timeout_s:.0f} s") from None
            time.sleep(0.1)
            continue
        return sock


def remove(address: str) -> None:
    """The socket file of a Unix address, once its listener is closed (nothing for TCP)."""
    family, where = parse(address)
    if family == socket.AF_UNIX and os.path.exists(where):
        os.unlink(where)


def frame(message) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class Connection:
    """A non-blocking stream socket: messages out through a buffer (what the socket does not take
    now goes when it is writable), messages in as whole ones."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.out = bytearray()
        self.inbox = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message) -> bool:
        """Queue a message and write what the socket takes; whether some is left for flush().
        OSError (ConnectionError): the other side has gone."""
        self.out += frame(message)
        return self.flush()

    def flush(self) -> bool:
        """Write what the socket takes of what is queued; whether some is left."""
        while self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return True
            del self.out[:n]
        return False

    def receive(self) -> list | None:
        """The whole messages that have arrived (maybe none); None once the other side has closed."""
        try:
            data = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return []
        except ConnectionError:
            return None
        if not data:
            return None
        self.inbox += data
        messages = []
        while len(self.inbox) >= HEADER.size:
            (n,) = HEADER.unpack_from(self.inbox)
            if len(self.inbox) < HEADER.size + n:
                break
            messages.append(pickle.loads(self.inbox[HEADER.size:HEADER.size + n]))
            del self.inbox[:HEADER.size + n]
        return messages

    def close(self) -> None:
        self.sock.close()


def request(address: str, message, reply: str, timeout_s: float, gone: Callable[[], str | None] = lambda: None):
    """Send one message to the core at `address`, wait (blocking) for the first answer of kind
    `reply` and return it, then leave with ("bye",)."""
    deadline = time.monotonic() + timeout_s
    sock = connect(address, timeout_s, gone)
    try:
        sock.sendall(frame(message))
        conn = Connection(sock)
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ)
            while True:
                if not sel.select(0.25):
                    if (why := gone()) is not None:
                        raise RuntimeError(why)
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the engine core at {address} did not answer in {timeout_s:.0f} s")
                    continue
                got = conn.receive()
                if got is None:
                    raise RuntimeError(f"the engine core at {address} closed the connection")
                for msg in got:
                    if msg[0] == reply:
                        sock.setblocking(True)
                        sock.sendall(frame(("bye",)))
                        return msg
    finally:
        sock.close()
