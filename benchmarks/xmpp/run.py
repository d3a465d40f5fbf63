"""XMPP over MRA benchmark (shared/spec/MRA.md §6): held sessions and lossless chat throughput.

Run from the repository root (as root, with Debian's `prosody` and `lua-unbound` installed)::

    .venv/bin/python benchmarks/xmpp/run.py --sessions 500,1000,2000 --pairs 10 --messages 2000

1. Sessions: a lab (`edge lab up --detach`, temp state dir, loopback block 127.<block>.x.x)
   with the mock IM&P; for each N (rising) the script holds N authenticated, bound sessions
   through E and C (client → E:5222 STARTTLS → traversal link → C → IM&P edge port) and reads
   VmRSS of E, C and IM&P from /proc/<pid>/status. "per session" is the growth over the idle lab.
2. Messages: `--pairs` sender/receiver pairs, each sender pushing `--messages` chats to its
   receiver's full JID with at most `--window` unacknowledged (not yet received) at any time,
   after a warm-up round. Lossless means every message arrived, in order, with no error
   stanza. The same load runs against: the edge in front of the mock IM&P (both clients of a
   pair over MRA), the mock IM&P directly, Debian's Prosody directly, and (unless
   `--no-edge-prosody`) the edge in front of Prosody (a second lab with `imp.0.external=true`).

Clients are the load engine's (`edge load`) XMPP client, mra_client/xmpp_lean.LeanXmppSession:
asyncio streams + STARTTLS + SASL PLAIN + bind (`login(online=False)`: no roster, no presence);
senders write batches (`send_chats`, `drain`); receivers take raw bytes (`on_data`) and count
`#<seq>#` body markers with a regex instead of parsing stanzas, so the client costs the same
against every server. Every
loop is bounded in count; the whole run is bounded by `--time-limit-s`. Only processes this
script starts are stopped, by their PIDs (the labs by `edge lab down`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import uvloop  # noqa: E402

from edge.lab import lab_status  # noqa: E402
from mra_client.edge_http import StepError  # noqa: E402
from mra_client.xmpp_lean import LeanXmppSession  # noqa: E402
from tests.conftest import RunningLab, lab_overrides  # noqa: E402
from tests.prosody_tools import ProsodyServer  # noqa: E402

DOMAIN = "example.com"
PASSWORD = "lab-pass"
GIB = 1 << 30
TARGET_SESSIONS = 10_000
TARGET_RATIO = 0.5
MARK = re.compile(rb"#(\d+)#")
SETTLE_TIMEOUT_S = 30.0
LOGIN_TIMEOUT_S = 30.0
PROSODY_CLIENT_PORT = 15222
PROSODY_EDGE_PORT = 17400


def user(i: int) -> str:
    """The lab's generated load users (edge/config.py LoadPopulation): load00001…"""
    return f"load{i + 1:05d}"


# -- process figures -------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}"


# -- lean clients ------------------------------------------------------------------------------------


@dataclass
class Target:
    """Where clients connect (STARTTLS, verifying `domain` against `ca`) and the servers to watch."""

    name: str
    host: str
    port: int
    ca: Path
    pids: dict[str, int]


class LoginFailed(Exception):
    pass


def _ignore(data: bytes) -> None:
    """Held sessions read (and drop) whatever the server pushes; nothing is expected."""


async def open_session(target: Target, ctx: ssl.SSLContext, username: str, resource: str) -> LeanXmppSession:
    """A bare bound session (no roster, no presence), the same stanzas for every server."""
    session = LeanXmppSession(
        username=username,
        password=PASSWORD,
        domain=DOMAIN,
        resource=resource,
        ssl_context=ctx,
        on_data=_ignore,
    )
    try:
        await session.login(target.host, target.port, LOGIN_TIMEOUT_S, online=False)
    except StepError as exc:
        raise LoginFailed(f"{username}: {exc.detail}") from exc
    return session


