"""Packet generator, sink and echo of the media benchmarks: one synchronous loop on one core.

G.711-like packets: 12-byte RTP header + 160-byte payload = 172 bytes, 50 pps per stream per
direction, sent round-robin over the flows so the aggregate rate is smooth. Every loop is bounded
by a packet count and a hard deadline.

Latency is ``kernel receive timestamp (SO_TIMESTAMPNS) - time.time_ns() just before sendto``,
both CLOCK_REALTIME in this one process, so the sink's own scheduling does not count; a
generator -> sink (or -> echo -> client) baseline at the same rate gives what the harness adds.

The Python loops here do one syscall per packet (~100-120k pps on one core); ``_loadgen.c``
(part 1) and ``_pathgen.c`` (part 2) are the same loops with sendmmsg/recvmmsg, built on first
use by ``native_module`` and wrapped by ``run_plain_native`` / ``run_echo_path_native``.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import select
import socket
import struct
import subprocess
import sysconfig
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

Addr = tuple[str, int]

PACKET_BYTES = 172
PAYLOAD_BYTES = PACKET_BYTES - 12
PTIME_PPS = 50
BURST = 64  # packets sent per loop turn at most, before the sockets are drained
DRAIN = 256  # packets read per socket per loop turn at most
RCVBUF_BYTES = 32 << 20

SO_TIMESTAMPNS = int(getattr(socket, "SO_TIMESTAMPNS", 35))
SO_RCVBUFFORCE = int(getattr(socket, "SO_RCVBUFFORCE", 33))
_ANC_BYTES = socket.CMSG_SPACE(16)
RTP = struct.Struct("!BBHII")
STAMP = struct.Struct("!QI")  # send time (ns, CLOCK_REALTIME) and run id, right after the header
_TIMESPEC = struct.Struct("@qq")


def udp_socket(host: str, *, timestamps: bool = True) -> socket.socket:
    """A non-blocking UDP socket with a large receive buffer (forced: we run as root)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    if timestamps:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


def addr_of(sock: socket.socket) -> Addr:
    host, port = sock.getsockname()
    return str(host), int(port)


