"""SIP benchmark: REGISTER/s over TLS through E→C→UCM next to Kamailio, and held registrations.

    .venv/bin/python -m benchmarks.sip.run [--window-s 10] [--hold 1000,10000] [--no-profile]

1. Rate: sipp (`-t t1`, one TCP connection) → local stunnel4 client → TLS → target, one
   REGISTER per call from the load population (load00001…, CSFLOADnnnnn, Expires 120). The rate
   rises (x2, then two geometric refinements) until a window of `--window-s` seconds has a failed
   call, fewer than 95 % of the target rate completes, or the cap is hit; the result is the highest
   clean rate. The lab's REGISTERs carry the `sipRequest` Route from get_edge_config; Kamailio
   (in-memory registrar, TLS listener, same stunnel arrangement, 2 workers) gets the same messages
   without the Route.
2. Held registrations: for each N, a lab with `load.count=N`; sipp `-t tn` (one TLS flow per user
   through stunnel) registers N users, keeps refreshing every `--refresh-s` until past the
   sampling point, then unregisters. RSS of E+C+UCM (/proc/<pid>/status VmRSS) idle and once
   every binding was refreshed once (all N held).
3. Optionally py-spy on E, C and UCM during one window at the best rate: top functions by self time.

Everything runs on loopback in a temporary directory; every sipp run is bounded by its call
count and `-timeout`; every process is ours and is stopped by PID.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import BenchLab, cpu_seconds, machine_line, pss_kib, raise_fd_limit, rss_kib, table
from benchmarks.sip.tools import (
    KAMAILIO_NAME,
    Kamailio,
    LoadResult,
    SippLoad,
    parse_stats,
    pyspy_record,
    top_functions,
    write_users,
)
from tests.sip_tools import Stunnel, stop_process, wait_for

TARGET_SHARE = 0.5  # at least half of Kamailio's REGISTER/s
TARGET_RSS_KIB = 1024 * 1024  # 10,000 registrations held in under 1 GiB (E+C+UCM)
LAB_PROCS = ("expe", "expc", "ucm1")


@dataclass
class Step:
    result: LoadResult
    cpu: dict[str, float] = field(default_factory=dict)  # process → CPU % over the window

    def line(self) -> str:
        r = self.result
        cpu = " ".join(f"{k}={v:.0f}%" for k, v in self.cpu.items())
        verdict = "ok" if passes(r) else "FAIL"
        return (
            f"  -r {r.rate_target:>7.0f}: {r.successful:>7}/{r.calls:<7} ok, {r.failed} failed, "
            f"{r.achieved:>8.0f}/s in {r.elapsed_s:.1f} s, mean rtt {r.rtd_mean_ms:.1f} ms  {verdict}"
            + (f"  cpu {cpu}" if cpu else "")
        )


def passes(r: LoadResult) -> bool:
    return r.clean and r.achieved >= 0.95 * r.rate_target


@dataclass
class RateTarget:
    name: str
    remote: tuple[str, int]
    local_ip: str
    keys: dict[str, str]
    cpu_pids: dict[str, int]


def run_window(t: RateTarget, rate: float, window_s: float, users: Path, workdir: Path) -> Step:
    calls = max(1, int(rate * window_s))
    before = {k: cpu_seconds(p) for k, p in t.cpu_pids.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # sipp's CPU once it is reaped
    started = time.monotonic()
    result = (
        SippLoad(
            "register_rate.xml",
            remote=t.remote,
            local_ip=t.local_ip,
            workdir=workdir,
            users=users,
            transport="t1",
            rate=rate,
            calls=calls,
            limit=int(rate * 5) + 100,
            timeout_s=window_s * 3 + 20,
            keys=t.keys,
        )
        .start()
        .wait()
    )
    wall = time.monotonic() - started
    cpu = {k: 100 * (cpu_seconds(p) - before[k]) / wall for k, p in t.cpu_pids.items()}
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    sipp_s = reaped.ru_utime + reaped.ru_stime - children.ru_utime - children.ru_stime
    cpu["sipp"] = 100 * sipp_s / wall
    return Step(result, cpu)


def rate_search(
    t: RateTarget, args: argparse.Namespace, users: Path, workdir: Path, log: Callable[[str], None]
) -> tuple[Step | None, list[Step]]:
    steps: list[Step] = []
    best: Step | None = None
    fail_rate: float | None = None
    rate = float(args.start_rate)
    n = 0
    while rate <= args.max_rate and n < 12:
        n += 1
        step = run_window(t, rate, args.window_s, users, workdir / f"r{n:02d}")
        steps.append(step)
        log(step.line())
        if not passes(step.result):
            fail_rate = rate
            break
        best = step
        rate *= 2
    lo = best.result.rate_target if best else 0.0
    for _ in range(2):  # geometric refinement between the last clean and the first failing rate
        if fail_rate is None or lo == 0:
            break
        rate = round((lo * fail_rate) ** 0.5 / 50) * 50
        if rate <= lo or rate >= fail_rate:
            break
        n += 1
        step = run_window(t, rate, args.window_s, users, workdir / f"r{n:02d}")
        steps.append(step)
        log(step.line())
        if passes(step.result):
            best, lo = step, rate
        else:
            fail_rate = rate
    return best, steps


def _pid(st: Stunnel) -> int:
    assert st.proc is not None
    return st.proc.pid


@contextmanager
def stunnel_to(
    local_ip: str, remote: tuple[str, int], ca: Path, host: str, workdir: Path
) -> Iterator[Stunnel]:
    workdir.mkdir(parents=True, exist_ok=True)
    with Stunnel(local_ip=local_ip, connect=remote, ca_file=ca, check_host=host, workdir=workdir) as st:
        yield st


# -- held registrations ---------------------------------------------------------------------------


@dataclass
class Hold:
    n: int
    idle_kib: dict[str, int]
    held_kib: dict[str, int]
    peak_total_kib: int
    e_registrations: int
    e_flows: int
    ucm_current: int
    result: LoadResult | None
    ramp_s: float

    @property
    def idle_total(self) -> int:
        return sum(self.idle_kib.values())

    @property
    def held_total(self) -> int:
        return sum(self.held_kib.values())

    @property
    def per_reg_kib(self) -> float:
        return (self.held_total - self.idle_total) / self.n if self.n else 0.0


def _ucm_regs(lab: BenchLab) -> dict[str, int]:
    regs: dict[str, int] = lab.component("ucm1")["sip"]["registrations"]
    return regs


SHARD_USERS = 4000  # per stunnel + sipp pair: stunnel holds two fds per flow (fd limit here 20,000)


def hold_registrations(
    lab: BenchLab, n: int, args: argparse.Namespace, workdir: Path, log: Callable[[str], None]
) -> Hold:
    pids = {k: v for k, v in lab.pids().items() if k in LAB_PROCS}
    idle = {k: rss_kib(p) for k, p in pids.items()}
    route = lab.sip_route()
    workdir.mkdir(parents=True, exist_ok=True)
    shards = -(-n // SHARD_USERS)
    ramp_s = n / args.hold_rate
    refresh_ms = int(args.refresh_s * 1000)
    # Every user keeps refreshing until well past the sampling point (the last user's first
    # refresh, about ramp + refresh): UCM grants 120 s, so a binding refreshed only once expired
    # before RSS was sampled (a 10,000 run held only 5,953 then).
    rounds = math.ceil((ramp_s + args.refresh_s + 30) / args.refresh_s)
    hold_ms = 20_000  # after the last refresh, then unregister
    base = _ucm_regs(lab)
    peak = 0
    with ExitStack() as stack:
        sipps: list[SippLoad] = []
        for i in range(shards):
            first = i * SHARD_USERS + 1
            count = min(SHARD_USERS, n - i * SHARD_USERS)
            users = write_users(workdir / f"users{i}.csv", count, start=first)
            st = stack.enter_context(
                stunnel_to(
                    lab.ip(60 + 2 * i),
                    lab.listener("expe", "sip"),
                    lab.ca_file,
                    lab.config.expe[0].fqdn,
                    workdir / f"stunnel{i}",
                )
            )
            sipp = SippLoad(
                "register_hold.xml",
                remote=st.accept,
                local_ip=lab.ip(61 + 2 * i),
                workdir=workdir / f"sipp{i}",
                users=users,
                transport="tn",
                rate=args.hold_rate * count / n,
                calls=count,
                limit=count,
                timeout_s=ramp_s * 3 + rounds * args.refresh_s + hold_ms / 1000 + 60,
                keys={
                    "domain": lab.config.lab.domain,
                    "expires": str(args.expires),
                    "route": f"Route: {route}",
                },
                globals_={"refresh_ms": str(refresh_ms), "hold_ms": str(hold_ms), "refreshes": str(rounds)},
            )
            sipps.append(sipp)
            stack.callback(sipp.stop)
        for sipp in sipps:
            sipp.start()

        def sample() -> int:
            nonlocal peak
            total = sum(rss_kib(p) for p in pids.values())
            peak = max(peak, total)
            return total

        def failed_so_far() -> int:
            return sum(int(parse_stats(x.stat).get("FailedCall(C)", "0") or 0) for x in sipps)

        def registered() -> bool:
            sample()
            if not any(x.running() for x in sipps):
                raise RuntimeError(f"every sipp ended before {n} registrations: {[x.wait() for x in sipps]}")
            return _ucm_regs(lab)["current"] >= n - failed_so_far()

        t0 = time.monotonic()
        wait_for(registered, ramp_s * 3 + 30, f"{n} registrations at UCM", interval_s=1.0)
        log(f"  {_ucm_regs(lab)['current']} registered at UCM after {time.monotonic() - t0:.1f} s "
            f"({shards} stunnel+sipp pairs; {failed_so_far()} failed calls so far)")  # fmt: skip

        def refreshed() -> bool:
            sample()
            if time.monotonic() - t0 < ramp_s + args.refresh_s + 5:
                return False  # the last users have not had their first refresh yet
            return _ucm_regs(lab)["refreshes"] - base["refreshes"] >= n - failed_so_far()

        try:
            wait_for(refreshed, args.refresh_s + ramp_s + 60, f"{n} refreshes at UCM", interval_s=1.0)
        except AssertionError as exc:
            log(f"  {exc}: sampling anyway")
        held = {k: rss_kib(p) for k, p in pids.items()}
        peak = max(peak, sum(held.values()))
        ucm_now = _ucm_regs(lab)["current"]
        asked = time.monotonic()
        e = lab.component("expe")
        log(f"  UCM current {ucm_now}; E /status answered in {time.monotonic() - asked:.1f} s")
        if ucm_now < n - failed_so_far():
            log(f"  only {ucm_now} of {n} registrations held when RSS was sampled")
        refreshes = _ucm_regs(lab)["refreshes"] - base["refreshes"]
        log(f"  {refreshes} refreshes after {time.monotonic() - t0:.1f} s; sampled RSS")
        results = [sipp.wait() for sipp in sipps]
    merged = LoadResult(
        args.hold_rate,
        sum(r.calls for r in results),
        sum(r.successful for r in results),
        sum(r.failed for r in results),
        max(r.elapsed_s for r in results),
        max(r.rtd_mean_ms for r in results),
        max(r.returncode for r in results),
        "".join(r.errors_tail for r in results)[-2000:],
    )
    if not merged.clean:
        log(f"  sipp not clean: {merged}")
    return Hold(
        n,
        idle,
        held,
        peak,
        int(e["sip"]["registrations"]),
        int(e["sip"]["client_flows"]),
        ucm_now,
        merged,
        ramp_s,
    )


# -- profiling ------------------------------------------------------------------------------------


def profile(
    lab_pids: dict[str, int], t: RateTarget, rate: float, args: argparse.Namespace, users: Path, workdir: Path
) -> list[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    duration = int(min(args.window_s, 10))
    spies = {k: pyspy_record(p, workdir / f"{k}.txt", duration) for k, p in lab_pids.items()}
    step = run_window(t, rate, args.window_s, users, workdir / "sipp")
    for proc in spies.values():
        try:
            proc.wait(duration + 30)
        except Exception:
            stop_process(proc)
    lines = [f"py-spy ({duration} s at 200 Hz) during -r {rate:.0f}:", step.line()]
    for k in spies:
        samples, rows, inclusive = top_functions(workdir / f"{k}.txt")
        lines.append(f"  {k} ({samples} samples; self% / total%):")
        for fn, own, tot in rows:
            lines.append(f"    {own:5.1f}% {tot:5.1f}%  {fn}")
        lines.append(f"  {k}, project frames by inclusive time:")
        lines += [f"    {tot:5.1f}%  {fn}" for fn, tot in inclusive]
    return lines


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--window-s", type=float, default=10.0, help="length of each rate window")
    ap.add_argument("--start-rate", type=float, default=250.0)
    ap.add_argument("--max-rate", type=float, default=32000.0, help="cap of the rising rate")
    ap.add_argument("--users", type=int, default=1000, help="distinct users cycled by the rate test")
    ap.add_argument("--hold", default="1000,10000", help="comma-separated N of held registrations ('' skips)")
    ap.add_argument("--hold-rate", type=float, default=50.0, help="new TLS flows + REGISTERs per s")
    ap.add_argument("--refresh-s", type=float, default=90.0, help="re-REGISTER interval of held users")
    ap.add_argument("--expires", type=int, default=120)
    ap.add_argument("--no-kamailio", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    holds = [int(x) for x in args.hold.split(",") if x.strip()]
    fds = raise_fd_limit()

    def log(text: str) -> None:
        print(text, flush=True)

    log(f"# SIP benchmark; {machine_line()}; fd limit {fds}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-sip-"))
    rate_users = write_users(tmp / "rate-users.csv", args.users)
    kam_best: Step | None = None
    edge_best: Step | None = None
    kam_pss = 0
    hold_results: list[Hold] = []
    prof: list[str] = []

    if not args.no_kamailio:
        log("\n## Kamailio 5.6 registrar (TLS via stunnel, 2 workers), REGISTER rate, one connection")
        with ExitStack() as stack:
            kam = stack.enter_context(Kamailio(ip="127.0.0.1", workdir=tmp / "kamailio"))
            st = stack.enter_context(
                stunnel_to("127.0.0.1", (kam.ip, kam.tls_port), kam.cert, KAMAILIO_NAME, tmp / "kst")
            )
            # CPU of the main process and its workers (the busy one is the TCP reader of the flow).
            t = RateTarget(
                "kamailio",
                st.accept,
                "127.0.0.1",
                {"domain": "example.com", "expires": str(args.expires), "route": "X-Route-Preloaded: no"},
                {**{f"k{i}": p for i, p in enumerate(kam.pids())}, "stunnel": _pid(st)},
            )
            kam_best, _ = rate_search(t, args, rate_users, tmp / "kamailio-rate", log)
            kam_pss = sum(pss_kib(p) for p in kam.pids())

    first = holds[0] if holds else 0
    log(f"\n## Lab E->C->UCM (load.count={max(args.users, first)})")
    with BenchLab(tmp / "lab-a", f"load.count={max(args.users, first)}") as lab:
        wait_for(lambda: lab.component("expe")["sip"]["path_alive"], 30, "E: path to UCM alive")
        pids = {k: v for k, v in lab.pids().items() if k in LAB_PROCS}
        if first:
            log(f"### hold {first} registrations (tn through stunnel, refresh {args.refresh_s:.0f} s)")
            hold_results.append(hold_registrations(lab, first, args, tmp / f"hold{first}", log))
        log("### REGISTER rate, one connection, Route from get_edge_config")
        route = lab.sip_route()
        t = RateTarget(
            "edge",
            ("", 0),
            lab.ip(71),
            {"domain": lab.config.lab.domain, "expires": str(args.expires), "route": f"Route: {route}"},
            dict(pids),  # the rate windows also count stunnel and sipp
        )
        with stunnel_to(
            lab.ip(70), lab.listener("expe", "sip"), lab.ca_file, lab.config.expe[0].fqdn, tmp / "est"
        ) as st:
            t.remote = st.accept
            t.cpu_pids["stunnel"] = _pid(st)
            edge_best, _ = rate_search(t, args, rate_users, tmp / "edge-rate", log)
            if not args.no_profile:
                rate = edge_best.result.rate_target if edge_best else args.start_rate
                prof = profile(pids, t, rate, args, rate_users, tmp / "profile")
                for line in prof:
                    log(line)

    for n in holds[1:]:
        log(f"\n## Lab with load.count={n}: hold {n} registrations")
        with BenchLab(tmp / f"lab-{n}", f"load.count={n}") as lab:
            wait_for(lambda: lab.component("expe")["sip"]["path_alive"], 30, "E: path to UCM alive")
            hold_results.append(hold_registrations(lab, n, args, tmp / f"hold{n}", log))

    # -- summary --------------------------------------------------------------------------------
    log("\n## Summary")
    k_rate = kam_best.result.achieved if kam_best else 0.0
    e_rate = edge_best.result.achieved if edge_best else 0.0
    rows: list[list[object]] = [
        [
            "REGISTER/s, TLS, 1 conn, 0 failed",
            f"{e_rate:,.0f}" + (f" (-r {edge_best.result.rate_target:.0f})" if edge_best else ""),
            f"{k_rate:,.0f}" + (f" (-r {kam_best.result.rate_target:.0f})" if kam_best else ""),
            f">= {TARGET_SHARE * k_rate:,.0f}",
            "MET" if k_rate and e_rate >= TARGET_SHARE * k_rate else ("n/a" if not k_rate else "MISSED"),
        ]
    ]
    if kam_best:
        rows.append(["  mean response time at that rate", f"{edge_best.result.rtd_mean_ms:.1f} ms"
                     if edge_best else "-", f"{kam_best.result.rtd_mean_ms:.1f} ms", "", ""])  # fmt: skip
    for h in hold_results:
        ok = h.result is not None and h.result.clean
        rows.append(
            [
                f"{h.n:,} held regs: RSS E+C+UCM",
                f"{h.held_total / 1024:,.0f} MiB (idle {h.idle_total / 1024:,.0f})",
                f"(PSS {kam_pss / 1024:,.0f} MiB after rate test)" if kam_pss and h.n == first else "",
                "< 1024 MiB" if h.n >= 10000 else "",
                ("MET" if h.held_total < TARGET_RSS_KIB else "MISSED") if h.n >= 10000 else "",
            ]
        )
        rows.append([f"  RSS per registration (N={h.n:,})", f"{h.per_reg_kib:.1f} KiB", "", "", ""])
        held = ", ".join(f"{k} {v / 1024:.0f}" for k, v in h.held_kib.items())
        rows.append([f"  by process, MiB (peak total {h.peak_total_kib / 1024:.0f})", held, "", "", ""])
        res = h.result
        rows.append(
            [
                "  sipp: calls ok/failed; E regs/flows; UCM",
                f"{res.successful if res else '?'}/{res.failed if res else '?'}; "
                f"{h.e_registrations}/{h.e_flows}; {h.ucm_current}" + ("" if ok else " (NOT CLEAN)"),
                "",
                "",
                "",
            ]
        )
    log(table(["measure", "lab E->C->UCM", "Kamailio 5.6", "target", "verdict"], rows))
    if args.keep:
        log(f"(artifacts kept in {tmp})")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
