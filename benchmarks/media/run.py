"""Media relay benchmark (shared/spec/MRA.md §7): one relay hop vs rtpengine, and the full path.

Run from the repository root as root (Debian `rtpengine-daemon` installed; py-spy in the venv for
``--profile``)::

    .venv/bin/python -m benchmarks.media.run                 # both parts, about 10 minutes
    .venv/bin/python -m benchmarks.media.run --part 1 --streams 200,400,600 --window-s 5
    .venv/bin/python -m benchmarks.media.run --part 2 --calls 200,400,600,800,1000,1200 --window-s 5

1. **One hop.** The relay under test runs in its own process: (a) ours, a plain ``RelayWorker``
   on uvloop with N streams of two dedicated latching legs (``ours``: the native fast path when
   built; ``ours-python``: ``EDGE_MEDIA_FASTPATH=0``; ``ours-kernel``: ``EDGE_MEDIA_KERNEL=1``,
   established flows forwarded by E's TC program, ``media_relay/kernel.py``), or (b) rtpengine
   with N calls made by ng ``offer``/``answer``. This process is generator and sink: each of its
   ``--gen-threads`` threads owns one caller and one callee socket and every K-th stream, 50 pps
   each way of 172-byte RTP with the send time in the payload, sent and received with
   sendmmsg/recvmmsg (``_loadgen.c``; ``--python-load``: the original one-syscall-per-packet
   Python loop). Placement (``--hop-cpus``): ``none`` (default) pins nothing, so relay and
   generator share both cores as the scheduler sees fit, which is the only way a generator on
   this 2-core machine offers more than one core's worth of packets; ``pinned`` is the layout
   of sessions 1-7 (relay on CPU 1, a one-thread generator on CPU 0), where the generator topped
   out near 1,800 streams, below 1.5 times rtpengine's limit. Reported: forwarded pps, loss,
   p50/p99 latency and the latency added over a direct A <-> B baseline at the same rate, CPU
   of each process (/proc/<pid>/stat utime+stime over the send window) and of the host (kernel
   forwarding runs in the softirq of the sender, so it shows under the load and the host, not
   the relay); "host CPU added per packet" is the host's busy time over the direct baseline's
   at the same N, per forwarded packet.
2. **Full path.** client -> E (``EdgeMedia``) -> C (``GatewayMedia``, SRTP terminated) -> echo
   (plain RTP) -> C (SRTP protected with C's key) -> E -> client, E and C each in its own
   process (by default with their kernel paths: E's forwarding, C's SRTP; ``--no-e-kernel
   --no-c-kernel`` for userspace), calls set up by feeding them SDP offers/answers in the order
   the SIP path would (no SIP: the lab's signalling is not what is measured), client and echo
   in this process. N calls,
   50 pps each way per call, rising N (default 200..1,200). The client's SRTP packets are
   precomputed with pylibsrtp before the window (fresh keys, fresh E and C per step: no index is
   ever sent twice); one client socket plays every caller and one echo socket reflects every
   call, in C with sendmmsg/recvmmsg (``_pathgen.c``, at most one turn per ``--gen-tick-us``
   while traffic flows; ``--python-load``: the Python loop). The send time of each packet is
   kept in a table keyed by SSRC/seq (the payload is encrypted); returning packets are matched
   by SSRC/seq of the clear RTP header (a fresh SSRC block per run) and one in 64 is
   authenticated with C's key after the window. Added latency is over a direct client -> echo
   -> client baseline of the same loop, rate and packet size.

   CPU placement (``--path-cpus``): the target is the full path "on this 2-core machine", so by
   default nothing is pinned (``none``): E, C and the client/echo share both cores as the
   scheduler sees fit, and the table reports each one's CPU, the host's busy time (``host``, of
   200 %) and what neither E, C nor the load used (``other``: other users, unattributed
   softirq). ``split`` pins E to CPU 0 and C to CPU 1 with the load floating; ``shared`` is the
   old layout (E and C together on CPU 1, client/echo on CPU 0), which caps E+C at one core.

Every window is bounded by a packet count and a deadline; every process started here is stopped
by its PID; addresses are on a free 127.x.y block.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import machine_line, table  # noqa: E402
from benchmarks.media.fullpath import PATH_LAYOUTS, part2  # noqa: E402
from benchmarks.media.load import (  # noqa: E402
    PTIME_PPS,
    Addr,
    CpuProbe,
    Window,
    addr_of,
    native_loadgen,
    run_plain,
    run_plain_native,
    udp_socket,
    warm_plain,
)
from benchmarks.media.procs import Child, child_main, pin, raise_fd_limit  # noqa: E402
from benchmarks.media.report import LOSS_TARGET_PCT, Profile, delta, fmt_us, load_average  # noqa: E402
from benchmarks.media.rtpengine import Rtpengine  # noqa: E402

HOP_P99_ADDED_MS = 5.0  # "keeps up": no standing queue in the relay's socket buffers
NOT_CPU = ("load", "host", "steal", "rcvbuf_drops")
RATIO_TARGET = 1.5


def free_prefix() -> str:
    """A 127.x.y block with nothing bound on .1-.9 (other labs and tests use their own)."""
    import socket

    for x in range(60, 250):
        for y in (77, 177):
            prefix = f"127.{x}.{y}"
            try:
                for host in range(1, 10):
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                        probe.bind((f"{prefix}.{host}", 2776))
            except OSError:
                continue
            return prefix
    raise RuntimeError("no free 127.x.y block")


# -- part 1: one hop ----------------------------------------------------------------------------


@dataclass
class HopRow:
    kind: str
    n: int
    w: Window
    base: Window | None
    note: str = ""

    def cells(self) -> list[object]:
        w, b = self.w, self.base
        p50, p99 = w.percentile_us(0.5), w.percentile_us(0.99)
        a50 = p50 - b.percentile_us(0.5) if b else float("nan")
        a99 = p99 - b.percentile_us(0.99) if b else float("nan")
        relay_cpu = sum(v for k, v in w.cpu_s.items() if k not in NOT_CPU) * 100 / max(w.send_s, 1e-9)
        return [
            self.kind,
            self.n,
            self.n * 2 * PTIME_PPS,
            f"{w.pps:.0f}",
            f"{w.loss_pct:.3f}",
            fmt_us(p50),
            fmt_us(p99),
            fmt_us(a50),
            fmt_us(a99),
            f"{relay_cpu:.0f}",
            f"{w.cpu_pct('load'):.0f}",
            f"{w.cpu_pct('host'):.0f}",
            f"{w.behind_s * 1000:.0f}",
            f"{w.cpu_s.get('rcvbuf_drops', 0):.0f}",
            f"{w.cpu_pct('steal'):.1f}",
            self.note,
        ]


HOP_HEADERS = [
    "relay", "N", "offered pps", "fwd pps", "loss %", "p50 us", "p99 us", "+p50 us", "+p99 us",
    "relay CPU %", "load CPU %", "host CPU %", "gen late ms", "rcvbuf drops", "steal %", "note",
]  # fmt: skip


HOP_LAYOUTS = {  # placement: (relay CPU, generator CPU; -1: any), what the header says of it
    "pinned": (1, 0, "relay on CPU 1, generator+sink on CPU 0"),  # sessions 1-7
    "none": (-1, -1, "nothing pinned: relay and generator share both cores"),
}


class Hop:
    def __init__(self, args: argparse.Namespace, prefix: str, log: TextIO, tmp: Path) -> None:
        self.args, self.prefix, self.log, self.tmp = args, prefix, log, tmp
        self.threads = 1 if args.python_load else args.gen_threads
        # Generator thread t owns sockets [2t] (every caller of its streams) and [2t+1] (every
        # callee); stream i belongs to thread i % threads.
        self.socks = [udp_socket(f"{prefix}.{4 + k % 2}") for k in range(2 * self.threads)]
        self.run_id = 1000
        self.baselines: dict[tuple[str, int], Window] = {}
        self.gen = None if args.python_load else native_loadgen()

    def close(self) -> None:
        for s in self.socks:
            s.close()

    def layout(self, kind: str) -> str:
        """``kind@pinned`` / ``kind@none`` runs that kind with that placement; else --hop-cpus."""
        return kind.partition("@")[2] or self.args.hop_cpus

    def load_cpus(self, layout: str) -> int:
        """How many cores the generator's threads can use in this placement."""
        return 1 if HOP_LAYOUTS[layout][1] >= 0 else min(self.threads, os.cpu_count() or 1)

    def ends(self, i: int) -> tuple[int, int]:
        """The generator's (caller, callee) socket indexes of stream i."""
        t = i % self.threads
        return 2 * t, 2 * t + 1

    @contextlib.contextmanager
    def relay(
        self, kind: str, n: int
    ) -> Iterator[tuple[list[tuple[int, Addr]], dict[str, int], Child | None]]:
        ends = [self.ends(i) for i in range(n)]
        addr = [addr_of(s) for s in self.socks]
        cpu_relay, cpu_load, _ = HOP_LAYOUTS[self.layout(kind)]
        pin(cpu_load)  # this process: its generator threads inherit it
        kind = kind.partition("@")[0]
        if kind == "direct":
            yield [f for a, b in ends for f in ((a, addr[b]), (b, addr[a]))], {}, None
        elif kind in ("ours", "ours-python", "ours-kernel"):
            env = {
                "ours": None,
                "ours-python": {"EDGE_MEDIA_FASTPATH": "0"},
                "ours-kernel": {"EDGE_MEDIA_KERNEL": "1"},
            }[kind]
            child = Child("relay", self.prefix, cpu_relay, self.log, env=env)
            try:
                pairs = child.call("setup", n=n)
                ip = f"{self.prefix}.8"
                legs = zip(ends, pairs, strict=True)
                yield (
                    [f for (a, b), (pa, pb) in legs for f in ((a, (ip, pa)), (b, (ip, pb)))],
                    {"relay": child.pid},
                    child,
                )
            finally:
                child.close()
        else:
            eng = Rtpengine(f"{self.prefix}.9", cpu_relay, self.log, threads=self.args.rtpengine_threads)
            try:
                flows: list[tuple[int, Addr]] = []
                for i, (a, b) in enumerate(ends):
                    to_a, to_b = eng.call(f"n{n}-{i}", addr[a], addr[b])
                    flows += [(a, to_a), (b, to_b)]
                yield flows, {"rtpengine": eng.pid}, None
            finally:
                eng.close()

    def step(
        self, kind: str, n: int, profile: bool = False
    ) -> tuple[Window, dict[str, int] | None, list[str]]:
        socks = self.socks
        rate = n * 2 * PTIME_PPS
        with self.relay(kind, n) as (flows, pids, child):
            self.run_id += 1
            warm_plain(socks, flows, socks, self.run_id)
            self.run_id += 1
            prof = None
            if profile and pids:
                prof = Profile(
                    next(iter(pids.values())),
                    self.args.window_s,
                    self.tmp / f"hop-{kind}-{n}.txt",
                    self.args.native,
                )
            count = int(rate * self.args.window_s)
            before = child.call("totals") if child is not None else None
            if self.gen is not None:
                probe = CpuProbe(pids)
                w = run_plain_native(
                    self.gen, socks, flows, socks, rate, count, self.run_id, probe, threads=self.threads
                )
            else:
                w = run_plain(socks, flows, socks, rate, count, self.run_id, CpuProbe(pids))
            totals = None
            if child is not None and before is not None:
                after = child.call("totals")
                totals = {**delta(before, after), "kernel_flows_now": after.get("kernel_flows", 0)}
            top = prof.top() if prof is not None else []
        return w, totals, top

    def baseline(self, n: int, layout: str) -> Window:
        """The direct A <-> B run at N in this placement (once per N and placement)."""
        if (layout, n) not in self.baselines:
            self.baselines[layout, n] = self.step(f"direct@{layout}", n)[0]
        return self.baselines[layout, n]

    def sweep(self, kinds: list[str]) -> list[HopRow]:
        """Every N for every kind, the kinds interleaved per N (on a shared machine the others'
        load then weighs on each relay alike). A kind stops after two lossy steps in a row or
        one with >= 5 % loss; the sweep stops when the direct baseline itself loses."""
        rows: list[HopRow] = []
        fails = dict.fromkeys(kinds, 0)
        live = list(kinds)
        for n in self.args.streams:
            if not live:
                break
            direct = self.baseline(n, self.args.hop_cpus)
            for kind in list(live):
                base = self.baseline(n, self.layout(kind))
                w, totals, _ = self.step(kind, n)
                row = HopRow(kind, n, w, base, self._note(kind, base, totals))
                rows.append(row)
                print("  " + "  ".join(str(c) for c in row.cells()), flush=True)
                fails[kind] = fails[kind] + 1 if w.loss_pct >= LOSS_TARGET_PCT else 0
                if fails[kind] >= 2 or w.loss_pct >= 5.0:
                    live.remove(kind)
            if direct.loss_pct >= LOSS_TARGET_PCT:
                break
        return sorted(rows, key=lambda r: (kinds.index(r.kind), r.n))

    def _note(self, kind: str, base: Window, totals: dict[str, Any] | None) -> str:
        note = ""
        busy = base.cpu_pct("load") >= 95 * self.load_cpus(self.layout(kind))
        if base.loss_pct >= LOSS_TARGET_PCT or base.behind_s > 0.05 or busy:
            note = f"generator-limited (direct: {base.cpu_pct('load'):.0f}% CPU)"
        if totals is not None:
            drops = {k: v for k, v in totals.items() if k.endswith("drops") and v}
            note = (note + f" relay drops {drops}" if drops else note).strip()
            if totals.get("native_recv_calls"):  # epoll: recvmmsg calls; io_uring: reap rounds
                per_call = totals["native_forwarded"] / totals["native_recv_calls"]
                unit = "pkt/reap" if totals.get("native_uring_enters") else "pkt/recvmmsg"
                note = (note + f" {per_call:.1f} {unit}").strip()
            if kind.startswith("ours-kernel"):  # where the packets went (no kernel: all native)
                native = totals.get("native_forwarded", 0)
                kflows = totals["kernel_flows_now"] if "kernel" in str(totals.get("path", "")) else 0
                note = (note + f" {kflows} kernel flows, {native} pkts native").strip()
                if not kflows:
                    note += " (NOT IN THE KERNEL: see the relay's log)"
        return note