def cpu_of_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Window:
    """One measurement window: counts, latencies (ns) and CPU seconds per process."""

    sent: int
    received: int
    send_errors: int
    send_s: float  # first to last send
    behind_s: float  # how late the last send was against its schedule (generator saturation)
    latencies_ns: array[int]
    cpu_s: dict[str, float]
    bad: int = 0  # packets that came back wrong (SRTP authentication failed on a sample)
    checked: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # loop-specific (echoed, unmatched, turns)
    # Part 2, C loop: each latency less the time the packet waited on the echo socket (harness).
    net_latencies_ns: array[int] = field(default_factory=lambda: array("q"))
    _ordered: dict[bool, array[int]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def loss_pct(self) -> float:
        return 100.0 * (self.sent - self.received) / max(self.sent, 1)

    @property
    def pps(self) -> float:
        return self.received / max(self.send_s, 1e-9)

    def percentile_us(self, q: float, net: bool = False) -> float:
        """The q-quantile in microseconds; each series is sorted once (a 60 s window at 400k pps
        holds 24M latencies, and the report asks for several quantiles of every row)."""
        ordered = self._sorted(net)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0

    def _sorted(self, net: bool) -> array[int]:
        values = self.net_latencies_ns if net else self.latencies_ns
        cached = self._ordered.get(net)
        if cached is None or len(cached) != len(values):
            cached = self._ordered[net] = array("q", sorted(values))  # kept as 8 bytes a value
        return cached

    def cpu_pct(self, name: str) -> float:
        return 100.0 * self.cpu_s.get(name, 0.0) / max(self.send_s, 1e-9)


def _kernel_ns(anc: list[tuple[int, int, bytes]]) -> int:
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return int(sec) * 1_000_000_000 + int(nsec)
    return time.time_ns()


def _drain_stamped(sock: socket.socket, lat: array[int], run_id: int) -> int:
    """Read what waits on a sink socket; keep the latency of this run's packets."""
    got = 0
    for _ in range(DRAIN):
        try:
            data, anc, _flags, _addr = sock.recvmsg(2048, _ANC_BYTES)
        except BlockingIOError:
            break
        if len(data) < 24:
            continue
        sent_ns, rid = STAMP.unpack_from(data, 12)
        if rid != run_id:
            continue
        lat.append(_kernel_ns(anc) - sent_ns)
        got += 1
    return got


def udp_rcvbuf_errors() -> int:
    """The kernel's count of UDP datagrams dropped because a receive queue was full (host-wide)."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def host_busy_s() -> float:
    """CPU-seconds the whole host spent busy (every core; user, system, irq, softirq, steal),
    from /proc/stat: loopback delivery often runs in softirq, charged to no process of ours."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def host_steal_s() -> float:
    """CPU-seconds the hypervisor took from this VM's cores (/proc/stat ``steal``, every core):
    time a relay was runnable but its vCPU was not running. A run with much of it measured the
    neighbours as well as the relay."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[7] / os.sysconf("SC_CLK_TCK")


def runqueue_wait_s(pid: int | str) -> float:
    """Seconds the main thread of ``pid`` has spent runnable but waiting for a CPU
    (/proc/<pid>/schedstat, second field): the relays' share of a busy machine's queueing."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


class CpuProbe:
    """CPU seconds of named processes between ``start()`` and ``stop()``; "load" is this one;
    "host" is the busy time of all cores together (others' work included), "steal" the part of it
    the hypervisor gave other guests (of 200 % on 2 cores); "rcvbuf_drops" is the
    host's UDP receive-queue overflow count over the same span. ``waited``: run-queue wait of
    the same processes (main threads) over the span."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t0: dict[str, float] = {}
        self._w0: dict[str, float] = {}
        self.used: dict[str, float] = {}
        self.waited: dict[str, float] = {}

    def _waits(self) -> dict[str, float]:
        waits: dict[str, float] = {}
        named: list[tuple[str, int | str]] = [*self.pids.items(), ("load", "self")]
        for name, pid in named:
            try:
                waits[name] = runqueue_wait_s(pid)
            except (OSError, IndexError, ValueError):  # no schedstats in this kernel
                pass
        return waits

    def _now(self) -> dict[str, float]:
        now = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        now["load"] = cpu_of_self()
        now["host"] = host_busy_s()
        now["steal"] = host_steal_s()
        now["rcvbuf_drops"] = float(udp_rcvbuf_errors())
        return now

    def start(self) -> None:
        self._t0 = self._now()
        self._w0 = self._waits()

    def stop(self) -> None:
        end, waits = self._now(), self._waits()
        self.used = {k: end[k] - self._t0[k] for k in end}
        self.waited = {k: waits[k] - self._w0[k] for k in waits if k in self._w0}


def run_plain(
    tx: Sequence[socket.socket],
    flows: Sequence[tuple[int, Addr]],
    rx: Sequence[socket.socket],
    rate: float,
    count: int,
    run_id: int,
    probe: CpuProbe,
    drain_s: float = 0.5,
) -> Window:
    """Part 1: send ``count`` packets round-robin over ``flows`` (tx socket index, destination)
    at ``rate`` pps, with the send time in the payload; count this run's packets on ``rx``."""
    buf = bytearray(PACKET_BYTES)
    pack_rtp, pack_stamp, time_ns, clock = RTP.pack_into, STAMP.pack_into, time.time_ns, time.perf_counter
    lat: array[int] = array("q")
    nflows = len(flows)
    sent = received = errors = 0
    probe.start()
    t0 = clock()
    hard_end = t0 + count / rate + 2.0
    last = t0
    while sent < count:
        now = clock()
        if now >= hard_end:
            break
        due = min(count, int((now - t0) * rate) + 1)
        stop = min(due, sent + BURST)
        while sent < stop:
            j = sent % nflows
            k = sent // nflows
            si, dest = flows[j]
            pack_rtp(buf, 0, 0x80, 0, k & 0xFFFF, (k * 160) & 0xFFFFFFFF, j + 1)
            pack_stamp(buf, 12, time_ns(), run_id)
            try:
                tx[si].sendto(buf, dest)
            except OSError:
                errors += 1
            sent += 1
        last = clock()
        got = 0
        for s in rx:
            got += _drain_stamped(s, lat, run_id)
        received += got
        if got == 0 and sent >= due:
            wait = t0 + sent / rate - clock()
            if wait > 0:
                select.select(rx, [], [], wait)
    probe.stop()
    behind = last - (t0 + (sent - 1) / rate)
    end = clock() + drain_s
    while clock() < end:
        got = sum(_drain_stamped(s, lat, run_id) for s in rx)
        received += got
        if got == 0:
            select.select(rx, [], [], 0.02)
    return Window(sent, received, errors, last - t0, behind, lat, probe.used)


_SRC_DIR = Path(__file__).resolve().parent
_BUILD_DIR = _SRC_DIR.parent / "results" / "build"  # git-ignored


def native_module(name: str) -> ModuleType | None:
    """``benchmarks/media/<name>.c`` as an extension module, compiled on first use and whenever it
    or ``_loadgen.h`` changes; None (with the reason printed) when it cannot be built here."""
    src = _SRC_DIR / f"{name}.c"
    out = _BUILD_DIR / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    try:
        newest = max(src.stat().st_mtime, (_SRC_DIR / "_loadgen.h").stat().st_mtime)
        if not out.exists() or out.stat().st_mtime < newest:
            _BUILD_DIR.mkdir(parents=True, exist_ok=True)
            cc = os.environ.get("CC") or str(sysconfig.get_config_var("CC") or "cc").split()[0]
            include = sysconfig.get_paths()["include"]
            tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # another run may be loading `out`
            cmd = [cc, "-O2", "-Wall", "-pthread", "-shared", "-fPIC", f"-I{include}", str(src)]
            cmd += ["-o", str(tmp)]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(tmp, out)
        spec = importlib.util.spec_from_file_location(name, out)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {out}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (OSError, subprocess.SubprocessError, ImportError) as exc:
        print(f"batched load loop {name} unavailable ({exc}); using the Python loop")
        return None
    return module


def native_loadgen() -> ModuleType | None:
    """``_loadgen.c``: ``run_plain`` with sendmmsg/recvmmsg (part 1)."""
    return native_module("_loadgen")


def native_pathgen() -> ModuleType | None:
    """``_pathgen.c``: ``run_echo_path`` with sendmmsg/recvmmsg (part 2)."""
    return native_module("_pathgen")


def run_plain_native(
    gen: ModuleType,
    tx: Sequence[socket.socket],
    flows: Sequence[tuple[int, Addr]],
    rx: Sequence[socket.socket],
    rate: float,
    count: int,
    run_id: int,
    probe: CpuProbe,
    drain_s: float = 0.5,
    threads: int = 1,
) -> Window:
    """``run_plain`` in C: the same packets, pacing and latency, with batched syscalls;
    ``threads``: that many sending/receiving threads, thread t owning the t-th block of
    ``len(tx) / threads`` tx sockets (and of rx sockets) and the flows sent from them."""
    probe.start()
    res = gen.run_plain(
        [s.fileno() for s in tx],
        [(si, host, port) for si, (host, port) in flows],
        [s.fileno() for s in rx],
        float(rate),
        int(count),
        run_id,
        probe.stop,
        drain_s=drain_s,
        threads=threads,
    )
    lat: array[int] = array("q")
    lat.frombytes(res["latencies"])
    return Window(
        res["sent"], res["received"], res["errors"], res["send_s"], res["behind_s"], lat, probe.used
    )


def warm_plain(
    tx: Sequence[socket.socket], flows: Sequence[tuple[int, Addr]], rx: Sequence[socket.socket], run_id: int
) -> int:
    """One packet per flow (latches every relay leg), then drain for a moment."""
    buf = bytearray(PACKET_BYTES)
    for j, (si, dest) in enumerate(flows):
        RTP.pack_into(buf, 0, 0x80, 0, 0xFFF0, 0, j + 1)
        STAMP.pack_into(buf, 12, time.time_ns(), run_id)
        tx[si].sendto(buf, dest)
        if j % 200 == 199:
            time.sleep(0.002)  # do not burst thousands of packets into one relay socket queue
    lat: array[int] = array("q")
    got = 0
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:
        got += sum(_drain_stamped(s, lat, run_id) for s in rx)
        select.select(rx, [], [], 0.02)
    return got


def run_echo_path(
    client: socket.socket,
    echo: socket.socket,
    dests: Sequence[Addr],
    packets: Sequence[bytes],
    first_round: int,
    rate: float,
    probe: CpuProbe,
    verify: Callable[[int, bytes], bool] | None = None,
    ssrc_base: int = 0,
    drain_s: float = 0.5,
) -> Window:
    """Part 2: the client sends ``packets[k * N + i]`` (round k of call i, precomputed SRTP) to
    ``dests[i]`` for rounds ``first_round..``; the echo socket returns whatever it receives to
    its source; the client matches what comes back by (SSRC = ssrc_base + i + 1, seq = k) in the
    clear RTP header (a fresh ssrc_base per run: late packets of an earlier run never match).
    ``verify(i, data)`` is run on 1 packet in 64 (SRTP authentication of C's output)."""
    n = len(dests)
    start = first_round * n
    count = len(packets) - start
    sent_ns: array[int] = array("q", bytes(8 * len(packets)))
    seen = bytearray(len(packets))
    lat: array[int] = array("q")
    time_ns, clock, unpack = time.time_ns, time.perf_counter, RTP.unpack_from
    csend, esend, erecv = client.sendto, echo.sendto, echo.recvfrom
    sent = received = errors = bad = checked = 0
    socks = [client, echo]

    def drain() -> tuple[int, int]:
        nonlocal bad, checked
        moved = 0
        for _ in range(DRAIN):  # the echo first: its queueing is part of the measured path
            try:
                data, src = erecv(2048)
            except BlockingIOError:
                break
            esend(data, src)
            moved += 1
        got = 0
        for _ in range(DRAIN):
            try:
                data, anc, _flags, _addr = client.recvmsg(2048, _ANC_BYTES)
            except BlockingIOError:
                break
            if len(data) < 12:
                continue
            _b0, _b1, seq, _ts, ssrc = unpack(data)
            call = ssrc - ssrc_base - 1
            idx = seq * n + call
            if not 0 <= call < n or not start <= idx < len(packets) or seen[idx] or not sent_ns[idx]:
                continue
            seen[idx] = 1
            lat.append(_kernel_ns(anc) - sent_ns[idx])
            got += 1
            if verify is not None and (received + got) % 64 == 0:
                checked += 1
                if not verify(call, data):
                    bad += 1
        return moved, got

    probe.start()
    t0 = clock()
    hard_end = t0 + count / rate + 2.0
    last = t0
    while sent < count:
        now = clock()
        if now >= hard_end:
            break
        due = min(count, int((now - t0) * rate) + 1)
        stop = min(due, sent + BURST)
        while sent < stop:
            idx = start + sent
            sent_ns[idx] = time_ns()
            try:
                csend(packets[idx], dests[idx % n])
            except OSError:
                errors += 1
            sent += 1
        last = clock()
        moved, got = drain()
        received += got
        if moved + got == 0 and sent >= due:
            wait = t0 + sent / rate - clock()
            if wait > 0:
                select.select(socks, [], [], wait)
    probe.stop()
    behind = last - (t0 + (sent - 1) / rate)
    end = clock() + drain_s
    while clock() < end:
        moved, got = drain()
        received += got
        if moved + got == 0:
            select.select(socks, [], [], 0.02)
    return Window(sent, received, errors, last - t0, behind, lat, probe.used, bad, checked)


def flush(socks: Sequence[socket.socket], quiet_s: float = 0.05, max_s: float = 2.0) -> int:
    """Discard what waits on ``socks`` until they stay quiet for ``quiet_s`` (at most ``max_s``):
    an overloaded step leaves packets queued that the next run must not see or pay for."""
    dropped = 0
    end = time.perf_counter() + max_s
    while time.perf_counter() < end:
        ready, _, _ = select.select(socks, [], [], quiet_s)
        if not ready:
            break
        for s in ready:
            for _ in range(DRAIN):
                try:
                    s.recv(2048)
                except BlockingIOError:
                    break
                dropped += 1
    return dropped


def warm_echo_path(
    client: socket.socket,
    echo: socket.socket,
    dests: Sequence[Addr],
    packets: Sequence[bytes],
    timeout_s: float,
) -> int:
    """Round 0 of every call (latches E's client legs and C's inside legs); count the echoes."""
    n = len(dests)
    for i in range(n):
        client.sendto(packets[i], dests[i])
        if i % 100 == 99:
            time.sleep(0.002)
    back = 0
    end = time.perf_counter() + timeout_s
    while time.perf_counter() < end and back < n:
        for _ in range(DRAIN):
            try:
                data, src = echo.recvfrom(2048)
            except BlockingIOError:
                break
            echo.sendto(data, src)
        for _ in range(DRAIN):
            try:
                client.recv(2048)
            except BlockingIOError:
                break
            back += 1
        select.select([client, echo], [], [], 0.01)
    return back


def _ssrc_seq(data: bytes) -> tuple[int, int]:
    _b0, _b1, seq, _ts, ssrc = RTP.unpack_from(data)
    return int(ssrc), int(seq)


def run_echo_path_native(
    gen: ModuleType,
    client: socket.socket,
    echo: socket.socket,
    dests: Sequence[Addr],
    packets: Sequence[bytes],
    first_round: int,
    rate: float,
    probe: CpuProbe,
    verify: Callable[[int, bytes], bool] | None = None,
    ssrc_base: int = 0,
    tick_s: float = 0.0,
    drain_s: float = 0.5,
    echo_thread: bool = False,
) -> Window:
    """``run_echo_path`` in C (``_pathgen.c``): the same packets, pacing, matching and latency,
    with batched syscalls; the 1-in-64 sample is authenticated here after the window, per call in
    seq order (libsrtp's replay window wants each call's indexes rising). ``echo_thread``: the
    echo runs in a thread of its own."""
    size = len(packets[0])
    if any(len(p) != size for p in packets):
        raise ValueError("the batched loop wants packets of one size")
    probe.start()
    res = gen.run_echo_path(
        client.fileno(),
        echo.fileno(),
        [(host, port) for host, port in dests],
        b"".join(packets),
        size,
        first_round,
        float(rate),
        probe.stop,
        ssrc_base=ssrc_base,
        tick_s=tick_s,
        drain_s=drain_s,
        echo_thread=echo_thread,
    )
    lat: array[int] = array("q")
    lat.frombytes(res["latencies"])
    net: array[int] = array("q")
    net.frombytes(res["latencies_net"])
    bad = checked = 0
    if verify is not None:
        for ssrc, _seq, data in sorted((*_ssrc_seq(d), d) for d in res["samples"]):
            checked += 1
            if not verify(ssrc - ssrc_base - 1, data):
                bad += 1
    counts = {k: int(res[k]) for k in ("echoed", "echo_errors", "unmatched", "turns")}
    hold: array[int] = array("q")
    hold.frombytes(res["echo_hold"])
    if hold:
        counts["echo_hold_p99_us"] = sorted(hold)[int(0.99 * (len(hold) - 1))] // 1000
    return Window(
        res["sent"],
        res["received"],
        res["errors"],
        res["send_s"],
        res["behind_s"],
        lat,
        probe.used,
        bad,
        checked,
        counts,
        net,
    )
