"""The one-hop generator of benchmarks/media (``_loadgen.c``): its threads split the streams, pace
their share and together account for every packet, with one latency per packet received."""

from __future__ import annotations

import socket
from array import array
from collections.abc import Iterator

import pytest

from benchmarks.media.load import native_loadgen, udp_socket


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    made = [udp_socket("127.0.0.1") for _ in range(4)]
    yield made
    for s in made:
        s.close()


def _flows(socks: list[socket.socket], streams: int, threads: int) -> list[tuple[int, str, int]]:
    """Stream i on thread i % threads: its caller socket sends to its callee and back."""
    flows = []
    for i in range(streams):
        a, b = 2 * (i % threads), 2 * (i % threads) + 1
        flows += [(a, *socks[b].getsockname()), (b, *socks[a].getsockname())]
    return flows


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_deliver_every_packet_once(socks: list[socket.socket], threads: int) -> None:
    gen = native_loadgen()
    assert gen is not None, "benchmarks/media/_loadgen.c does not build (gcc, python3-dev)"
    stopped = []
    fds = [s.fileno() for s in socks]
    res = gen.run_plain(
        fds, _flows(socks, 10, threads), fds, 20000.0, 4000, 77, lambda: stopped.append(1), threads=threads
    )
    assert stopped == [1]  # the CPU probe stops once, when every thread has sent
    assert (res["sent"], res["received"], res["errors"]) == (4000, 4000, 0)
    lat = array("q")
    lat.frombytes(res["latencies"])
    assert len(lat) == 4000
    assert all(0 < x < 1_000_000_000 for x in lat)
    assert 0.15 < res["send_s"] < 1.0  # 4000 packets at 20k pps: paced, not blasted
    assert res["behind_s"] < 0.1


def test_sockets_must_split_over_threads(socks: list[socket.socket]) -> None:
    gen = native_loadgen()
    assert gen is not None
    fds = [s.fileno() for s in socks[:3]]
    with pytest.raises(ValueError, match="split evenly"):
        gen.run_plain(fds, [(0, "127.0.0.1", 9)], fds, 100.0, 10, 1, None, threads=2)
    with pytest.raises(ValueError, match="without flows"):  # thread 1 would have nothing to send
        gen.run_plain(fds[:2], [(0, "127.0.0.1", 9)], fds[:2], 100.0, 10, 1, None, threads=2)
