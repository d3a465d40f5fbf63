"""In-process cost of one REGISTER through the three SIP hops, without sockets or TLS.

    .venv/bin/python -m benchmarks.sip.hops [--count 20000] [--profile E|C|UCM|all]
    .venv/bin/python -m benchmarks.sip.hops --count 200 --stage c_request --replays 3
    .venv/bin/python -m benchmarks.sip.hops --slow      # the full parser at every hop (no fast path)

The real handlers run on real bytes: E's client-side handler (Expressway-E), C's zone handler,
the mock UCM's core, then the 200 OK back through C and E. Between hops each message is
serialized and framed again by a StreamFramer with the validation level that hop uses in the
lab, so codec, framing and routing logic are all in the figure; only sockets, TLS and the event
loop are not. E and C get each message as SipFlow hands it over: their byte-level fast path
first (edge.sip.fastpath), the full parser when it declines (always with `--slow`). Flows are
small fakes that record what would be written. Prints µs per REGISTER for each hop (CPU time of
this thread, request + response), and with `--profile` the top functions by own time (cProfile).
`--stage` replays one step alone on the inputs a full pass recorded: run it under `valgrind
--tool=callgrind` with two `--replays` values and divide the difference for a deterministic
instruction count per message (wall time on a shared machine is not)."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edge.config import LabConfig, load_config  # noqa: E402
from edge.sip.events import MessageFramed, MessageReceived  # noqa: E402
from edge.sip.framing import StreamFramer  # noqa: E402
from edge.sip.message import Request, Response, Validation  # noqa: E402
from mock_ucm.sip.calls import LocalNode  # noqa: E402
from mock_ucm.sip.core import UcmSipCore  # noqa: E402
from mock_ucm.sip.events import OutgoingResponse  # noqa: E402
from tests.sip_tools import CLIENT, wire_edge  # noqa: E402


def register(i: int, domain: str, route: str) -> bytes:
    """The benchmark's REGISTER (benchmarks/sip/register_rate.xml) for user i."""
    dn = 20000 + i
    return (
        f"REGISTER sip:{domain} SIP/2.0\r\n"
        f"Via: SIP/2.0/TLS {CLIENT[0]}:{CLIENT[1]};branch=z9hG4bK-{i}-1-0;rport\r\n"
        f"Route: {route}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{dn}@{domain}>;tag={i}SIPpTag001\r\n"
        f"To: <sip:{dn}@{domain}>\r\n"
        f"Call-ID: {i}-4242@{CLIENT[0]}\r\n"
        "CSeq: 1 REGISTER\r\n"
        f"Contact: <sip:{dn}@{CLIENT[0]}:{CLIENT[1]};transport=tls>"
        f';+sip.instance="<urn:uuid:00000000-0000-4000-8000-{i:012d}>"'
        f';+u.sip!devicename.ccm.cisco.com="CSFLOAD{i:05d}";+u.sip!model.ccm.cisco.com="503"'
        ";x-cisco-mra-ha=AR_SK\r\n"
        "Expires: 120\r\n"
        "Supported: X-cisco-supports-AR_SK, path\r\n"
        "User-Agent: sipp MRA benchmark\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def frame(framer: StreamFramer, data: bytes) -> Request | Response:
    (event,) = framer.receive_data(data)
    assert isinstance(event, MessageReceived), event
    return event.message


FastPath = Callable[[Any, MessageFramed], bool]
Handler = Callable[[Any, Request | Response], None]


class Chain:
    """E, C and UCM wired back to back through fake flows and real framers. Each hop gets its
    input as SipFlow.data_received hands it over: the hop's byte-level fast path first (unless
    `fast=False`), the full parser and handler if that declines."""

    def __init__(self, config: LabConfig, fast: bool = True) -> None:
        self.fast = fast
        node = config.ucm[0]
        w = wire_edge(config)
        self.e, self.c, self.conn = w.e, w.c, w.conn
        self.client, self.e_zone, self.c_zone, self.c_ucm = w.client, w.e_zone, w.c_zone, w.c_ucm
        local = LocalNode(node.name, node.address, config.lab.domain, node.sip_tcp_port, node.sip_tls_port)
        self.core = UcmSipCore(config, node, local, echo_ports=_NoEcho(), digest_secret=b"x" * 32)
        # Validation as in the lab: E checks client input (PROXY), C trusts E and UCM (NONE),
        # UCM checks what a registrar needs (PROXY).
        # The hops' flows split heads for their fast paths (SipFlow does when given on_frame).
        self.f_e = StreamFramer(validation=Validation.PROXY, split_heads=fast)
        self.f_c_zone = StreamFramer(validation=Validation.NONE, split_heads=fast)
        self.f_ucm = StreamFramer(validation=Validation.PROXY, split_heads=fast)
        self.f_c_ucm = StreamFramer(validation=Validation.NONE, split_heads=fast)
        self.f_e_zone = StreamFramer(validation=Validation.NONE, split_heads=fast)
        self.f_client = StreamFramer(validation=Validation.NONE)
        self.now = 1000.0

    def _deliver(self, framer: StreamFramer, flow: Any, data: bytes, fast: FastPath, slow: Handler) -> None:
        (event,) = framer.receive_frames(data)
        assert isinstance(event, MessageFramed), event
        if self.fast and fast(flow, event):
            return
        parsed = framer.parse_frame(event)
        assert isinstance(parsed, MessageReceived), parsed
        slow(flow, parsed.message)

    def e_request(self, data: bytes) -> bytes:
        self._deliver(self.f_e, self.client, data, self.e.fast.client_frame, self.e._client_message)
        return self.e_zone.sent.pop()

    def c_request(self, data: bytes) -> bytes:
        self._deliver(
            self.f_c_zone,
            self.c_zone,
            data,
            self.c.fast.zone_frame,
            lambda _f, m: self.c._zone_message(self.conn, m),
        )
        return self.c_ucm.sent.pop()

    def ucm_request(self, data: bytes) -> bytes:
        """As mock_ucm/sip/service.py's flow: the REGISTER fast path first, else parse + core."""
        self.now += 0.0001
        if self.fast:
            (event,) = self.f_ucm.receive_frames(data)
            assert isinstance(event, MessageFramed), event
            answer = self.core.answer_register(event.data, event.head_end, 1, self.now, event.head)
            if answer is not None:
                return answer
            parsed = self.f_ucm.parse_frame(event)
            assert isinstance(parsed, MessageReceived), parsed
            message: Request | Response = parsed.message
        else:
            message = frame(self.f_ucm, data)
        outs = self.core.receive_message(message, 1, self.now)
        (out,) = outs
        assert isinstance(out, OutgoingResponse)
        return bytes(out.response)

    def c_response(self, data: bytes) -> bytes:
        self._deliver(self.f_c_ucm, self.c_ucm, data, self.c.fast.ucm_frame, self.c._ucm_message)
        return self.c_zone.sent.pop()

    def e_response(self, data: bytes) -> bytes:
        self._deliver(self.f_e_zone, self.e_zone, data, self.e.fast.zone_frame, self.e._zone_message)
        return self.client.sent.pop()


class _NoEcho:
    def open(self, session: object) -> int:
        return 0

    def close(self, session: object) -> None:
        pass


STAGES = ("e_request", "c_request", "ucm_request", "c_response", "e_response")
HOP_OF = {"e_request": "E", "e_response": "E", "c_request": "C", "c_response": "C", "ucm_request": "UCM"}


def run(
    chain: Chain,
    messages: list[bytes],
    timers: dict[str, float],
    prof: cProfile.Profile | None = None,
    hop: str = "",
) -> None:
    clock = time.thread_time  # CPU time of this thread: steadier than wall time on a shared machine
    for data in messages:
        for stage in STAGES:
            fn: Callable[[bytes], bytes] = getattr(chain, stage)
            profiled = prof is not None and hop in ("all", HOP_OF[stage])
            if profiled:
                prof.enable()  # type: ignore[union-attr]
            t0 = clock()
            data = fn(data)
            timers[stage] += clock() - t0
            if profiled:
                prof.disable()  # type: ignore[union-attr]
        assert data.startswith(b"SIP/2.0 200 "), data[:200]


def replay_stage(chain: Chain, messages: list[bytes], stage: str, replays: int = 1) -> int:
    """Run the whole chain once recording what `stage` receives, then that stage alone again
    on the same inputs (for instruction counts of one stage, e.g. under valgrind)."""
    inputs: list[bytes] = []
    for data in messages:
        for name in STAGES:
            if name == stage:
                inputs.append(data)
            data = getattr(chain, name)(data)
    fn: Callable[[bytes], bytes] = getattr(chain, stage)
    clock = time.thread_time
    best = float("inf")
    spent = 0.0
    for _ in range(replays):
        t0 = clock()
        for data in inputs:
            fn(data)
        took = clock() - t0
        spent += took
        best = min(best, took)
    done = max(1, len(inputs) * replays)
    # the best pass: the least disturbed by other processes on a shared machine
    print(
        f"{stage}: {spent / done * 1e6:.1f} us per message ({done} replayed), "
        f"best pass {best / max(1, len(inputs)) * 1e6:.1f} us"
    )
    return 0


def lab_config() -> LabConfig:
    return load_config(None, overrides=["lab.demo=false", "load.count=1000"], environ={})


async def main_async(args: argparse.Namespace) -> int:
    config = lab_config()
    chain = Chain(config, fast=not args.slow)
    e = config.expe[0]
    route = f"<sip:{config.expc.address}:{config.expc.sip_tls_port};transport=tls;zone-id=1;directed;lr>"
    users = 1000
    messages = [register(1 + i % users, config.lab.domain, route) for i in range(args.count)]
    assert e.external_address
    timers = dict.fromkeys(STAGES, 0.0)
    if args.stage:
        return replay_stage(chain, messages, args.stage, args.replays)
    run(chain, messages[: min(2000, len(messages))], dict.fromkeys(STAGES, 0.0))  # warm caches
    prof = cProfile.Profile() if args.profile else None
    run(chain, messages, timers, prof, args.profile or "")
    n = len(messages)
    hops: dict[str, float] = {}
    for stage, spent in timers.items():
        hops[HOP_OF[stage]] = hops.get(HOP_OF[stage], 0.0) + spent
    path = "full parser only (--slow)" if args.slow else "fast path where it applies"
    print(f"{n} REGISTERs through E -> C -> UCM -> C -> E in-process (no sockets, no TLS; {path}):")
    for stage in STAGES:
        print(f"  {stage:11s} {timers[stage] / n * 1e6:7.1f} us")
    print("  per hop:    " + "  ".join(f"{h} {t / n * 1e6:.1f} us" for h, t in hops.items()))
    print(f"  total      {sum(timers.values()) / n * 1e6:7.1f} us per REGISTER")
    if prof is not None:
        print("\ncProfile, top by own time (cProfile's overhead inflates absolute times):")
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--count", type=int, default=20000, help="REGISTERs to run (1,000 users cycled)")
    ap.add_argument(
        "--profile", choices=["E", "C", "UCM", "all"], help="cProfile that hop's stages of the measured run"
    )
    ap.add_argument("--top", type=int, default=30, help="rows of the profile")
    ap.add_argument("--stage", choices=STAGES, help="replay one stage alone (after one full pass)")
    ap.add_argument("--replays", type=int, default=1, help="how often --stage replays its inputs")
    ap.add_argument("--slow", action="store_true", help="no byte-level fast path: full parse at every hop")
    return asyncio.run(main_async(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
