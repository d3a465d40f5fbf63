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

from media_relay.table import Addr, Endpoint, RelayTable, Stream

if TYPE_CHECKING:
    from media_relay._fastpath import FlushItem, Forwarder
    from media_relay._fastpath import Transcoder as NativeTranscoder

try:
    from media_relay import _fastpath
except ImportError:  # not built: the pure-Python path
    _fastpath = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

ENV_VAR = "EDGE_MEDIA_FASTPATH"

# (local_port, src_host, src_port, is_rtcp_port, rtp_fd, rtp_dst, rtcp_fd, rtcp_dst, transcoder)
FlowSpec = tuple[int, str, int, bool, int, Addr | None, int, Addr | None, "NativeTranscoder | None"]
_NO_ROUTE: tuple[int, Addr | None] = (-1, None)


def built() -> bool:
    """The extension is importable."""
    return _fastpath is not None


def available() -> bool:
    """The extension is built and not switched off by ``EDGE_MEDIA_FASTPATH=0``."""
    return _fastpath is not None and os.environ.get(ENV_VAR, "1").strip() not in ("0", "false", "no", "off")


def native_srtp() -> bool:
    """The extension has C's SRTP transcoding (built with libsrtp2) and is not switched off."""
    return available() and bool(getattr(_fastpath, "HAVE_SRTP", 0))


def srtp_primitives() -> str | None:
    """Whose AES/SHA-1 the native SRTP uses (``openssl`` or ``libsrtp``), None without it."""
    if not native_srtp():
        return None
    return str(getattr(_fastpath, "SRTP_PRIMITIVES", "libsrtp"))


def new_forwarder() -> Forwarder:
    if _fastpath is None:
        raise RuntimeError("media_relay._fastpath is not built (pip install -e . with gcc and python3-dev)")
    return _fastpath.Forwarder()


class _Flow:
    __slots__ = ("ep", "key", "ports", "rtcp_out", "rtp_out", "spec")

    def __init__(self, key: int, ep: Endpoint, spec: FlowSpec, ports: tuple[int, ...]) -> None:
        self.key = key
        self.ep = ep
        self.spec = spec
        self.ports = ports
        # Where the table credits tx for this ingress endpoint's packets (fixed for a stream).
        self.rtp_out = ep.peer_rtp
        self.rtcp_out = ep.peer_rtcp


class FlowSync:
    """Keeps ``forwarder``'s flows equal to what the table would do for each endpoint.

    ``fd_of(port)`` is the fd of a local port the forwarder may read from and send through (an
    IPv4 socket registered with it), or None.
    """

    def __init__(self, forwarder: Forwarder, table: RelayTable, fd_of: Callable[[int], int | None]) -> None:
        self.forwarder = forwarder
        self.table = table
        self._fd_of = fd_of
        self._flows: dict[Endpoint, _Flow] = {}
        self._by_key: dict[int, _Flow] = {}
        self._by_port: dict[int, set[Endpoint]] = {}

    def __len__(self) -> int:
        return len(self._flows)

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
        for item in self.forwarder.flush():
            _apply(by_key[item[0]], item)

    def refresh_idle(self, streams: Iterable[Stream], now: float) -> None:
        """Before the table's inactivity check: ``last_seen`` of ``streams`` (those it would time
        out by its own numbers) from their flows; the flows of a stream still idle then are
        removed with their counters folded in, since the table is about to retire it."""
        forwarder = self.forwarder
        for stream in streams:
            flows = [f for f in map(self._flows.get, stream.endpoints()) if f is not None]
            for flow in flows:
                seen = forwarder.last_seen(flow.key)
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
        try:
            key = self.forwarder.install(
                *spec[:8], ep.stats.clock_rate, ep.stats.get_state(), transcoder=spec[8]
            )
        except (ValueError, OverflowError) as exc:  # e.g. an IPv6 or hostname destination
            log.debug(
                "stream %s port %d stays on the Python path: %s", ep.stream.stream_id, ep.local_port, exc
            )
            return
        ports = {ep.local_port}
        for fd, out in ((spec[4], ep.peer_rtp), (spec[6], ep.peer_rtcp)):
            if fd >= 0 and out.route is not None:
                ports.add(out.route[0])
        flow = _Flow(key, ep, spec, tuple(ports))
        self._flows[ep] = flow
        self._by_key[key] = flow
        for port in ports:
            self._by_port.setdefault(port, set()).add(ep)

    def _remove(self, flow: _Flow) -> None:
        item = self.forwarder.remove(flow.key)
        if item is not None:
            _apply(flow, item)
        del self._flows[flow.ep]
        del self._by_key[flow.key]
        for port in flow.ports:
            eps = self._by_port[port]
            eps.discard(flow.ep)
            if not eps:
                del self._by_port[port]


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