async def open_sessions(
    target: Target, ctx: ssl.SSLContext, users: Sequence[int], resource: str, concurrency: int
) -> list[LeanXmppSession]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> LeanXmppSession:
        async with gate:
            return await open_session(target, ctx, user(i), resource)

    results = await asyncio.gather(*(one(i) for i in users), return_exceptions=True)
    opened = [r for r in results if isinstance(r, LeanXmppSession)]
    failed = [r for r in results if not isinstance(r, LeanXmppSession)]
    if failed:
        await close_all(opened)
        raise LoginFailed(f"{len(failed)} of {len(results)} logins failed, first: {failed[0]!r}")
    return opened


async def close_all(sessions: Sequence[LeanXmppSession]) -> None:
    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


# -- 1. held sessions ------------------------------------------------------------------------------


@dataclass
class SessionRow:
    sessions: int
    rss: dict[str, int]
    login_rate: float

    @property
    def total(self) -> int:
        return sum(self.rss.values())


async def wait_until(probe: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def edge_counts(lab: RunningLab, imp: bool = True) -> tuple[int, int, int]:
    e = int(lab.component("expe")["counts"]["xmpp_sessions"])
    c = int(lab.component("expc")["xmpp"]["sessions"])
    i = int(lab.component("imp1")["xmpp"]["sessions_current"]) if imp else -1
    return e, c, i


def counts_are(lab: RunningLab, n: int) -> Callable[[], bool]:
    return lambda: edge_counts(lab) == (n, n, n)


async def held_sessions(
    lab: RunningLab, target: Target, ctx: ssl.SSLContext, steps: Sequence[int], concurrency: int
) -> tuple[dict[str, int], list[SessionRow]]:
    idle = {name: rss_bytes(pid) for name, pid in target.pids.items()}
    rows: list[SessionRow] = []
    held: list[LeanXmppSession] = []
    try:
        for n in steps:
            started, before = time.monotonic(), len(held)
            held += await open_sessions(target, ctx, range(before, n), "held", concurrency)
            rate = (n - before) / max(time.monotonic() - started, 1e-9)
            await wait_until(counts_are(lab, n), SETTLE_TIMEOUT_S, f"{n} sessions")
            rss = {name: rss_bytes(pid) for name, pid in target.pids.items()}
            rows.append(SessionRow(n, rss, rate))
            print(f"  held {n} sessions: E+C+IM&P {mib(sum(rss.values()))} MiB", flush=True)
    finally:
        await close_all(held)
    await wait_until(counts_are(lab, 0), SETTLE_TIMEOUT_S, "sessions to close")
    return idle, rows


# -- 2. lossless messages/s ---------------------------------------------------------------------------


@dataclass
class Flow:
    """One sender → receiver stream of `total` chats with sequence numbers 0..total-1."""

    sender: LeanXmppSession
    receiver: LeanXmppSession
    total: int
    sent: int = 0
    received: int = 0
    out_of_order: int = 0
    errors: int = 0
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    closed: str | None = None
    _buf: bytes = b""

    def __post_init__(self) -> None:
        # The receiver's read task hands us its bytes (LeanXmppSession.on_data), unparsed.
        self.receiver.on_data = self.data_received
        self.receiver.on_closed = self.stream_closed

    async def send(self, window: int) -> None:
        to = self.receiver.jid
        while self.sent < self.total:
            room = window - (self.sent - self.received)
            if room <= 0:
                self.progress.clear()
                await self.progress.wait()
                continue
            batch = range(self.sent, min(self.sent + room, self.total))
            self.sender.send_chats(to, (f"#{n}#" for n in batch))
            self.sent = batch.stop
            await self.sender.drain()

    def data_received(self, data: bytes) -> None:
        self.errors += data.count(b"<error") + data.count(b"stream:error")
        buf = self._buf + data
        last = 0
        for match in MARK.finditer(buf):
            if int(match.group(1)) != self.received:
                self.out_of_order += 1
            self.received += 1
            last = match.end()
        self._buf = buf[last:][-64:]
        self.progress.set()
        if self.received >= self.total:
            self.finished.set()

    def stream_closed(self, reason: str) -> None:
        self.closed = reason
        self.progress.set()
        self.finished.set()

    async def receive(self) -> None:
        await self.finished.wait()
        if self.received < self.total:
            raise ConnectionError(f"{self.receiver.jid}: {self.closed} after {self.received}")


@dataclass
class RateRow:
    name: str
    pairs: int
    messages: int
    rate: float
    lossless: bool
    cpu_per_kmsg: dict[str, float]
    rss: dict[str, int]
    note: str = ""


async def run_round(
    pairs: Sequence[tuple[LeanXmppSession, LeanXmppSession]], count: int, window: int, limit_s: float
) -> tuple[float, list[Flow]]:
    flows = [Flow(s, r, count) for s, r in pairs]
    started = time.monotonic()
    tasks = [f.receive() for f in flows] + [f.send(window) for f in flows]
    await asyncio.wait_for(asyncio.gather(*tasks), limit_s)
    return time.monotonic() - started, flows


async def message_rate(
    target: Target, ctx: ssl.SSLContext, args: argparse.Namespace, first_user: int
) -> RateRow:
    n = args.pairs
    clients = await open_sessions(target, ctx, range(first_user, first_user + 2 * n), "bench", 50)
    pairs = [(clients[2 * i], clients[2 * i + 1]) for i in range(n)]
    try:
        await run_round(pairs, max(args.messages // 10, args.window), args.window, args.round_limit_s)
        watched = {**target.pids, "client": os.getpid()}
        cpu0 = {name: cpu_s(pid) for name, pid in watched.items()}
        rounds = [
            await run_round(pairs, args.messages, args.window, args.round_limit_s) for _ in range(args.rounds)
        ]
        cpu1 = {name: cpu_s(pid) for name, pid in watched.items()}
        rss = {name: rss_bytes(pid) for name, pid in target.pids.items()}
    finally:
        await close_all(clients)
    total = n * args.messages
    flows = [f for _, round_flows in rounds for f in round_flows]
    lossless = all(f.received == f.total and not f.out_of_order and not f.errors for f in flows)
    per_k = {name: (cpu1[name] - cpu0[name]) / (total * args.rounds) * 1000 for name in watched}
    rates = sorted(total / elapsed for elapsed, _ in rounds)
    note = f"{len(rates)} rounds: {rates[0]:,.0f}–{rates[-1]:,.0f}"
    row = RateRow(target.name, n, args.messages, statistics.median(rates), lossless, per_k, rss, note)
    print(f"  {target.name}: {row.rate:,.0f} msg/s lossless={lossless}", flush=True)
    return row


# -- labs and Prosody ----------------------------------------------------------------------------------


@contextlib.contextmanager
def running_lab(state: Path, block: int, extra: Sequence[str]) -> Iterator[RunningLab]:
    """`edge lab up --detach` … `edge lab down` (down also after a failed or partial up)."""
    lab = RunningLab(state, [*lab_overrides(state, block), *extra])
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


async def lab_pids(lab: RunningLab, names: Sequence[str]) -> dict[str, int]:
    by_name = {c["name"]: int(c["pid"]) for c in (await lab_status(lab.config))["components"]}
    labels = {"expe": "E", "expc": "C", "imp1": "IM&P"}
    return {labels[n]: by_name[n] for n in names}


def client_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


# Prosody 0.12 leaves Nagle on (net/server_epoll.lua `nagle = true`) while asyncio/uvloop set
# TCP_NODELAY; the baseline the target is judged against turns it off so both sides send alike.
# The Debian-default row is printed too (here both are CPU-bound and within run-to-run noise).
NO_NAGLE = "network_settings = { nagle = false }"


def prosody_for(
    workdir: Path, address: str, certs: Path, users: int, edge: bool, extra: str = NO_NAGLE
) -> ProsodyServer:
    return ProsodyServer(
        extra_config=extra,
        workdir=workdir,
        address=address,
        domain=DOMAIN,
        cert_path=certs / "imp1.pem",
        key_path=certs / "imp1.key",
        client_port=PROSODY_CLIENT_PORT,
        edge_port=PROSODY_EDGE_PORT if edge else None,
        users=[(user(i), PASSWORD) for i in range(users)],
    )


async def guarded(name: str, pairs: int, messages: int, run: Awaitable[RateRow]) -> RateRow:
    try:
        return await run
    except Exception as exc:  # one failed target still leaves the others' figures
        print(f"  {name}: FAILED {exc!r}", flush=True)
        return RateRow(name, pairs, messages, 0.0, False, {}, {}, note=f"failed: {exc!r}"[:120])


async def bench(
    args: argparse.Namespace, tmp: Path
) -> tuple[dict[str, int], list[SessionRow], list[RateRow]]:
    steps = sorted(args.sessions)
    bench_users = 2 * args.pairs
    b = args.block
    rates: list[RateRow] = []
    extra = [f"load.count={steps[-1] + bench_users}", "expc.zone.keepalive_timeout_s=60"]
    with running_lab(tmp / "lab", b, extra) as lab:
        e, imp = lab.config.expe[0], lab.config.imp[0]
        ca = lab.state_dir / "certs" / "ca.pem"
        ctx = client_context(ca)
        pids = await lab_pids(lab, ["expe", "expc", "imp1"])
        edge = Target("edge → mock IM&P", e.external_address, e.xmpp_port, ca, pids)
        print(f"sessions through E and C to the mock IM&P: {steps}", flush=True)
        idle, rows = await held_sessions(lab, edge, ctx, steps, args.login_concurrency)
        print("messages:", flush=True)
        base = steps[-1]
        rates.append(await guarded(edge.name, args.pairs, args.messages, message_rate(edge, ctx, args, base)))
        mock = Target("mock IM&P direct", imp.address, imp.client_port, ca, {"IM&P": pids["IM&P"]})
        rates.append(await guarded(mock.name, args.pairs, args.messages, message_rate(mock, ctx, args, base)))
        certs = lab.state_dir / "certs"
        for name, tuning in (("Prosody direct", NO_NAGLE), ("Prosody direct, Debian defaults", "")):
            workdir = tmp / f"prosody{len(rates)}"
            with prosody_for(workdir, f"127.{b}.9.30", certs, bench_users, False, tuning) as pros:
                direct = Target(name, pros.address, PROSODY_CLIENT_PORT, ca, {"Prosody": pros.pid})
                rates.append(
                    await guarded(name, args.pairs, args.messages, message_rate(direct, ctx, args, 0))
                )
    if args.edge_prosody:
        rates.append(
            await guarded("edge → Prosody", args.pairs, args.messages, edge_prosody(args, tmp, bench_users))
        )
    return idle, rows, rates


async def edge_prosody(args: argparse.Namespace, tmp: Path, users: int) -> RateRow:
    extra = [
        "imp.0.external=true",
        f"imp.0.edge_port={PROSODY_EDGE_PORT}",
        f"imp.0.client_port={PROSODY_CLIENT_PORT}",
        "expc.zone.keepalive_timeout_s=60",
    ]
    with running_lab(tmp / "lab2", args.block + 1, extra) as lab:
        e, imp = lab.config.expe[0], lab.config.imp[0]
        certs = lab.state_dir / "certs"
        ca = certs / "ca.pem"
        with prosody_for(tmp / "prosody2", imp.address, certs, users, edge=True) as pros:
            pids = {**await lab_pids(lab, ["expe", "expc"]), "Prosody": pros.pid}
            target = Target("edge → Prosody", e.external_address, e.xmpp_port, ca, pids)
            return await message_rate(target, client_context(ca), args, 0)


# -- report ----------------------------------------------------------------------------------------------


def report(idle: dict[str, int], rows: list[SessionRow], rates: list[RateRow]) -> str:
    out = ["", "## Held sessions through E → C → mock IM&P (VmRSS, MiB)", ""]
    names = list(idle)
    out.append("| sessions | " + " | ".join(names) + " | E+C+IM&P | KiB/session (E+C+IM&P) | logins/s |")
    out.append("|---:|" + "---:|" * (len(names) + 3))
    out.append(
        "| 0 (idle) | " + " | ".join(mib(idle[n]) for n in names) + f" | {mib(sum(idle.values()))} | | |"
    )
    for r in rows:
        per = (r.total - sum(idle.values())) / r.sessions / 1024
        cells = " | ".join(mib(r.rss[n]) for n in names)
        out.append(f"| {r.sessions} | {cells} | {mib(r.total)} | {per:.1f} | {r.login_rate:,.0f} |")
    if rows:
        last = rows[-1]
        per_b = (last.total - sum(idle.values())) / last.sessions
        projected = sum(idle.values()) + per_b * TARGET_SESSIONS
        verdict = "meets" if projected < GIB else "MISSES"
        out += [
            "",
            f"Target: {TARGET_SESSIONS:,} sessions through the edge in under 1 GiB RSS (E+C+IM&P). "
            f"Projected from {last.sessions} sessions: {mib(projected)} MiB → {verdict} the target.",
        ]
    out += ["", "## Lossless chat throughput (pairs × messages, window-limited)", ""]
    out.append(
        "| target | pairs × msgs | msg/s (median) | lossless | CPU ms / 1k msgs | server RSS MiB | note |"
    )
    out.append("|---|---:|---:|:---:|---|---|---|")
    for rate in rates:
        cpu = ", ".join(f"{k} {v * 1000:.0f}" for k, v in rate.cpu_per_kmsg.items())
        rss = ", ".join(f"{k} {mib(v)}" for k, v in rate.rss.items())
        ok = "yes" if rate.lossless else "NO"
        load = f"{rate.pairs} × {rate.messages}"
        out.append(f"| {rate.name} | {load} | {rate.rate:,.0f} | {ok} | {cpu} | {rss} | {rate.note} |")
    by = {r.name: r for r in rates}
    edge, prosody = by.get("edge → mock IM&P"), by.get("Prosody direct")
    if edge and prosody and prosody.rate > 0:
        ratio = edge.rate / prosody.rate
        verdict = "meets" if ratio >= TARGET_RATIO and edge.lossless else "MISSES"
        out += [
            "",
            f"Target: edge msg/s ≥ {TARGET_RATIO:.0%} of Prosody direct. Measured: {edge.rate:,.0f} / "
            f"{prosody.rate:,.0f} = {ratio:.0%} → {verdict} the target.",
        ]
    via = by.get("edge → Prosody")
    if via and prosody and prosody.rate > 0 and via.rate > 0:
        out.append(
            f"Same IM&P both ways: edge → Prosody / Prosody direct = {via.rate / prosody.rate:.0%} "
            "(the edge's own cost)."
        )
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", default="500,1000,2000", help="rising session counts, comma-separated")
    p.add_argument("--pairs", type=int, default=10, help="sender/receiver pairs for the message test")
    p.add_argument("--messages", type=int, default=2000, help="messages per pair (measured round)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per target (median shown)")
    p.add_argument("--window", type=int, default=50, help="max messages in flight per pair")
    p.add_argument("--block", type=int, default=201, help="loopback block 127.<block>.x.x (and +1)")
    p.add_argument("--login-concurrency", type=int, default=100)
    p.add_argument("--round-limit-s", type=float, default=120.0, help="time bound of one message round")
    p.add_argument("--time-limit-s", type=float, default=900.0, help="time bound of the whole run")
    p.add_argument("--no-edge-prosody", dest="edge_prosody", action="store_false")
    args = p.parse_args(argv)
    args.sessions = [int(x) for x in str(args.sessions).split(",") if x.strip()]
    if not args.sessions or min(args.sessions) <= 0 or max(args.sessions) > 20_000:
        p.error("--sessions: counts within 1..20000")
    if not 1 <= args.rounds <= 20:
        p.error("--rounds within 1..20")
    if not 1 <= args.pairs <= 500 or not 1 <= args.messages <= 1_000_000 or args.window < 1:
        p.error("--pairs within 1..500, --messages within 1..1e6, --window ≥ 1")
    if not 20 <= args.block <= 250:
        p.error("--block within 20..250")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max(args.sessions) + 4 * args.pairs + 1024
    if soft < need:  # the labs inherit it through `edge lab up`
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xmpp-bench-") as tmp:

        async def run() -> tuple[dict[str, int], list[SessionRow], list[RateRow]]:
            return await asyncio.wait_for(bench(args, Path(tmp)), args.time_limit_s)

        idle, rows, rates = uvloop.run(run())
    print(report(idle, rows, rates))
    print(
        f"\n(sessions {args.sessions}, {args.pairs} pairs × {args.messages} msgs, window {args.window}, "
        f"{os.cpu_count()} CPUs, run took {time.monotonic() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
