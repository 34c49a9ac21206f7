"""The cost of one send to an engine core, ZeroMQ (DEALER to ROUTER over ipc) against a Unix
socket, from a sender pinned to CPU 1 that works 1 ms between sends, with the receiver in another
process on CPU 0; run once alone and once beside a busy process on the sender's CPU (as an engine
core's XLA threads, or an API server's load generator). Needs pyzmq (no longer a dependency):

  python benchmarks/results/serving_split/send_latency.py [--busy]
"""

import os
import pickle
import socket
import statistics
import subprocess
import sys
import time

import zmq

ZMQ_ADDRESS, UNIX_PATH = "ipc:///tmp/send-latency-zmq", "/tmp/send-latency-unix"


def receive() -> None:
    os.sched_setaffinity(0, {0})
    router = zmq.Context().socket(zmq.ROUTER)
    router.bind(ZMQ_ADDRESS)
    if os.path.exists(UNIX_PATH):
        os.unlink(UNIX_PATH)
    server = socket.socket(socket.AF_UNIX)
    server.bind(UNIX_PATH)
    server.listen(1)
    conn, _ = server.accept()
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(conn, zmq.POLLIN)
    while True:
        for s, _ in poller.poll():
            if s is router:
                router.recv_multipart()
            elif not conn.recv(65536):
                return


def main() -> None:
    busy = None
    if "--busy" in sys.argv:
        busy = subprocess.Popen([sys.executable, "-c", "import os, time\nos.sched_setaffinity(0, {1})\n"
                                 "t = time.time()\nwhile time.time() - t < 60: pass"])
    os.sched_setaffinity(0, {1})
    receiver = subprocess.Popen([sys.executable, __file__, "receive"])
    time.sleep(1)
    dealer = zmq.Context().socket(zmq.DEALER)
    dealer.connect(ZMQ_ADDRESS)
    unix = socket.socket(socket.AF_UNIX)
    unix.connect(UNIX_PATH)
    msg = pickle.dumps(("add", 1, list(range(32)), {"max_tokens": 64}))
    for name, send in (("zmq", lambda: dealer.send(msg)), ("unix", lambda: unix.sendall(msg))) * 2:
        times = []
        for _ in range(500):
            t_end = time.perf_counter() + 0.001
            while time.perf_counter() < t_end:  # the sender's own work between sends
                pass
            t0 = time.perf_counter()
            send()
            times.append(time.perf_counter() - t0)
        times.sort()
        print(f"{name}: send p50 {1e6 * times[250]:.1f} us, p90 {1e6 * times[450]:.1f} us, "
              f"p99 {1e6 * times[495]:.1f} us, mean {1e6 * statistics.mean(times):.1f} us", flush=True)
    unix.close()
    receiver.wait()
    if busy is not None:
        busy.kill()


if __name__ == "__main__":
    receive() if sys.argv[1:] == ["receive"] else main()
