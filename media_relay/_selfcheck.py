"""Quick loopback throughput check of the relay (not a test; the real harness is ``benchmarks/``).

    python -m media_relay._selfcheck [--streams 100] [--seconds 2] [--rates 60000,90000,120000]

The relay runs in this process under uvloop (pinned to the last CPU when possible); a child
process pinned to CPU 0 paces 172-byte RTP packets round-robin over the streams' client-side ports
and drains the sink. For each offered rate it prints sent, relayed, loss and the achieved pps.
Bounded: every run lasts ``--seconds`` plus a short drain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import struct
import sys
import time

from media_relay.worker import RelayWorker

_PAYLOAD = bytes(160)


def _pin(cpu: int) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {cpu})


def generate(
    host: str, ports: list[int], src_port: int, sink_port: int, rate: int, seconds: float
) -> tuple[int, int]:
    """Child side: pace packets at ``rate`` pps for ``seconds``; count what reaches the sink."""
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tx.bind((host, src_port))  # fixed, so the relay's latched legs stay valid across runs
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sink.bind((host, sink_port))
    sink.setblocking(False)
    tx.setblocking(False)
    dests = [(host, p) for p in ports]
    packets = [struct.pack("!BBHII", 0x80, 0, 0, 0, i + 1) + _PAYLOAD for i in range(len(ports))]
    sent = received = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    n = len(dests)
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        due = int((now - t0) * rate)
        burst = min(due - sent, 64)
        for _ in range(burst):
            i = sent % n
            try:
                tx.sendto(packets[i], dests[i])
            except BlockingIOError:
                break
            sent += 1
        for _ in range(256):
            try:
                sink.recv(2048)
            except BlockingIOError:
                break
            received += 1
    drain_end = time.perf_counter() + 0.3
    while time.perf_counter() < drain_end:
        try:
            sink.recv(2048)
            received += 1
        except BlockingIOError:
            time.sleep(0.001)
    return sent, received


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


async def _settled_tx(worker: RelayWorker) -> int:
    """Relayed packets once the relay's backlog has drained (bounded wait)."""
    last = worker.totals()["tx_packets"]
    for _ in range(40):
        await asyncio.sleep(0.05)
        now = worker.totals()["tx_packets"]
        if now == last:
            break
        last = now
    return last


async def _relay(args: argparse.Namespace) -> None:
    from media_relay.table import LegSpec, PortAllocator

    host = "127.0.0.1"
    worker = RelayWorker(host, allocator=PortAllocator(args.min_port, args.min_port + 4 * args.streams + 64))
    sink_port, src_port = _free_port(host), _free_port(host)
    client_ports = []
    for i in range(args.streams):
        a, _ = await worker.bind_pair()
        b, _ = await worker.bind_pair()
        client_ports.append(a)
        worker.add_stream(
            f"s{i}",
            LegSpec.dedicated(a, latch=True),
            LegSpec.dedicated(b, latch=False, remote_rtp=(host, sink_port), remote_rtcp=(host, sink_port)),
        )
    for transport in worker._transports.values():
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    loop_name = type(asyncio.get_running_loop()).__module__
    print(f"loop={loop_name} path={worker.path} streams={args.streams} packet=172B seconds={args.seconds}")
    for rate in args.rates:
        before = worker.totals()["tx_packets"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "media_relay._selfcheck",
            "--generate",
            f"{src_port}:{sink_port}:{rate}:{args.seconds}:" + ",".join(map(str, client_ports)),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        sent, received = map(int, out.split())
        relayed = await _settled_tx(worker) - before
        relay_loss = 100.0 * (sent - relayed) / max(sent, 1)
        loss = 100.0 * (sent - received) / max(sent, 1)
        print(
            f"offered {rate:>7} pps: sent {sent:>8} relayed {relayed:>8} received {received:>8} "
            f"relay loss {relay_loss:6.3f}% end-to-end loss {loss:6.3f}% "
            f"relayed {relayed / args.seconds:>7.0f} pps"
        )
        if args.verbose:
            t = worker.totals()
            print("   ", {k: v for k, v in t.items() if k.endswith("drops")}, "rx", t["rx_packets"])
    await worker.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument(
        "--rates", type=lambda s: [int(x) for x in s.split(",")], default=[60000, 90000, 120000]
    )
    parser.add_argument("--min-port", type=int, default=46000)
    parser.add_argument("--stock-loop", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        _pin(0)
        src, sink, rate, seconds, ports = args.generate.split(":")
        dests = [int(p) for p in ports.split(",")]
        sent, received = generate("127.0.0.1", dests, int(src), int(sink), int(rate), float(seconds))
        print(sent, received)
        return
    _pin((os.cpu_count() or 1) - 1)
    if args.stock_loop:
        asyncio.run(_relay(args))
    else:
        import uvloop

        uvloop.run(_relay(args))


if __name__ == "__main__":
    main()
