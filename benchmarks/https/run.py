"""HTTPS benchmark: UDS GETs through E→tunnel→C→UCM with the X-Auth cookie, next to the same
GETs sent straight to the mock UCM's HTTPS 8443, in one run.

    .venv/bin/python -m benchmarks.https.run [--duration-s 5] [--concurrency 1,8,32,64]

The client is aiohttp on uvloop with keep-alive: `c` coroutines share a connector limited to `c`
connections, each sending GETs back to back for `--duration-s` seconds (and at most
`--max-requests` in all). The cookie comes from one get_edge_config with Basic credentials
(alice), as a Jabber client gets it; `/cucm-uds/user/<u>` also carries Basic, as Jabber sends it.
`--syscalls` adds one window under `strace -c` on E and C: system calls per request show the
tunnel's batching independently of the machine's load (needs Debian `strace`).
Latency is per request (send to last body byte); CPU % of E, C, UCM and the client process over
the window shows where the time goes, and CPU milliseconds per answered request of E and C (from
/proc) measure the path's cost even when other work on a shared machine skews req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import uvloop
from yarl import URL

from benchmarks.common import BenchLab, cpu_seconds, machine_line, table
from benchmarks.sip.tools import pyspy_record, top_functions
from edge.lab import wait_zones_active
from mra_client.edge_http import b64
from tests.sip_tools import require, stop_process

LAB_PROCS = ("expe", "expc", "ucm1")


class _Pinned(aiohttp.abc.AbstractResolver):
    """Names the client already resolved (E's outside address; UCM's inside address)."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[aiohttp.abc.ResolveResult]:
        return [
            {
                "hostname": host,
                "host": self.table.get(host, host),
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


@dataclass
class Case:
    path: str  # "via E" | "direct"
    request: str  # "version" | "user"
    url: URL
    headers: dict[str, str]


@dataclass
class Outcome:
    case: Case
    concurrency: int
    ok: int
    errors: dict[str, int]
    elapsed_s: float
    latencies_ms: list[float]
    cpu: dict[str, float]
    cpu_s: dict[str, float]

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    def cpu_ms_per_request(self, *procs: str) -> float:
        """CPU time the named processes spent per answered request, in milliseconds."""
        return 1000 * sum(self.cpu_s.get(p, 0.0) for p in procs) / self.ok if self.ok else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        data = sorted(self.latencies_ms)
        return data[min(len(data) - 1, int(q * len(data)))]


async def load(
    case: Case,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    ssl_ctx: ssl.SSLContext,
    names: dict[str, str],
) -> tuple[int, dict[str, int], float, list[float]]:
    connector = aiohttp.TCPConnector(
        ssl=ssl_ctx, resolver=_Pinned(names), limit=concurrency, limit_per_host=0
    )
    timeout = aiohttp.ClientTimeout(total=10)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm up: open the connections (TLS handshakes are not what is measured).
        await asyncio.gather(*(_one(session, case) for _ in range(concurrency)))
        deadline = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal sent
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                started = time.perf_counter()
                try:
                    status = await _one(session, case)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    key = type(exc).__name__
                    errors[key] = errors.get(key, 0) + 1
                    continue
                if status == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(latencies), errors, elapsed, latencies


async def _one(session: aiohttp.ClientSession, case: Case) -> int:
    async with session.get(case.url, headers=case.headers, allow_redirects=False) as resp:
        await resp.read()
        return resp.status


async def cookie_for(lab: BenchLab, user: str, password: str) -> str:
    async with lab.edge_client() as client:
        await client.get_edge_config(user, password)
        if not client.cookie:
            raise RuntimeError("get_edge_config set no X-Auth cookie")
        return client.cookie


def profile(
    lab: BenchLab,
    case: Case,
    args: argparse.Namespace,
    ssl_ctx: ssl.SSLContext,
    names: dict[str, str],
    out: Path,
) -> list[str]:
    """py-spy on E, C and UCM during one `--duration-s` window of `case` (self / inclusive time)."""
    out.mkdir(parents=True, exist_ok=True)
    duration = max(1, int(args.duration_s))
    pids = {k: v for k, v in lab.pids().items() if k in LAB_PROCS}
    spies = {k: pyspy_record(p, out / f"{k}.txt", duration) for k, p in pids.items()}
    ok, _, elapsed, _ = uvloop.run(
        load(case, args.profile_concurrency, args.duration_s, args.max_requests, ssl_ctx, names)
    )
    for proc in spies.values():
        try:
            proc.wait(duration + 30)
        except subprocess.TimeoutExpired:
            stop_process(proc)
    lines = [
        f"\npy-spy ({duration} s, 200 Hz) during {case.path} {case.request} c={args.profile_concurrency}: "
        f"{ok / elapsed:.0f} req/s"
    ]
    for k in spies:
        samples, rows, inclusive = top_functions(out / f"{k}.txt")
        lines.append(f"  {k} ({samples} samples; self% / total%):")
        lines += [f"    {own:5.1f}% {tot:5.1f}%  {fn}" for fn, own, tot in rows]
        lines.append(f"  {k}, project frames by inclusive time:")
        lines += [f"    {tot:5.1f}%  {fn}" for fn, tot in inclusive]
    return lines


SYSCALLS = ("write", "writev", "sendmsg", "read", "recvmsg", "epoll_pwait", "epoll_wait")


def syscalls(
    lab: BenchLab,
    case: Case,
    args: argparse.Namespace,
    ssl_ctx: ssl.SSLContext,
    names: dict[str, str],
    out: Path,
) -> list[str]:
    """System calls of E and C per answered request during one window (`strace -c`): a measure of
    the tunnel's batching that, unlike req/s, does not depend on what else runs on the machine."""
    out.mkdir(parents=True, exist_ok=True)
    strace = require("strace")
    pids = {k: v for k, v in lab.pids().items() if k in ("expe", "expc")}
    tracers = {
        k: subprocess.Popen(
            [strace, "-c", "-f", "-p", str(p), "-o", str(out / f"{k}.txt")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for k, p in pids.items()
    }
    time.sleep(1.0)  # strace attaches
    try:
        ok, _, _, _ = uvloop.run(
            load(case, args.profile_concurrency, args.duration_s, args.max_requests, ssl_ctx, names)
        )
    finally:
        for proc in tracers.values():
            stop_process(proc, signal.SIGINT)  # strace writes its summary on SIGINT
    lines = [
        f"\nsystem calls per answered request ({case.path} {case.request} c={args.profile_concurrency}, "
        f"{ok} requests, under strace):"
    ]
    for k in tracers:
        counts: dict[str, int] = {}
        report = out / f"{k}.txt"
        for line in report.read_text().splitlines() if report.exists() else []:
            fields = line.split()
            if len(fields) >= 5 and fields[-1] in SYSCALLS and fields[3].isdigit():
                counts[fields[-1]] = int(fields[3])
        per = "  ".join(f"{name} {n / max(ok, 1):.2f}" for name, n in sorted(counts.items()))
        lines.append(f"  {k}: {per}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--duration-s", type=float, default=5.0, help="measured window per case and level")
    ap.add_argument("--concurrency", default="1,8,32,64", help="comma-separated connection counts")
    ap.add_argument("--max-requests", type=int, default=200_000, help="cap per window")
    ap.add_argument("--user", default="alice")
    ap.add_argument("--password", default="lab-pass")
    ap.add_argument("--profile", action="store_true", help="py-spy E, C, UCM during one extra via-E window")
    ap.add_argument("--profile-concurrency", type=int, default=32)
    ap.add_argument(
        "--syscalls",
        action="store_true",
        help="strace -c E and C during one extra via-E window at --profile-concurrency",
    )
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    print(f"# HTTPS benchmark; {machine_line()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-https-"))
    outcomes: list[Outcome] = []
    profile_lines: list[str] = []
    with BenchLab(tmp / "lab") as lab:
        status = asyncio.run(wait_zones_active(lab.config, 30))
        if not all(z.get("state") == "Active" for z in status.get("zones", [])):
            raise RuntimeError(f"traversal zones not Active: {status.get('zones')}")
        cfg = lab.config
        e, ucm = cfg.expe[0], cfg.ucm[0]
        ssl_ctx = ssl.create_default_context(cafile=str(lab.ca_file))
        names = {e.fqdn: e.external_address, ucm.fqdn: ucm.address}
        cookie = asyncio.run(cookie_for(lab, args.user, args.password))
        basic = "Basic " + base64.b64encode(f"{args.user}:{args.password}".encode()).decode()
        lane = "/" + b64(f"{cfg.lab.domain}/https/{ucm.fqdn}/{ucm.https_port}")
        edge = f"https://{e.fqdn}:{e.https_port}{lane}"
        direct = f"https://{ucm.fqdn}:{ucm.https_port}"
        via_hdr = {"Cookie": f"X-Auth={cookie}"}
        cases = [
            Case("via E", "version", URL(f"{edge}/cucm-uds/version", encoded=True), via_hdr),
            Case("direct", "version", URL(f"{direct}/cucm-uds/version", encoded=True), {}),
            Case("via E", "user", URL(f"{edge}/cucm-uds/user/{args.user}", encoded=True),
                 {**via_hdr, "Authorization": basic}),
            Case("direct", "user", URL(f"{direct}/cucm-uds/user/{args.user}", encoded=True),
                 {"Authorization": basic}),
        ]  # fmt: skip
        pids = {k: v for k, v in lab.pids().items() if k in LAB_PROCS}
        pids["client"] = os.getpid()
        for case in cases:
            for c in levels:
                before = {k: cpu_seconds(p) for k, p in pids.items()}
                t0 = time.perf_counter()
                ok, errors, elapsed, lat = uvloop.run(
                    load(case, c, args.duration_s, args.max_requests, ssl_ctx, names)
                )
                wall = time.perf_counter() - t0
                cpu_s = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
                cpu = {k: 100 * v / wall for k, v in cpu_s.items()}
                out = Outcome(case, c, ok, errors, elapsed, lat, cpu, cpu_s)
                outcomes.append(out)
                cpu_text = " ".join(f"{k}={v:.0f}%" for k, v in cpu.items())
                if case.path == "via E":
                    per = " ".join(f"{k}={out.cpu_ms_per_request(k):.3f}" for k in ("expe", "expc"))
                    cpu_text += f"  cpu ms/req {per}"
                lat_text = f"p50 {out.pct(0.5):6.1f} ms  p99 {out.pct(0.99):6.1f} ms"
                head = f"  {case.path:6} {case.request:7} c={c:<3} {out.rps:8.0f} req/s"
                print(f"{head}  {lat_text}  errors {errors or 0}  cpu {cpu_text}", flush=True)
        if args.profile:
            profile_lines = profile(lab, cases[0], args, ssl_ctx, names, tmp / "profile")
        if args.syscalls:
            profile_lines += syscalls(lab, cases[0], args, ssl_ctx, names, tmp / "strace")
    if profile_lines:
        print("\n".join(profile_lines))
    rows: list[list[object]] = []
    for req in ("version", "user"):
        for c in levels:
            via = next(
                o for o in outcomes if o.case.request == req and o.case.path == "via E" and o.concurrency == c
            )
            dir_ = next(
                o
                for o in outcomes
                if o.case.request == req and o.case.path == "direct" and o.concurrency == c
            )
            rows.append(
                [
                    f"/cucm-uds/{'version' if req == 'version' else 'user/' + args.user}",
                    c,
                    f"{via.rps:,.0f}",
                    f"{via.pct(0.5):.1f} / {via.pct(0.99):.1f}",
                    f"{dir_.rps:,.0f}",
                    f"{dir_.pct(0.5):.1f} / {dir_.pct(0.99):.1f}",
                    f"{100 * via.rps / dir_.rps:.0f}%" if dir_.rps else "-",
                    f"{via.cpu_ms_per_request('expe', 'expc'):.3f}",
                    sum(via.errors.values()) + sum(dir_.errors.values()),
                ]
            )
    print("\n## Summary (req/s; latency p50 / p99 ms)")
    print(
        table(
            [
                "request",
                "conc",
                "via E req/s",
                "via E p50/p99",
                "direct req/s",
                "direct p50/p99",
                "via/direct",
                "E+C cpu ms/req",
                "errors",
            ],
            rows,
        )
    )
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
