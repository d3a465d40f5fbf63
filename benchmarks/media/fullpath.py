"""Part 2 of the media benchmark: the full path client -SRTP-> E -SRTP-> C -RTP-> echo and back.

How it is measured: see the docstring of ``run.py`` (part 2) and the README.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from benchmarks.common import table
from benchmarks.media.load import (
    PACKET_BYTES,
    PAYLOAD_BYTES,
    PTIME_PPS,
    RTP,
    Addr,
    CpuProbe,
    Window,
    addr_of,
    flush,
    host_busy_s,
    native_pathgen,
    run_echo_path,
    run_echo_path_native,
    udp_socket,
    warm_echo_path,
)
from benchmarks.media.procs import REPO, Child, pin
from benchmarks.media.report import LOSS_TARGET_PCT, Profile, delta, fmt_us, load_average
from benchmarks.media.rtpengine import plain_sdp
from media_relay.sdp import SessionDescription
from media_relay.srtp import Direction, SrtpAuthError, SrtpContext, generate_crypto

PATH_CALLS_TARGET = 1000
PATH_P99_TARGET_MS = 5.0


def client_offer(addr: Addr, crypto: str, session: int) -> str:
    return (
        f"v=0\r\no=jabber {session} 1 IN IP4 {addr[0]}\r\ns=-\r\nc=IN IP4 {addr[0]}\r\nt=0 0\r\n"
        f"m=audio {addr[1]} RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\na={crypto}\r\na=sendrecv\r\n"
    )


@dataclass
class PathRow:
    n: int
    w: Window
    base: Window
    setup_s: float
    totals: dict[str, dict[str, Any]]

    @property
    def added_p99_us(self) -> float:
        return self.w.percentile_us(0.99) - self.base.percentile_us(0.99)

    @property
    def added_net_p99_us(self) -> float:
        """Added p99 less the echo's own holding time per packet (C loop only; else NaN): what the
        relays add, without the harness's scheduling delays on a busy machine."""
        return self.w.percentile_us(0.99, net=True) - self.base.percentile_us(0.99, net=True)

    @property
    def judged_p99_us(self) -> float:
        """The added p99 the verdict uses: net of the echo's hold when the loop measured it."""
        net = self.added_net_p99_us
        return self.added_p99_us if math.isnan(net) else net

    @property
    def lossless(self) -> bool:
        return self.w.loss_pct < LOSS_TARGET_PCT

    @property
    def ok(self) -> bool:
        return self.lossless and self.judged_p99_us / 1000 < PATH_P99_TARGET_MS

    @property
    def generator_limited(self) -> bool:
        """The client/echo itself could not keep the rate (direct baseline lossy or late)."""
        b = self.base
        return b.loss_pct >= LOSS_TARGET_PCT or b.behind_s > 0.05 or self.w.behind_s > 0.05

    def cells(self) -> list[object]:
        w = self.w
        p50, p99, a99 = w.percentile_us(0.5), w.percentile_us(0.99), self.added_p99_us
        drops = {
            f"{name}.{k[:-6]}": v
            for name, t in self.totals.items()
            for k, v in t.items()
            if k.endswith("_drops") and k != "garbage_drops" and v
        }
        turns = w.counts.get("turns", 0)
        hold = w.counts.get("echo_hold_p99_us")
        per_turn = f"{(w.sent + w.counts.get('echoed', 0) + w.received) / turns:.1f}" if turns else "-"
        c = self.totals.get("C", {})
        c_native = 100 * c.get("native_forwarded", 0) / max(c.get("rx_packets", 0), 1)
        note = " ".join(f"{k}={v}" for k, v in drops.items())
        if c.get("native_helper_queued"):  # --c-helper: how much of C's sending it lent out
            share = 100 * c["native_helper_queued"] / max(c.get("native_forwarded", 0), 1)
            note = f"{note} C helper sent {share:.0f}% ({c.get('native_helper_activations', 0)}x)".strip()
        if self.generator_limited:
            note = f"generator late/lossy {note}".strip()
        return [
            self.n,
            self.n * PTIME_PPS,
            f"{w.loss_pct:.3f}",
            fmt_us(p50),
            fmt_us(p99),
            fmt_us(a99),
            fmt_us(w.percentile_us(0.99, net=True)),
            fmt_us(self.added_net_p99_us),
            f"{w.cpu_pct('expe'):.0f}",
            f"{w.cpu_pct('expc'):.0f}",
            f"{w.cpu_pct('load'):.0f}",
            f"{w.cpu_pct('host'):.0f}",
            f"{w.cpu_pct('host') - w.cpu_pct('expe') - w.cpu_pct('expc') - w.cpu_pct('load'):.0f}",
            f"{w.cpu_pct('steal'):.1f}",
            "/".join(f"{w.counts.get(f'wait_ms_{k}', 0) / 10 / max(w.send_s, 1e-9):.0f}" for k in WAITERS),
            f"{w.behind_s * 1000:.0f}",
            "-" if hold is None else hold,
            per_turn,
            f"{w.checked - w.bad}/{w.checked}",
            f"{c_native:.0f}",
            f"{self.setup_s:.1f}",
            f"{w.cpu_s.get('rcvbuf_drops', 0):.0f}",
            "ok" if self.ok else "FAIL",
            note,
        ]


