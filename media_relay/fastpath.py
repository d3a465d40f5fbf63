"""The relay's native fast path: ``_fastpath.Forwarder`` mirrors the table's established flows.

The Python ``RelayTable`` stays authoritative for *what* is relayed: it latches, drops strangers
and garbage, and owns every counter. Once an endpoint has a remote address (fixed, or latched)
and its peer has a route, ``FlowSync`` installs a *flow* for it in the native forwarder (key:
local port, source address and port; egress socket and destination for RTP and for RTCP). From
then on the forwarder relays that source's valid packets with recvmmsg/sendmmsg, runs the same
RFC 3550 estimators as ``StreamStats`` and counts; everything else comes back to the table.

On C the endpoint's transcoder (``srtp.SrtpTranscoder``) goes with the flow when it is native
(``SrtpTranscoder.native``: a ``_fastpath.Transcoder`` over libsrtp sessions that Python's
``SrtpContext`` uses as well): the forwarder unprotects/protects in C, counts a refused packet
as the table's ``transcode_drops`` and its authentication failures in the transcoder itself.
Python and C share those sessions, so the SRTP rollover counter and replay window are one state
per SSRC whichever path a packet takes (a leg's first packets go through Python, the rest
through C). A pylibsrtp-backed transcoder (extension built without libsrtp2) keeps its endpoint
on the Python path.

While a flow is installed the forwarder is authoritative for its endpoint's rx counters and
``transcode_drops``, the tx counters it credits to the peer endpoints, ``stream.last_seen`` and
the endpoint's ``StreamStats``. They are folded back lazily, so that no periodic O(flows) copy
stalls the event loop: ``flush()`` copies them (counter deltas; a state copy of the receiver
statistics) and the worker calls it before every snapshot and ``totals()``, and a flow's own
numbers are folded when it is removed. For inactivity the worker asks only for the
``last_seen`` of streams the table would time out (``refresh_idle``).

``available()`` is False when the extension is not built (``pip install -e .`` without a C
compiler) or ``EDGE_MEDIA_FASTPATH=0``; the worker then runs the pure-Python path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from media_relay.rtp import StatsState
from media_relay.table import Addr, Endpoint, RelayTable, Stream

if TYPE_CHECKING:
    from media_relay._fastpath import FlushItem, Forwarder
    from media_relay._fastpath import Transcoder as NativeTranscoder
    from media_relay.kernel import Egress, KernelCounters, KernelForwarder
    from media_relay.kernel_srtp import SrtpCounters, SrtpKernel, SrtpSide
    from media_relay.srtp import SrtpContext

try:
    from media_relay import _fastpath
except ImportError:  # not built: the pure-Python path
    _fastpath = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

ENV_VAR = "EDGE_MEDIA_FASTPATH"
URING_ENV_VAR = "EDGE_MEDIA_URING"
HELPER_ENV_VAR = "EDGE_MEDIA_HELPER"  # "1": an io_uring relay lends sends to a second thread when saturated
HELPER_OFF, HELPER_ELASTIC, HELPER_ALWAYS = 0, 1, 2  # Forwarder(helper=), see _helper.h

# (local_port, src_host, src_port, is_rtcp_port, rtp_fd, rtp_dst, rtcp_fd, rtcp_dst, transcoder)
FlowSpec = tuple[int, str, int, bool, int, Addr | None, int, Addr | None, "NativeTranscoder | None"]
_NO_ROUTE: tuple[int, Addr | None] = (-1, None)


def built() -> bool:
    """The extension is importable."""
    return _fastpath is not None


def _switched_off(var: str) -> bool:
    return os.environ.get(var, "1").strip() in ("0", "false", "no", "off")


def available() -> bool:
    """The extension is built and not switched off by ``EDGE_MEDIA_FASTPATH=0``."""
    return _fastpath is not None and not _switched_off(ENV_VAR)


def native_srtp() -> bool:
    """The extension has C's SRTP transcoding (built with libsrtp2) and is not switched off."""
    return available() and bool(getattr(_fastpath, "HAVE_SRTP", 0))


def srtp_primitives() -> str | None:
    """Whose AES/SHA-1 the native SRTP uses (``openssl`` or ``libsrtp``), None without it."""
    if not native_srtp():
        return None
    return str(getattr(_fastpath, "SRTP_PRIMITIVES", "libsrtp"))


