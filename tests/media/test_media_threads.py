"""``Forwarder.run``: a forwarder served by a thread of its own, without the GIL.

Real sockets on loopback: installed flows are forwarded while the calling thread does Python
work, strangers come back through the callback (with the GIL) in ``poll()``'s shape, the
callback also ticks while idle, ``interrupt()`` ends ``run()``, and the forwarder refuses to be
polled or closed while it is served.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from media_relay import fastpath
from media_relay.rtp import StreamStats

HOST = "127.0.0.1"


def rtp(seq: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, 0x1234) + bytes(160)


def udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.settimeout(5.0)
    return sock


class Served:
    """A forwarder with one relay port (ingress) and one egress socket, run by a thread."""

    def __init__(self) -> None:
        assert fastpath.built(), "media_relay._fastpath is not built"
        self.fwd: Any = fastpath.new_forwarder()
        self.relay, self.egress, self.src, self.dst, self.stranger = (udp() for _ in range(5))
        self.relay.setblocking(False)
        self.port = self.relay.getsockname()[1]
        self.fwd.add_socket(self.relay.fileno(), self.port)
        self.fwd.install(
            self.port, HOST, self.src.getsockname()[1], False,
            self.egress.fileno(), self.dst.getsockname(), -1, None,
            8000, StreamStats(8000).get_state(),
        )  # fmt: skip
        self.calls: list[list[tuple[int, bytes, tuple[str, int]]]] = []
        self.thread = threading.Thread(target=self.fwd.run, args=(self.calls.append,), kwargs={"tick_ms": 20})
        self.thread.start()

    def stop(self) -> None:
        self.fwd.interrupt()
        self.thread.join(5.0)
        assert not self.thread.is_alive()

    def close(self) -> None:
        if self.thread.is_alive():
            self.stop()
        self.fwd.close()
        for sock in (self.relay, self.egress, self.src, self.dst, self.stranger):
            sock.close()


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    try:
        yield s
    finally:
        s.close()


def test_a_served_forwarder_relays_while_python_runs(served: Served) -> None:
    for i in range(200):
        served.src.sendto(rtp(i), (HOST, served.port))
    got = [served.dst.recvfrom(4096) for _ in range(200)]
    assert [d for d, _ in got] == [rtp(i) for i in range(200)]  # in order, byte for byte
    assert all(addr == served.egress.getsockname() for _, addr in got)
    assert served.fwd.counters()["forwarded"] == 200  # the lock lets the loop's thread read


def test_strangers_come_back_through_the_callback_and_idle_ticks(served: Served) -> None:
    served.stranger.sendto(b"\x80hello", (HOST, served.port))
    deadline = time.monotonic() + 5.0
    while not any(served.calls) and time.monotonic() < deadline:
        time.sleep(0.01)
    items = [item for call in served.calls for item in call]
    assert items == [(served.port, b"\x80hello", served.stranger.getsockname())]
    ticks = len(served.calls)
    time.sleep(0.2)
    assert len(served.calls) > ticks, "the callback ticks while nothing arrives"
    assert all(call == [] for call in served.calls[ticks:])


def test_a_served_forwarder_refuses_poll_close_and_a_second_run(served: Served) -> None:
    with pytest.raises(RuntimeError, match="run"):
        served.fwd.poll()
    with pytest.raises(RuntimeError, match="run"):
        served.fwd.close()
    with pytest.raises(RuntimeError, match="already"):
        served.fwd.run(lambda items: None)
    served.stop()
    assert served.fwd.poll() == []  # after interrupt(): an ordinary forwarder again