PATH_HEADERS = [
    "calls", "pps/dir", "loss %", "p50 us", "p99 us", "+p99 us", "net p99 us", "+net p99 us", "E CPU %",
    "C CPU %", "gen CPU %", "host CPU %", "other CPU %", "steal %",
    "runq wait % E/C/gen", "gen late ms", "echo p99 us", "pkt/turn", "SRTP ok",
    "C native %", "setup s", "rcvbuf drops", "verdict", "note",
]  # fmt: skip

WAITERS = ("expe", "expc", "load")

# Where part 2's processes run (--path-cpus): E, C, and this process (client + echo); -1 = any.
PATH_LAYOUTS = {
    "none": (-1, -1, -1),  # nothing pinned: the kernel spreads E, C and the load over both cores
    "split": (0, 1, -1),  # E on CPU 0, C on CPU 1, the load wherever there is room
    "shared": (1, 1, 0),  # the old layout: E and C share CPU 1, the load has CPU 0
}


def relay_build() -> str:
    """Which relay code runs: the native extension file (mtime, hash) next to its source."""
    parts = []
    for f in sorted((REPO / "media_relay").glob("_fastpath*")):
        if f.suffix in (".so", ".c"):
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(f.stat().st_mtime))
            digest = hashlib.sha256(f.read_bytes()).hexdigest()[:12]
            parts.append(f"{f.name} {stamp} UTC sha256 {digest}")
    return "; ".join(parts) or "no media_relay/_fastpath extension"