def shard_of(shards: list[Forwarder], port: int) -> Forwarder:
    """The forwarder of a worker's ``shards`` that reads ``port`` (an RTP/RTCP pair stays
    together)."""
    return shards[(port // 2) % len(shards)]


def uring_wanted() -> bool:
    """A worker read from the event loop uses the io_uring backend unless ``EDGE_MEDIA_URING=0``
    (epoll); where the kernel refuses io_uring (too old, sysctl, a seccomp filter) the worker
    falls back to epoll by itself."""
    return not _switched_off(URING_ENV_VAR)


_URING_REFUSAL: list[str | None] = []


def uring_refusal() -> str | None:
    """Why this kernel refuses the forwarder's io_uring (an ``OSError`` text), or None if it
    accepts it; probed once per process with a small ring."""
    if not _URING_REFUSAL:
        try:
            new_forwarder(uring=True, buffers=16).close()
            _URING_REFUSAL.append(None)
        except (OSError, RuntimeError) as exc:
            _URING_REFUSAL.append(str(exc) or type(exc).__name__)
    return _URING_REFUSAL[0]


def helper_wanted() -> bool:
    """``EDGE_MEDIA_HELPER=1``: an io_uring worker starts a send helper (``_helper.h``: a second
    thread that sends half of the flows' datagrams, from another core, while the relay is
    saturated). Off by default, and on a one-CPU machine."""
    value = os.environ.get(HELPER_ENV_VAR, "0").strip().lower()
    return value in ("1", "true", "yes", "on") and (os.cpu_count() or 1) > 1


def new_forwarder(
    uring: bool = False, buffers: int = 1024, helper: int = HELPER_OFF, share: int = 2
) -> Forwarder:
    """A forwarder on epoll + recvmmsg/sendmmsg, or with ``uring`` on io_uring (multishot receives
    into ``buffers`` provided buffers of 2 KiB, one submission for a turn's sends); OSError when
    the kernel refuses io_uring. ``helper`` (io_uring only): HELPER_ELASTIC starts the send
    helper, which takes the sends of ``share`` quarters of the flows while the forwarder is
    behind; HELPER_ALWAYS makes it take them all the time (tests)."""
    if _fastpath is None:
        raise RuntimeError("media_relay._fastpath is not built (pip install -e . with gcc and python3-dev)")
    if not uring:
        return _fastpath.Forwarder()
    return _fastpath.Forwarder(uring=True, buffers=buffers, helper=helper, helper_share=share)


class _Flow:
    __slots__ = (
        "ep", "extra", "folded", "forwarder", "kbase", "kernel_key", "key", "ports", "rtcp_out", "rtp_out",
        "spec", "srtp", "srtp_folded", "written",
    )  # fmt: skip

    def __init__(
        self,
        key: int,
        ep: Endpoint,
        spec: FlowSpec,
        ports: tuple[int, ...],
        kernel_key: bytes | None = None,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.key = key  # the forwarder's; -1 for a kernel flow
        self.forwarder = forwarder  # the shard that holds it (None: the kernel)
        self.kernel_key = kernel_key
        self.folded: KernelCounters | None = None  # a kernel flow's counters at the last fold
        # C: a kernel SRTP flow (kernel_srtp.py) and its counters at the last fold
        self.srtp = False
        self.srtp_folded: SrtpCounters | None = None
        # A kernel flow's receiver state as installed, as last folded into the table, and what
        # the table counted itself since the install (RTP packets, bytes, received): see
        # FlowSync._fold_counters.
        self.kbase: StatsState | None = None
        self.written: StatsState | None = None
        self.extra = (0, 0, 0)
        self.ep = ep
        self.spec = spec
        self.ports = ports
        # Where the table credits tx for this ingress endpoint's packets (fixed for a stream).
        self.rtp_out = ep.peer_rtp
        self.rtcp_out = ep.peer_rtcp


class FlowSync:
    """Keeps ``forwarder``'s flows equal to what the table would do for each endpoint.

    ``fd_of(port)`` is the fd of a local port the forwarder may read from and send through (an
    IPv4 socket registered with it), or None. With ``kernel`` (``media_relay.kernel``; plain
    relaying only, i.e. E) a flow whose addresses are all on loopback goes to the kernel instead
    of the forwarder; ``local_of(port)`` is the local address of such a port. With
    ``srtp_kernel`` (``media_relay.kernel_srtp``, C) a transcoding flow on loopback whose
    suites the kernel program has goes there, its SRTP index carried over from libsrtp's.
    """

    def __init__(
        self,
        forwarder: Forwarder,
        table: RelayTable,
        fd_of: Callable[[int], int | None],
        kernel: KernelForwarder | None = None,
        local_of: Callable[[int], Addr | None] | None = None,
        shards: list[Forwarder] | None = None,
        srtp_kernel: SrtpKernel | None = None,
        on_waiting: Callable[[], object] | None = None,
    ) -> None:
        # A flow goes to the shard that reads its ingress port (``shard_of``); ``forwarder``
        # alone is the one shard.
        self._shards = shards if shards else [forwarder]
        self.table = table
        self.kernel = kernel
        self.srtp_kernel = srtp_kernel
        # C: native flows that go to the kernel once their SSRC is known (a leg set up from SDP
        # is installed before its first packet); ``on_waiting`` is told when one is added, and
        # ``flush`` moves them (the worker calls it soon after).
        self._srtp_waiting: set[Endpoint] = set()
        self._on_waiting = on_waiting
        self._fd_of = fd_of
        self._local_of = local_of
        self._flows: dict[Endpoint, _Flow] = {}
        self._kernel_flows: set[_Flow] = set()
        self._by_key: dict[int, _Flow] = {}
        self._by_port: dict[int, set[Endpoint]] = {}

    def __len__(self) -> int:
        return len(self._flows)

    @property
    def kernel_flows(self) -> int:
        return len(self._kernel_flows)

    @property
    def waiting(self) -> int:
        """Native flows waiting for an SSRC to move into the kernel (C)."""
        return len(self._srtp_waiting)

    # -- keeping flows in step ---------------------------------------------------------------------

    def sync(self, streams: Iterable[Stream]) -> None:
        """Re-derive the flows of ``streams`` (changed: latched, re-pointed, added, removed)."""
        table = self.table
        for stream in streams:
            live = stream.stream_id in table and table.get_stream(stream.stream_id) is stream
            for ep in stream.endpoints():
                want = self._wanted(ep) if live else None
                flow = self._flows.get(ep)
                if flow is not None:
                    if flow.spec == want:
                        continue
                    self._remove(flow)
                if want is not None:
                    self._install(ep, want)

    def drop_stream(self, stream: Stream) -> None:
        """Before the table forgets ``stream``: fold its flows' counters back and remove them."""
        for ep in stream.endpoints():
            flow = self._flows.get(ep)
            if flow is not None:
                self._remove(flow)

    def drop_detached(self) -> None:
        """Remove the flows of streams the table no longer has (timed out)."""
        table = self.table
        for flow in [f for f in self._flows.values() if f.ep.stream.stream_id not in table]:
            self._remove(flow)

    def drop_port(self, port: int) -> None:
        """Before a local port closes: remove every flow reading from or sending through it."""
        for ep in list(self._by_port.get(port, ())):
            self._remove(self._flows[ep])

    def flush(self) -> None:
        """Copy counters and receiver state of every flow that changed since the last flush."""
        by_key = self._by_key
        for shard in self._shards:
            for item in shard.flush():
                _apply(by_key[item[0]], item)
        if self._kernel_flows:
            plain = self.kernel.read_all() if self.kernel is not None else {}  # one pass a map
            srtp = self.srtp_kernel.read_all() if self.srtp_kernel is not None else {}
            moved: list[_Flow] = []
            for flow in self._kernel_flows:
                assert flow.kernel_key is not None
                if flow.srtp:
                    now_srtp = srtp.get(flow.kernel_key)
                    if now_srtp is not None and not self._fold_srtp(flow, now_srtp) and _new_ssrc(flow):
                        moved.append(flow)
                    continue
                now = plain.get(flow.kernel_key)
                if now is not None:
                    self._fold_counters(flow, now)
            # The leg's source changed SSRC (the relay's path took the new one's packets) and the
            # kernel's has gone quiet: the kernel flow follows the new SSRC.
            for flow in moved:
                self._remove(flow)
                self._install(flow.ep, flow.spec)
        for ep in [ep for ep in self._srtp_waiting if ep.stats.ssrc is not None]:
            self._srtp_waiting.discard(ep)
            waiting = self._flows.get(ep)
            if waiting is not None and waiting.kernel_key is None:
                self._remove(waiting)  # folds the forwarder's last counters in
                self._install(ep, waiting.spec)

    def refresh_idle(self, streams: Iterable[Stream], now: float) -> None:
        """Before the table's inactivity check: ``last_seen`` of ``streams`` (those it would time
        out by its own numbers) from their flows; the flows of a stream still idle then are
        removed with their counters folded in, since the table is about to retire it."""
        for stream in streams:
            flows = [f for f in map(self._flows.get, stream.endpoints()) if f is not None]
            for flow in flows:
                if flow.forwarder is None:
                    seen = self._kernel_seen(flow)
                else:
                    seen = flow.forwarder.last_seen(flow.key)
                if seen > stream.last_seen:
                    stream.last_seen = seen
            timeout = stream.inactivity_timeout_s
            if timeout is not None and stream.last_seen + timeout <= now:
                for flow in flows:
                    self._remove(flow)

    def close(self) -> None:
        for flow in list(self._flows.values()):
            self._remove(flow)

    # -- internals ---------------------------------------------------------------------------------

    def _wanted(self, ep: Endpoint) -> FlowSpec | None:
        """The flow the table's ``receive_datagram`` amounts to for ``ep``, if it can be native."""
        remote = ep.remote
        if remote is None or self._fd_of(ep.local_port) is None:
            return None
        transcoder: NativeTranscoder | None = None
        if ep.transcoder is not None:  # C: only a libsrtp-backed transcoder can go native
            transcoder = getattr(ep.transcoder, "native", None)
            if transcoder is None:
                return None
        rtp = _NO_ROUTE if ep.is_rtcp_port else self._egress(ep.peer_rtp)
        rtcp = self._egress(ep.peer_rtcp)
        # The RTP route must exist (else the table counts not_latched drops and, for RTP, would
        # also feed StreamStats, which the forwarder owns while installed). A missing RTCP route
        # on a muxed port just sends those packets to the table.
        if (rtcp if ep.is_rtcp_port else rtp)[1] is None:
            return None
        return (
            ep.local_port,
            remote[0],
            remote[1],
            ep.is_rtcp_port,
            rtp[0],
            rtp[1],
            rtcp[0],
            rtcp[1],
            transcoder,
        )

    def _egress(self, out: Endpoint) -> tuple[int, Addr | None]:
        route = out.route
        if route is None:
            return _NO_ROUTE
        fd = self._fd_of(route[0])
        return _NO_ROUTE if fd is None else (fd, route[1])

    def _install(self, ep: Endpoint, spec: FlowSpec) -> None:
        ports = {ep.local_port}
        for fd, out in ((spec[4], ep.peer_rtp), (spec[6], ep.peer_rtcp)):
            if fd >= 0 and out.route is not None:
                ports.add(out.route[0])
        kernel_key = None
        if spec[8] is None and self.kernel is not None:
            kernel_key = self._install_kernel(ep, spec)
        elif spec[8] is not None and self.srtp_kernel is not None:
            kernel_key = self._install_srtp_kernel(ep, spec)
        if kernel_key is not None:
            flow = _Flow(-1, ep, spec, tuple(ports), kernel_key)
            flow.srtp = spec[8] is not None
            flow.kbase = flow.written = ep.stats.get_state()  # what _install_kernel gave the kernel
            self._kernel_flows.add(flow)
        else:
            shard = shard_of(self._shards, ep.local_port)
            try:
                key = shard.install(*spec[:8], ep.stats.clock_rate, ep.stats.get_state(), transcoder=spec[8])
            except (ValueError, OverflowError) as exc:  # e.g. an IPv6 or hostname destination
                log.debug(
                    "stream %s port %d stays on the Python path: %s", ep.stream.stream_id, ep.local_port, exc
                )
                return
            flow = _Flow(key, ep, spec, tuple(ports), forwarder=shard)
            self._by_key[key] = flow
            if spec[8] is not None and self.srtp_kernel is not None and not spec[3] and ep.stats.ssrc is None:
                self._srtp_waiting.add(ep)
                if self._on_waiting is not None:
                    self._on_waiting()
        self._flows[ep] = flow
        for port in ports:
            self._by_port.setdefault(port, set()).add(ep)

    def _install_kernel(self, ep: Endpoint, spec: FlowSpec) -> bytes | None:
        """Install ``ep``'s flow in the kernel; None when it cannot go there (the forwarder
        takes it): an address off loopback, a port without a local address, a full map."""
        assert self.kernel is not None and self._local_of is not None
        local = self._local_of(ep.local_port)
        legs: list[Egress | None] = []
        for out, dst in ((ep.peer_rtp, spec[5]), (ep.peer_rtcp, spec[7])):
            route = out.route
            source = None if route is None or dst is None else self._local_of(route[0])
            legs.append(None if source is None or dst is None else (source, dst))
        if spec[3]:  # an RTCP port forwards RTCP only
            legs[0] = None
        if local is None:
            return None
        try:
            return self.kernel.install(
                local,
                (spec[1], spec[2]),
                spec[3],
                legs[0],
                legs[1],
                ep.stats.clock_rate,
                ep.stats.get_state(),
            )
        except (ValueError, OSError) as exc:
            log.debug("stream %s port %d not in the kernel: %s", ep.stream.stream_id, ep.local_port, exc)
            return None

    def _install_srtp_kernel(self, ep: Endpoint, spec: FlowSpec) -> bytes | None:
        """Install ``ep``'s transcoding flow in the kernel (C); None when it cannot go there
        (the forwarder takes it): an RTCP port, an address off loopback, a suite the program
        lacks, no SSRC seen yet (``_srtp_waiting``), a full map."""
        from media_relay.kernel_srtp import SUITES, SrtpSide

        assert self.srtp_kernel is not None and self._local_of is not None
        route = ep.peer_rtp.route
        if spec[3] or spec[5] is None or route is None:
            return None
        local, source = self._local_of(ep.local_port), self._local_of(route[0])
        state = ep.stats.get_state()
        ssrc = state[3]
        contexts: list[SrtpContext | None] = [
            getattr(ep.transcoder, "inbound", None),
            getattr(ep.transcoder, "outbound", None),
        ]
        if local is None or source is None or ssrc is None:
            return None
        sides: list[SrtpSide | None] = []
        for ctx in contexts:
            if ctx is None:
                sides.append(None)
                continue
            if ctx.suite not in SUITES or ctx.native is None:
                return None
            roc = ctx.native.roc(ssrc)
            left = ctx.kernel_roc.get(ssrc)  # where an earlier kernel flow took it
            if left is not None:
                roc = left if roc is None else max(roc, left)
            sides.append(SrtpSide(ctx.suite, ctx.key_salt, roc or 0, state[6] & 0xFFFF, roc is None))
        if sides[0] is None and sides[1] is None:
            return None
        try:
            return self.srtp_kernel.install(
                local,
                (spec[1], spec[2]),
                (source, spec[5]),
                ssrc,
                ep.stats.clock_rate,
                state,
                sides[0],
                sides[1],
            )
        except (ValueError, OSError) as exc:
            log.debug(
                "stream %s port %d: SRTP not in the kernel: %s", ep.stream.stream_id, ep.local_port, exc
            )
            return None

    def _kernel_seen(self, flow: _Flow) -> float:
        assert flow.kernel_key is not None
        if flow.srtp:
            assert self.srtp_kernel is not None
            srtp = self.srtp_kernel.read(flow.kernel_key)
            return -1.0 if srtp is None or srtp.last_seen is None else srtp.last_seen
        assert self.kernel is not None
        now = self.kernel.read(flow.kernel_key)
        return -1.0 if now is None or now[6] is None else now[6]

    @staticmethod
    def _fold_srtp(flow: _Flow, now: SrtpCounters) -> bool:
        """Fold a kernel SRTP flow's counters since the last fold into the table (refused
        packets as transcode drops and the transcoder's authentication failures); False when
        the kernel counted nothing since."""
        before = flow.srtp_folded
        flow.srtp_folded = now
        fields = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "auth_drops", "replay_drops")
        d = [getattr(now, f) - (0 if before is None else getattr(before, f)) for f in fields]
        if before is not None and not any(d):
            return False
        refused = d[4] + d[5]
        if refused:
            count = getattr(flow.ep.transcoder, "count_auth_failures", None)
            if count is not None:
                count(refused)
        last_seen = now.last_seen if now.last_seen is not None else -1.0
        state = FlowSync._kernel_state(flow, now.stats)
        _apply(flow, (-1, d[0], d[1], d[2], d[3], 0, 0, last_seen, state, refused))
        return True

    def _return_srtp_index(self, flow: _Flow, last: SrtpCounters) -> None:
        """A kernel SRTP flow leaves the kernel: libsrtp's ROC for its SSRC catches up with the
        kernel's, so packets that now take the native or Python path get the right index (the
        SSRC the flow was installed for: the leg may have seen another since)."""
        ssrc = flow.kbase[3] if flow.kbase is not None else flow.ep.stats.ssrc
        if ssrc is None:
            return
        for ctx, (roc, _seq, fresh) in zip(
            (getattr(flow.ep.transcoder, "inbound", None), getattr(flow.ep.transcoder, "outbound", None)),
            last.index,
            strict=True,
        ):
            native = None if ctx is None else ctx.native
            if ctx is None or native is None or fresh:
                continue
            ctx.kernel_roc[ssrc] = roc
            if native.roc(ssrc) not in (None, roc):
                native.set_roc(ssrc, roc)

    @staticmethod
    def _fold_counters(flow: _Flow, now: KernelCounters) -> None:
        """Fold a kernel flow's counters since the last fold into the table."""
        before = flow.folded
        flow.folded = now
        old = (0, 0, 0, 0, 0, 0) if before is None else before[:6]
        d = [a - b for a, b in zip(now[:6], old, strict=True)]
        if before is not None and not any(d):
            return
        last_seen = now[6] if now[6] is not None else -1.0
        state = FlowSync._kernel_state(flow, now[7])
        _apply(flow, (-1, d[0], d[1], d[2], d[3], d[4], d[5], last_seen, state, 0))

    @staticmethod
    def _kernel_state(flow: _Flow, kernel: StatsState) -> StatsState:
        """The receiver state to fold back: the kernel's, plus what the table counted itself.

        Datagrams that already waited at the socket when the flow moved into the kernel reach
        the table afterwards (a read takes at most so many per socket) and update its state;
        the kernel's copy, which started from the state at the move, never saw them. They are
        older than anything the kernel counted, so they add to its packets, bytes and received
        and leave its sequence bounds alone; until the kernel has counted an RTP packet, the
        table's state is the whole story."""
        cur = flow.ep.stats.get_state()
        written, base, extra = flow.written, flow.kbase, flow.extra
        if written is not None and cur != written:
            extra = (
                extra[0] + cur[0] - written[0],
                extra[1] + cur[1] - written[1],
                extra[2] + cur[4] - written[4],
            )
            flow.extra = extra
        if base is not None and kernel[4] == base[4]:
            state = cur
        else:
            counted = (kernel[0] + extra[0], kernel[1] + extra[1], kernel[2], kernel[3], kernel[4] + extra[2])
            state = (*counted, *kernel[5:])
        flow.written = state
        return state

    def _remove(self, flow: _Flow) -> None:
        if flow.kernel_key is not None and flow.srtp:
            assert self.srtp_kernel is not None
            srtp = self.srtp_kernel.remove(flow.kernel_key)
            if srtp is not None:
                self._fold_srtp(flow, srtp)
                self._return_srtp_index(flow, srtp)
            self._kernel_flows.discard(flow)
        elif flow.kernel_key is not None:
            assert self.kernel is not None
            last = self.kernel.remove(flow.kernel_key)
            if last is not None:
                self._fold_counters(flow, last)
            self._kernel_flows.discard(flow)
        else:
            assert flow.forwarder is not None
            item = flow.forwarder.remove(flow.key)
            if item is not None:
                _apply(flow, item)
            del self._by_key[flow.key]
        del self._flows[flow.ep]
        self._srtp_waiting.discard(flow.ep)
        for port in flow.ports:
            eps = self._by_port[port]
            eps.discard(flow.ep)
            if not eps:
                del self._by_port[port]


def _new_ssrc(flow: _Flow) -> bool:
    """The leg's latest SSRC is not the one its kernel flow was installed for."""
    installed = None if flow.kbase is None else flow.kbase[3]
    return flow.ep.stats.ssrc is not None and installed is not None and flow.ep.stats.ssrc != installed


def _apply(flow: _Flow, item: FlushItem) -> None:
    _key, rx_packets, rx_bytes, rtp_packets, rtp_bytes, rtcp_packets, rtcp_bytes, last_seen, state, drops = (
        item
    )
    ep = flow.ep
    ep.rx_packets += rx_packets
    ep.rx_bytes += rx_bytes
    ep.transcode_drops += drops
    flow.rtp_out.tx_packets += rtp_packets
    flow.rtp_out.tx_bytes += rtp_bytes
    flow.rtcp_out.tx_packets += rtcp_packets
    flow.rtcp_out.tx_bytes += rtcp_bytes
    stream = ep.stream
    if last_seen > stream.last_seen:  # signalling may have touched it more recently (an answer)
        stream.last_seen = last_seen
    ep.stats.set_state(state)