def best_n(rows: list[HopRow], p99_ms: float | None = None) -> int:
    ok = [
        r.n
        for r in rows
        if r.w.loss_pct < LOSS_TARGET_PCT
        and r.base is not None
        and r.base.loss_pct < LOSS_TARGET_PCT
        and (p99_ms is None or r.w.percentile_us(0.99) - r.base.percentile_us(0.99) < p99_ms * 1000)
    ]
    return max(ok, default=0)


def pps_per_core(rows: list[HopRow]) -> float:
    """Forwarded pps per relay CPU-second, at the highest loss-free step below 90 % CPU (a
    load-independent cost figure: loss and latency only move once the core is saturated)."""
    best = 0.0
    for r in rows:
        cpu = sum(v for k, v in r.w.cpu_s.items() if k not in NOT_CPU) / max(r.w.send_s, 1e-9)
        if 0.05 <= cpu < 0.9 and r.w.loss_pct < LOSS_TARGET_PCT:  # not starved or in the kernel
            best = r.w.pps / cpu
    return best


def added_host_us(rows: list[HopRow]) -> float:
    """The machine's CPU per forwarded packet that the relay adds over the direct baseline at the
    same N (host busy time, so kernel work charged to the generator's threads counts too): the
    median over the steps where neither run had the host above 180 %. NaN when there is none."""
    per: list[float] = []
    for r in rows:
        if r.base is None or r.w.pps <= 0:
            continue
        host, base = r.w.cpu_pct("host"), r.base.cpu_pct("host")
        if host < 180 and base < 180:
            per.append((host - base) / 100 / r.w.pps * 1e6)
    per.sort()
    return per[len(per) // 2] if per else float("nan")


def part1(args: argparse.Namespace, prefix: str, log: TextIO, tmp: Path) -> None:
    where = HOP_LAYOUTS[args.hop_cpus][2]
    threads = 1 if args.python_load else args.gen_threads
    print(
        f"\n## 1. One hop: N streams x 50 pps each way, 172 B, {args.window_s:.0f} s windows"
        f" ({where}; generator: {threads} thread{'s' if threads > 1 else ''}"
        f", rtpengine: {args.rtpengine_threads})",
        flush=True,
    )
    hop = Hop(args, prefix, log, tmp)
    try:
        rows: list[HopRow] = []
        kinds = [k for k in args.kinds if not (args.no_rtpengine and k.startswith("rtpengine"))]
        print(f"### {', '.join(kinds)}, interleaved per N", flush=True)
        rows += hop.sweep(kinds)
        base_rows = [
            HopRow("direct" if layout == args.hop_cpus else f"direct@{layout}", n, w, None)
            for (layout, n), w in sorted(
                hop.baselines.items(), key=lambda kv: (kv[0][0] != args.hop_cpus, kv[0])
            )
        ]
        print()
        print(table(HOP_HEADERS, [r.cells() for r in base_rows + rows]))
        best = {k: best_n([r for r in rows if r.kind == k]) for k in kinds}
        keeps = {k: best_n([r for r in rows if r.kind == k], HOP_P99_ADDED_MS) for k in kinds}
        per_core = {k: pps_per_core([r for r in rows if r.kind == k]) for k in kinds}
        added = {k: added_host_us([r for r in rows if r.kind == k]) for k in kinds}
        print()
        for k in kinds:
            print(
                f"{k}: largest N with loss < {LOSS_TARGET_PCT} % and added p99 < {HOP_P99_ADDED_MS} ms: "
                f"{keeps[k]} ({keeps[k] * 2 * PTIME_PPS} pps); forwarded pps per relay CPU-second: "
                f"{per_core[k]:.0f}; host CPU added per packet: {added[k]:.2f} us"
            )
        ours_kinds = [k for k in kinds if k.startswith("ours")]
        # The peer's figure: rtpengine in its best placement of this run (--kinds rtpengine@pinned
        # adds the relay-on-its-own-core layout to the default one).
        peers = [k for k in kinds if k.startswith("rtpengine")]
        peer = max(peers, key=lambda k: (best[k], keeps[k]), default="")
        for k in ours_kinds:
            if peer and keeps[peer] and per_core[peer] and per_core[k]:
                print(
                    f"{k}/{peer}: {keeps[k] / keeps[peer]:.2f}x by N (loss+p99), "
                    f"{per_core[k] / per_core[peer]:.2f}x by pps per CPU-second"
                )
        for k in kinds:
            print(
                f"largest N with loss < {LOSS_TARGET_PCT} %: {k} {best[k]} streams "
                f"({best[k] * 2 * PTIME_PPS} pps forwarded)"
            )

        def limited(kind: str) -> bool:  # the generator, not the relay, set this bound
            at_best = [r for r in rows if r.kind == kind and r.n == best[kind]]
            return any("generator-limited" in r.note for r in at_best)

        for k in ours_kinds if peer and best[peer] else []:
            ratio = best[k] / best[peer]
            verdict = "MET" if ratio >= RATIO_TARGET else "MISSED"
            if any("NOT IN THE KERNEL" in r.note for r in rows if r.kind == k):
                verdict = "NOT MEASURED: the relay could not forward in the kernel (see its log)"
            elif limited(k) and ratio >= RATIO_TARGET:
                verdict = f"MET ({k} generator-limited: the ratio is a lower bound)"
            elif limited(peer):
                verdict = (
                    "NOT MEASURED: the generator saturated before rtpengine lost packets (see the"
                    " loss+p99 ratio above)"
                )
            print(
                f"{k}/{peer} (rtpengine's best placement here) = {ratio:.2f}x by loss"
                f" (target >= {RATIO_TARGET}x): {verdict}"
            )
        if args.profile and "ours" in kinds:
            n = min(args.streams, key=lambda s: abs(s - max(best["ours"], 1)))
            _w, _t, top = hop.step("ours", n, profile=True)
            print(f"\npy-spy, our relay at N={n} ({n * 2 * PTIME_PPS} pps offered), self time:")
            print("\n".join("  " + t for t in top))
    finally:
        hop.close()


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["1", "2", "all"], default="all")
    parser.add_argument(
        "--streams", type=ints, default=ints("200,600,1000,1200,1400,1600,1800,2200,2600,3000,3500,4000")
    )
    parser.add_argument(
        "--kinds",
        type=lambda s: [k for k in s.split(",") if k],
        default=["ours", "ours-kernel", "rtpengine", "rtpengine@pinned"],
        help="relays of part 1: ours, ours-python, ours-kernel (EDGE_MEDIA_KERNEL=1: established "
        "flows forwarded by E's TC program, media_relay/kernel.py; root), rtpengine; a kind@pinned "
        "or kind@none runs that kind in that placement instead of --hop-cpus",
    )
    parser.add_argument(
        "--hop-cpus",
        choices=sorted(HOP_LAYOUTS),
        default="none",
        help="part 1 CPU placement: pinned (relay CPU 1, generator CPU 0) or none (both share both cores)",
    )
    parser.add_argument(
        "--gen-threads",
        type=int,
        default=2,
        choices=range(1, 5),
        metavar="K",
        help="part 1: generator/sink threads, each with its own caller and callee socket (1-4; "
        "default 2, one per core)",
    )
    parser.add_argument(
        "--python-load", action="store_true", help="part 1 load, part 2 client/echo: the Python loop"
    )
    parser.add_argument("--calls", type=ints, default=ints("200,400,600,800,1000,1200"))
    parser.add_argument(
        "--path-cpus",
        choices=sorted(PATH_LAYOUTS),
        default="none",
        help="part 2 CPU placement: none (default, nothing pinned), split (E CPU 0, C CPU 1), "
        "shared (E+C CPU 1, load CPU 0)",
    )
    parser.add_argument(
        "--gen-tick-us",
        type=float,
        default=100.0,
        help="part 2 C loop: at most one send/receive turn per tick while traffic flows (0: per packet)",
    )
    parser.add_argument(
        "--one-thread-gen",
        action="store_true",
        help="part 2 C loop: client and echo in one thread (before session 7; default: the echo has its own)",
    )
    parser.add_argument("--keep-going", action="store_true", help="part 2: run every N even after losses")
    parser.add_argument(
        "--c-threads",
        type=int,
        default=1,
        help="part 2: C's relay forwarder threads (EDGE_MEDIA_THREADS; 1 = the event loop only)",
    )
    parser.add_argument(
        "--e-kernel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="part 2: E forwards established flows in the kernel (EDGE_MEDIA_KERNEL=1; root; the "
        "default since session 8, --no-e-kernel: userspace)",
    )
    parser.add_argument(
        "--epoll",
        action="store_true",
        help="our relays read their sockets with epoll + recvmmsg (EDGE_MEDIA_URING=0), not io_uring",
    )
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--rtpengine-threads", type=int, default=1)
    parser.add_argument("--no-rtpengine", action="store_true")
    parser.add_argument("--profile", action="store_true", help="py-spy the relays near their limit")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames of uvloop, libsrtp)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, profiles)")
    parser.add_argument(
        "--c-helper",
        action="store_true",
        help="part 2: C's io_uring relay with its elastic send helper (EDGE_MEDIA_HELPER=1)",
    )
    parser.add_argument(
        "--c-kernel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="part 2: C transcodes established SRTP flows in the kernel (kernel_srtp.py; root, Linux "
        "6.10+; the default since session 8, --no-c-kernel: userspace)",
    )
    parser.add_argument(
        "--series",
        type=int,
        default=0,
        metavar="K",
        help="part 2: after each step, the p99 of each 1/K of the window (arrival order)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--max-s", type=float, default=300.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.prefix, args.cpu, args.max_s)
        return 0
    if (os.cpu_count() or 1) < 2:
        print("needs 2 CPUs (relay on one, load on the other)")
        return 2
    raise_fd_limit()
    pin(0)
    os.environ["EDGE_MEDIA_URING"] = "0" if args.epoll else "1"  # inherited by part 1's relay
    prefix = free_prefix()
    tmp = Path(tempfile.mkdtemp(prefix="media-bench-"))
    started = time.monotonic()
    print(machine_line())
    print(f"loopback block {prefix}.x; logs in {tmp}", flush=True)
    with open(tmp / "children.log", "w") as log:
        if args.part in ("1", "all"):
            part1(args, prefix, log, tmp)
        if args.part in ("2", "all"):
            part2(args, prefix, log, tmp)
    print(f"\ntotal {time.monotonic() - started:.0f} s; load average at the end {load_average()}")
    if not args.keep:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