class Path2:
    def __init__(self, args: argparse.Namespace, prefix: str, log: TextIO, tmp: Path) -> None:
        self.args, self.prefix, self.log, self.tmp = args, prefix, log, tmp
        self.client = udp_socket(f"{prefix}.4")
        self.echo = udp_socket(f"{prefix}.5")  # timestamps: how long the echo held a packet
        self.rounds = 1 + math.ceil(args.window_s * PTIME_PPS)
        if self.rounds > 0xFFFF:
            raise ValueError("--window-s too long: the RTP seq numbers the rounds")
        self.cpu_e, self.cpu_c, self.cpu_load = PATH_LAYOUTS[args.path_cpus]
        self.gen = None if args.python_load else native_pathgen()
        self.tick_s = args.gen_tick_us / 1e6
        self.paths: dict[str, str] = {}
        self.ssrc_base = 0

    def next_ssrc_base(self) -> int:
        """A fresh SSRC block per run, so a late packet of an earlier run never matches."""
        self.ssrc_base = (self.ssrc_base + 0x10000) & 0xFFFF0000
        return self.ssrc_base

    def close(self) -> None:
        self.client.close()
        self.echo.close()

    def packets(self, ctxs: list[SrtpContext], n: int, ssrc_base: int) -> list[bytes]:
        payload = bytes(range(PAYLOAD_BYTES))
        return [
            ctxs[i].protect(RTP.pack(0x80, 0, k, k * 160, ssrc_base + i + 1) + payload)
            for k in range(self.rounds)
            for i in range(n)
        ]

    def run(
        self,
        dests: list[Addr],
        packets: list[bytes],
        probe: CpuProbe,
        verify: Callable[[int, bytes], bool] | None = None,
    ) -> Window:
        rate = len(dests) * PTIME_PPS
        flush([self.client, self.echo])
        if self.gen is None:
            w = run_echo_path(self.client, self.echo, dests, packets, 1, rate, probe, verify, self.ssrc_base)
        else:
            w = run_echo_path_native(
                self.gen,
                self.client,
                self.echo,
                dests,
                packets,
                1,
                rate,
                probe,
                verify,
                self.ssrc_base,
                self.tick_s,
                echo_thread=not self.args.one_thread_gen,
            )
        w.counts.update({f"wait_ms_{k}": round(v * 1000) for k, v in probe.waited.items()})
        return w

    def baseline(self, n: int) -> Window:
        """client -> echo -> client at the same rate, packets of the same size (SRTP's tag
        included) and the same loop: what the harness itself adds."""
        probe_ctx = SrtpContext.from_crypto(generate_crypto(1), Direction.OUTBOUND)
        filler = bytes(len(probe_ctx.protect(bytes(PACKET_BYTES))) - 12)
        rtp, base = RTP.pack, self.next_ssrc_base()
        packets = [
            rtp(0x80, 0, k, k * 160, base + i + 1) + filler for k in range(self.rounds) for i in range(n)
        ]
        dests = [addr_of(self.echo)] * n
        flush([self.client, self.echo])
        warm_echo_path(self.client, self.echo, dests, packets, 2.0)
        return self.run(dests, packets, CpuProbe({}))

    def step(
        self, n: int, profile: bool = False
    ) -> tuple[Window, float, dict[str, dict[str, Any]], list[str]]:
        uring = "0" if self.args.epoll else "1"
        e_env = {"EDGE_MEDIA_KERNEL": "1" if self.args.e_kernel else "0", "EDGE_MEDIA_URING": uring}
        e = Child("e", self.prefix, self.cpu_e, self.log, env=e_env)
        try:
            c_env = {
                "EDGE_MEDIA_THREADS": str(self.args.c_threads),
                "EDGE_MEDIA_URING": uring,
                "EDGE_MEDIA_HELPER": "1" if self.args.c_helper else "0",
                "EDGE_MEDIA_KERNEL": "1" if self.args.c_kernel else "0",
            }
            c = Child("c", self.prefix, self.cpu_c, self.log, env=c_env)
        except BaseException:
            e.close()
            raise
        try:
            t0 = time.perf_counter()
            keys = [generate_crypto(1) for _ in range(n)]
            me = addr_of(self.client)
            offers = [[f"call{i}", client_offer(me, keys[i].to_line()[2:], i + 1)] for i in range(n)]
            to_c = e.call("offer", ingress="outside", items=offers)
            c.call("offer", ingress="outside", items=[[f"c{i}", s] for i, s in enumerate(to_c)])
            far = [[f"c{i}", plain_sdp(addr_of(self.echo), i + 1)] for i in range(n)]
            to_e = c.call("answer", ingress="inside", items=far)
            answers = e.call("answer", ingress="inside", items=[[f"call{i}", s] for i, s in enumerate(to_e)])
            e.call("wait_bound")
            c.call("wait_bound")
            setup_s = time.perf_counter() - t0
            dests: list[Addr] = []
            ins: list[SrtpContext] = []
            for text in answers:
                sd = SessionDescription.parse(text.encode())
                conn = sd.media_connection(0)
                assert conn is not None
                dests.append((conn.address, sd.media[0].port))
                ins.append(SrtpContext.from_crypto(sd.media[0].crypto[0], Direction.INBOUND))
            # Fresh keys per step (new E and C, new offers): no SRTP index is ever sent twice.
            outs = [SrtpContext.from_crypto(k, Direction.OUTBOUND) for k in keys]
            packets = self.packets(outs, n, self.next_ssrc_base())

            def verify(i: int, data: bytes) -> bool:
                try:
                    ins[i].unprotect(data)
                except SrtpAuthError:
                    return False
                return True

            flush([self.client, self.echo])
            back = warm_echo_path(self.client, self.echo, dests, packets, 3.0)
            if back < n:
                print(f"    warm-up: {back}/{n} echoes came back", flush=True)
            pids = {"expe": e.pid, "expc": c.pid}
            profs = []
            if profile:
                profs = [
                    (
                        name,
                        Profile(pid, self.args.window_s, self.tmp / f"path-{name}-{n}.txt", self.args.native),
                    )
                    for name, pid in pids.items()
                ]
            before = {"E": e.call("totals"), "C": c.call("totals")}
            w = self.run(dests, packets, CpuProbe(pids), verify)
            totals = {"E": delta(before["E"], e.call("totals")), "C": delta(before["C"], c.call("totals"))}
            self.paths.setdefault("E", str(totals["E"].get("path")))
            self.paths.setdefault(
                "C", f"{totals['C'].get('path')} (native flows' SRTP: {totals['C'].get('srtp')})"
            )
            top = [f"{name}: {line}" for name, p in profs for line in p.top(8)]
        finally:
            c.close()
            e.close()
        return w, setup_s, totals, top

    def sweep(self) -> list[PathRow]:
        """Every N in turn; stops after two lossy steps in a row or one with >= 5 % loss unless
        --keep-going. Each step: a direct baseline, then fresh E and C with N calls."""
        rows: list[PathRow] = []
        fails = 0
        for n in self.args.calls:
            base = self.baseline(n)
            w, setup_s, totals, _ = self.step(n)
            row = PathRow(n, w, base, setup_s, totals)
            rows.append(row)
            print("  " + "  ".join(str(c) for c in row.cells()), flush=True)
            if self.args.series:
                print(f"    {latency_series(w, self.args.series)}", flush=True)
            fails = fails + 1 if w.loss_pct >= LOSS_TARGET_PCT else 0
            if not self.args.keep_going and (fails >= 2 or w.loss_pct >= 5.0):
                break
        return rows


