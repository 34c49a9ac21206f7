"""jaxinfer/serving/wire.py, the engine core's transport: addresses, whole messages out of partial
reads, a send the socket cannot take at once, a closed end."""

from __future__ import annotations

import socket

import pytest

from jaxinfer.serving import wire


@pytest.mark.parametrize("address, family, where", [
    ("ipc:///tmp/core.sock", socket.AF_UNIX, "/tmp/core.sock"),
    ("tcp://127.0.0.1:5555", socket.AF_INET, ("127.0.0.1", 5555)),
    ("tcp://*:*", socket.AF_INET, ("0.0.0.0", 0)),
    ("tcp://[::1]:7", socket.AF_INET6, ("::1", 7)),
])
def test_addresses(address, family, where):
    assert wire.parse(address) == (family, where)


@pytest.mark.parametrize("address", ["", "ipc://", "tcp://host", "tcp://host:port", "udp://h:1", "/tmp/x"])
def test_a_bad_address_is_refused_by_name(address):
    with pytest.raises(ValueError, match="expected ipc://PATH or tcp://HOST:PORT"):
        wire.parse(address)


def test_messages_arrive_whole_from_any_split_of_the_bytes():
    a, b = socket.socketpair()
    reader = wire.Connection(b)
    messages = [("add", 1, list(range(300)), None), ("abort", 1), ("outs", [("x" * 5000,)], {"running": 1})]
    data = b"".join(wire.frame(m) for m in messages)
    got = []
    for cut in range(0, len(data), 7):  # seven bytes at a time: headers and bodies split anywhere
        a.sendall(data[cut:cut + 7])
        got += reader.receive()
    assert got == messages
    assert reader.receive() == []  # nothing more yet
    a.close()
    assert reader.receive() is None  # the other end closed


def test_a_send_the_socket_cannot_take_is_kept_and_flushed():
    a, b = socket.socketpair()
    writer, reader = wire.Connection(a), wire.Connection(b)
    big = ("outs", "y" * (4 << 20))  # more than the socket's buffers hold
    assert writer.send(big) is True  # some left over
    got = []
    while not got:
        got = reader.receive()
        writer.flush()
    assert got == [big] and writer.flush() is False


def test_listen_on_a_free_port_then_connect_and_request():
    server, address = wire.listen("tcp://127.0.0.1:*")
    assert address.startswith("tcp://127.0.0.1:") and not address.endswith(":0")
    client = wire.connect(address, timeout_s=5)
    conn, _ = server.accept()
    client.sendall(wire.frame(("hello",)))
    peer = wire.Connection(conn)
    got = []
    while not got:
        got = peer.receive()
    assert got == [("hello",)]
    client.close(), conn.close(), server.close()


def test_connect_gives_up_when_the_core_is_gone(tmp_path):
    with pytest.raises(RuntimeError, match="exited"):
        wire.connect(f"ipc://{tmp_path}/none.sock", timeout_s=30, gone=lambda: "the core exited")
    with pytest.raises(RuntimeError, match="did not answer"):
        wire.connect(f"ipc://{tmp_path}/none.sock", timeout_s=0.2)