def latency_series(w: Window, chunks: int) -> str:
    """The window's net latencies in arrival order, cut into ``chunks`` equal slices: each
    slice's p99 in ms. A relay that fell behind shows as a run of high slices (a standing queue
    building and draining) rather than as scattered outliers."""
    values = w.net_latencies_ns
    size = len(values) // max(chunks, 1)
    if size == 0:
        return "series: too few packets"
    p99s = []
    for i in range(chunks):
        part = sorted(values[i * size : (i + 1) * size])
        p99s.append(part[min(len(part) - 1, int(0.99 * len(part)))] / 1e6)
    return f"p99 ms per 1/{chunks} of the window: " + " ".join(f"{v:.1f}" for v in p99s)


def part2(args: argparse.Namespace, prefix: str, log: TextIO, tmp: Path) -> None:
    cpu_e, cpu_c, cpu_load = PATH_LAYOUTS[args.path_cpus]

    def where(cpu: int) -> str:
        return "any CPU" if cpu < 0 else f"CPU {cpu}"

    loop = "Python loop" if args.python_load else f"C loop, sendmmsg/recvmmsg, tick {args.gen_tick_us:.0f} us"
    if not args.python_load:
        loop += ", client and echo in one thread" if args.one_thread_gen else ", the echo in its own thread"
    print(
        f"\n## 2. Full path client -SRTP-> E -SRTP-> C -RTP-> echo and back, {args.window_s:.0f} s windows"
        f" (--path-cpus {args.path_cpus}: E on {where(cpu_e)}, C on {where(cpu_c)}, client+echo on"
        f" {where(cpu_load)}, {loop}; calls set up by SDP, no SIP"
        f"{'; E forwards established flows in the kernel (--e-kernel)' if args.e_kernel else ''}"
        f"{f'; C relays with {args.c_threads} forwarder threads' if args.c_threads > 1 else ''}"
        f"{'; C with its elastic send helper (--c-helper)' if args.c_helper else ''}"
        f"{'; C transcodes established SRTP flows in the kernel (--c-kernel)' if args.c_kernel else ''})",
        flush=True,
    )
    print(f"relay code: {relay_build()}", flush=True)
    busy0, t0 = host_busy_s(), time.monotonic()
    time.sleep(1.0)
    others = 100 * (host_busy_s() - busy0) / (time.monotonic() - t0)
    print(
        f"host busy before the sweep (others' work): {others:.0f} % of {100 * (os.cpu_count() or 1)} %;"
        f" load average {load_average()}",
        flush=True,
    )
    pin(cpu_load)
    path = Path2(args, prefix, log, tmp)
    try:
        rows = path.sweep()
        print()
        print(table(PATH_HEADERS, [r.cells() for r in rows]))
        print(f"\nrelay path: E {path.paths.get('E')}, C {path.paths.get('C')}")
        if args.e_kernel or args.c_kernel:
            print(
                "kernel forwarding: a relay's programs on lo run in the softirq of each packet's sender"
                " (here the client and the echo), so their CPU shows in gen CPU and host CPU, not in"
                " E's or C's"
            )
        print(
            "direct client -> echo -> client baselines (p50/p99 us, loss %, gen CPU %, echo p99 us): "
            + ", ".join(
                f"N={r.n}: {fmt_us(r.base.percentile_us(0.5))}/{fmt_us(r.base.percentile_us(0.99))}"
                f" {r.base.loss_pct:.2f} {r.base.cpu_pct('load'):.0f}"
                f" {r.base.counts.get('echo_hold_p99_us', '-')}"
                for r in rows
            )
        )
        print(
            "CPU-ms per second per 100 calls, lossless steps (E / C / client+echo; load-independent "
            "until a core saturates): "
            + ", ".join(
                f"N={r.n}: "
                + "/".join(f"{10 * r.w.cpu_pct(k) * 100 / r.n:.0f}" for k in ("expe", "expc", "load"))
                for r in rows
                if r.lossless
            )
        )
        best = max((r.n for r in rows if r.ok), default=0)
        limit_us = PATH_P99_TARGET_MS * 1000
        cuts = [
            (f"loss < {LOSS_TARGET_PCT} %", [r for r in rows if r.lossless]),
            (
                f"loss < {LOSS_TARGET_PCT} % and added p99 < {PATH_P99_TARGET_MS} ms",
                [r for r in rows if r.lossless and r.added_p99_us < limit_us],
            ),
        ]
        if any(not math.isnan(r.added_net_p99_us) for r in rows):
            cuts.append(
                (
                    f"loss < {LOSS_TARGET_PCT} % and added p99 net of the echo's hold"
                    f" < {PATH_P99_TARGET_MS} ms (the verdict column)",
                    [r for r in rows if r.lossless and r.added_net_p99_us < limit_us],
                )
            )
        for label, passed in cuts:
            n = max((r.n for r in passed), default=0)
            verdict = "MET" if n >= PATH_CALLS_TARGET else "MISSED"
            print(f"largest N, {label}: {n} calls (target {PATH_CALLS_TARGET}): {verdict}")
        if args.profile and rows:
            n = rows[-1].n if best == 0 else min((r.n for r in rows if r.n > best), default=best)
            _w, _s, _t, top = path.step(n, profile=True)
            print(f"\npy-spy at N={n} calls, self time:")
            print("\n".join("  " + t for t in top))
    finally:
        path.close()
        pin(0)
