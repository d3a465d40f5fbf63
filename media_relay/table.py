"""The relay's stream table: sans-IO, time as an argument (shared/STYLE.md §1-2).

An MRA call's media flows client <-> E <-> C <-> far end (spec §7). Each relayed stream has two
legs; a leg is either

* *dedicated*: its own local RTP/RTCP port pair (the client side of E, both sides of C), or
* *demuxed*: a remote (ip, port) on a shared local port pair (E's 2776/2777 towards C). E tells
  the C-side streams apart by C's source address, which C announced in SDP.

A latching leg learns its remote address from its first packet and, from then on, drops
packets from any other address; nothing is sent towards a leg before it has a remote address
(symmetric RTP: E sends to a client only after receiving from it, spec §7).

``RelayTable.receive_datagram`` is the per-packet hot path: two dict lookups, a few integer
checks, plain ``int`` counters, and a precomputed ``(egress port, destination)`` tuple returned
without allocating. Everything else (adding streams, timers, snapshots) is off the hot path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from media_relay.errors import PortsExhaustedError, TranscodeError
from media_relay.events import LegLatched, StreamTimedOut
from media_relay.rtp import RTCP_PT_MAX, RTCP_PT_MIN, RTP_HEADER_BYTES, StreamStats

Addr = tuple[str, int]
Route = tuple[int, Addr]

MAX_DATAGRAM_BYTES = 1500
_MIN_DATAGRAM_BYTES = 8  # an RTCP header; RTP needs 12


class PortAllocator:
    """Even/odd RTP/RTCP port pairs from ``[min_port, max_port]`` (spec §2: 36002-59999).

    Freed pairs go to the back of the queue so a just-closed port is not reused at once (late
    packets of the old stream would otherwise land in the new one).
    """

    def __init__(self, min_port: int, max_port: int) -> None:
        first = min_port + (min_port & 1)
        if not 0 < min_port <= max_port <= 65535 or first + 1 > max_port:
            raise ValueError(f"no even/odd pair fits in {min_port}-{max_port}")
        self.min_port = min_port
        self.max_port = max_port
        self._free: deque[int] = deque(range(first, max_port, 2))
        self._in_use: set[int] = set()

    @property
    def capacity(self) -> int:
        return len(self._free) + len(self._in_use)

    @property
    def in_use(self) -> int:
        return len(self._in_use)

    def allocate(self) -> tuple[int, int]:
        """Return the next free ``(rtp_port, rtcp_port)``; raise ``PortsExhaustedError``."""
        if not self._free:
            raise PortsExhaustedError(f"all {self.capacity} port pairs in use")
        rtp = self._free.popleft()
        self._in_use.add(rtp)
        return rtp, rtp + 1

    def release(self, rtp_port: int) -> None:
        if rtp_port not in self._in_use:
            raise ValueError(f"port {rtp_port} is not allocated")
        self._in_use.remove(rtp_port)
        self._free.append(rtp_port)


class Transcoder(Protocol):
    """Transforms a packet from one leg for the other (C's SRTP B2BUA, see ``srtp.py``)."""

    def transcode(self, data: bytes, rtcp: bool) -> bytes:
        """Return the packet for the egress leg; raise ``TranscodeError`` to drop it."""
        ...


@dataclass(frozen=True, slots=True)
class LegSpec:
    """How one leg of a stream meets the network.

    ``local_rtcp_port == local_rtp_port`` means rtcp-mux (RFC 5761) on that leg. For a demuxed
    leg ``remote_rtp`` (and ``remote_rtcp`` unless muxed) are required: they are the demux keys.
    A latching leg learns its remote from its first packet; ``expected_ip`` optionally restricts
    who may latch it. Without ``remote_*`` it sends nothing until then (E's client leg: SDP
    addresses lie behind NAT). With ``remote_*`` it is *pre-latched*: it sends to those SDP
    addresses until its first packet, then follows the packet's source (C's inside leg: symmetric
    RTP towards an endpoint that may wait for media before it sends). A non-latching leg sends to
    and accepts only from its configured ``remote_*``.
    """

    local_rtp_port: int
    local_rtcp_port: int
    remote_rtp: Addr | None = None
    remote_rtcp: Addr | None = None
    latch: bool = False
    expected_ip: str | None = None
    demux: bool = False

    @property
    def rtcp_mux(self) -> bool:
        return self.local_rtcp_port == self.local_rtp_port

    @classmethod
    def dedicated(
        cls,
        rtp_port: int,
        rtcp_port: int | None = None,
        *,
        latch: bool = True,
        expected_ip: str | None = None,
        remote_rtp: Addr | None = None,
        remote_rtcp: Addr | None = None,
    ) -> LegSpec:
        rtcp = rtp_port + 1 if rtcp_port is None else rtcp_port
        return cls(rtp_port, rtcp, remote_rtp, remote_rtcp, latch, expected_ip, demux=False)

    @classmethod
    def demuxed(
        cls, shared_rtp_port: int, shared_rtcp_port: int, remote_rtp: Addr, remote_rtcp: Addr | None
    ) -> LegSpec:
        return cls(shared_rtp_port, shared_rtcp_port, remote_rtp, remote_rtcp, latch=False, demux=True)


class Endpoint:
    """One local port of one leg (both RTP and RTCP when the leg is muxed). Counters are ints."""

    __slots__ = (
        "expected_ip",
        "garbage_drops",
        "is_rtcp_port",
        "latch",
        "latched",
        "leg",
        "local_port",
        "not_latched_drops",
        "peer_rtcp",
        "peer_rtp",
        "remote",
        "route",
        "rx_bytes",
        "rx_packets",
        "stats",
        "stream",
        "transcode_drops",
        "transcoder",
        "tx_bytes",
        "tx_packets",
        "unlatched_drops",
    )

    def __init__(self, stream: Stream, leg: int, local_port: int, is_rtcp_port: bool, spec: LegSpec) -> None:
        self.stream = stream
        self.leg = leg
        self.local_port = local_port
        self.is_rtcp_port = is_rtcp_port
        self.latch = spec.latch
        self.latched = False
        self.expected_ip = spec.expected_ip
        self.remote: Addr | None = None
        self.route: Route | None = None
        self.peer_rtp: Endpoint = self
        self.peer_rtcp: Endpoint = self
        self.stats = StreamStats(stream.clock_rate)
        self.transcoder: Transcoder | None = None
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = 0
        self.garbage_drops = self.unlatched_drops = self.not_latched_drops = self.transcode_drops = 0

    def set_remote(self, remote: Addr | None) -> None:
        self.remote = remote
        self.route = None if remote is None else (self.local_port, remote)

    def prelatch(self, remote: Addr | None) -> None:
        """Send to ``remote`` (an SDP address) but accept nothing yet: ``remote`` stays None, so
        the first packet from a permitted source goes through ``RelayTable._latch``."""
        self.remote = None
        self.route = None if remote is None else (self.local_port, remote)

    def drops(self) -> dict[str, int]:
        return {
            "garbage": self.garbage_drops,
            "unlatched": self.unlatched_drops,
            "not_latched": self.not_latched_drops,
            "transcode": self.transcode_drops,
        }


class Leg:
    __slots__ = ("index", "rtcp", "rtp", "spec")

    def __init__(self, stream: Stream, index: int, spec: LegSpec) -> None:
        self.index = index
        self.spec = spec
        self.rtp = Endpoint(stream, index, spec.local_rtp_port, False, spec)
        self.rtcp = self.rtp if spec.rtcp_mux else Endpoint(stream, index, spec.local_rtcp_port, True, spec)
        if not spec.latch:
            self.rtp.set_remote(spec.remote_rtp)
            if not spec.rtcp_mux:
                self.rtcp.set_remote(spec.remote_rtcp)
        else:
            self.rtp.prelatch(spec.remote_rtp)
            if not spec.rtcp_mux:
                self.rtcp.prelatch(spec.remote_rtcp)

    def endpoints(self) -> tuple[Endpoint, ...]:
        return (self.rtp,) if self.rtcp is self.rtp else (self.rtp, self.rtcp)


class Stream:
    __slots__ = ("clock_rate", "created", "inactivity_timeout_s", "last_seen", "legs", "stream_id")

    def __init__(
        self,
        stream_id: str,
        a: LegSpec,
        b: LegSpec,
        now: float,
        clock_rate: int,
        inactivity_timeout_s: float | None,
    ) -> None:
        self.stream_id = stream_id
        self.created = now
        self.last_seen = now
        self.clock_rate = clock_rate
        self.inactivity_timeout_s = inactivity_timeout_s
        self.legs = (Leg(self, 0, a), Leg(self, 1, b))
        for src, dst in ((self.legs[0], self.legs[1]), (self.legs[1], self.legs[0])):
            for ep in src.endpoints():
                ep.peer_rtp, ep.peer_rtcp = dst.rtp, dst.rtcp

    def endpoints(self) -> Iterator[Endpoint]:
        for leg in self.legs:
            yield from leg.endpoints()

    def snapshot(self) -> dict[str, Any]:
        return {
            "stream_id": self.stream_id,
            "created": self.created,
            "last_seen": self.last_seen,
            "clock_rate": self.clock_rate,
            "legs": [_leg_snapshot(leg) for leg in self.legs],
        }


def _leg_snapshot(leg: Leg) -> dict[str, Any]:
    eps = leg.endpoints()
    drops: dict[str, int] = {}
    for ep in eps:
        for k, v in ep.drops().items():
            drops[k] = drops.get(k, 0) + v
    return {
        "leg": leg.index,
        "kind": "demux" if leg.spec.demux else "dedicated",
        "local_rtp_port": leg.spec.local_rtp_port,
        "local_rtcp_port": leg.spec.local_rtcp_port,
        "remote_rtp": _fmt(leg.rtp.remote),
        "remote_rtcp": _fmt(leg.rtcp.remote),
        "send_to_rtp": None if leg.rtp.route is None else _fmt(leg.rtp.route[1]),
        "latched": leg.rtp.latched,
        "rx_packets": sum(ep.rx_packets for ep in eps),
        "rx_bytes": sum(ep.rx_bytes for ep in eps),
        "tx_packets": sum(ep.tx_packets for ep in eps),
        "tx_bytes": sum(ep.tx_bytes for ep in eps),
        "drops": drops,
        "rtp": leg.rtp.stats.snapshot(),
    }


def _fmt(addr: Addr | None) -> str | None:
    return None if addr is None else f"{addr[0]}:{addr[1]}"


_DROP_KINDS = ("garbage", "unlatched", "not_latched", "transcode")
_TOTAL_KEYS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", *(f"{k}_drops" for k in _DROP_KINDS))


class RelayTable:
    """All relayed streams of one process, fed datagrams by an I/O adapter (``worker.py``)."""

    def __init__(self, default_inactivity_timeout_s: float | None = 60.0) -> None:
        self.default_inactivity_timeout_s = default_inactivity_timeout_s
        self._streams: dict[str, Stream] = {}
        self._ports: dict[int, Endpoint] = {}
        self._demux: dict[int, dict[Addr, Endpoint]] = {}
        self._deadline: float | None = None
        self._events: list[LegLatched] = []
        self._retired: dict[str, int] = dict.fromkeys(_TOTAL_KEYS, 0)
        # With ``track_changes`` (set by an adapter that mirrors routes elsewhere: the worker's
        # native fast path), every stream whose routing may have changed since ``take_changed()``:
        # added, latched, re-pointed, relatched, given a transcoder.
        self.track_changes = False
        self.changed: set[Stream] = set()
        # Told when ``changed`` stops being empty: the worker mirrors the change soon even if no
        # packet wakes it (flows in the kernel never do).
        self.on_change: Callable[[], object] | None = None
        # Drops that belong to no stream.
        self.unknown_port_drops = 0
        self.unknown_source_drops = 0
        self.garbage_drops = 0

    # -- the hot path -------------------------------------------------------------------------

    def receive_datagram(self, local_port: int, data: bytes, addr: Addr, now: float) -> Route | None:
        """Account one datagram; return ``(egress local port, destination)`` or None (dropped)."""
        ep = self._ports.get(local_port)
        if ep is None:
            by_addr = self._demux.get(local_port)
            if by_addr is None:
                self.unknown_port_drops += 1
                return None
            ep = by_addr.get(addr)
            if ep is None:
                self.unknown_source_drops += 1
                return None
        n = len(data)
        if n < _MIN_DATAGRAM_BYTES or n > MAX_DATAGRAM_BYTES or data[0] & 0xC0 != 0x80:
            return self._garbage(ep)
        if ep.is_rtcp_port or RTCP_PT_MIN <= data[1] <= RTCP_PT_MAX:
            out = ep.peer_rtcp
            rtp = False
        elif n < RTP_HEADER_BYTES:
            return self._garbage(ep)
        else:
            out = ep.peer_rtp
            rtp = True
        if ep.remote != addr and not self._latch(ep, addr, now):
            return None
        if rtp:
            ep.stats.update(data, now)
        ep.stream.last_seen = now
        ep.rx_packets += 1
        ep.rx_bytes += n
        route = out.route
        if route is None:
            ep.not_latched_drops += 1
            return None
        out.tx_packets += 1
        out.tx_bytes += n
        return route

    def receive_and_transcode(
        self, local_port: int, data: bytes, addr: Addr, now: float
    ) -> tuple[int, Addr, bytes] | None:
        """Like ``receive_datagram`` but applies the ingress leg's transcoder (C's B2BUA).

        The source is checked before any cryptography (a packet from a stranger must neither cost
        an SRTP operation nor advance the outbound SRTP state of the stream it targets), and the
        packet is authenticated (SRTP unprotect) before it may latch a leg. Byte counters count
        the ingress size.
        """
        ep = self._ports.get(local_port)
        transcoder = None if ep is None else ep.transcoder
        if transcoder is None or ep is None:
            route = self.receive_datagram(local_port, data, addr, now)
            return None if route is None else (route[0], route[1], data)
        n = len(data)
        if n < _MIN_DATAGRAM_BYTES or n > MAX_DATAGRAM_BYTES or data[0] & 0xC0 != 0x80:
            self._garbage(ep)
            return None
        if ep.remote != addr and not (
            ep.latch and not ep.latched and (ep.expected_ip is None or addr[0] == ep.expected_ip)
        ):
            ep.unlatched_drops += 1
            return None
        try:
            out = transcoder.transcode(data, ep.is_rtcp_port or RTCP_PT_MIN <= data[1] <= RTCP_PT_MAX)
        except TranscodeError:
            ep.transcode_drops += 1
            return None
        route = self.receive_datagram(local_port, data, addr, now)
        return None if route is None else (route[0], route[1], out)

    def _garbage(self, ep: Endpoint) -> Route | None:
        ep.garbage_drops += 1
        self.garbage_drops += 1
        return None

    def _latch(self, ep: Endpoint, addr: Addr, now: float) -> bool:
        if ep.latch and not ep.latched and (ep.expected_ip is None or addr[0] == ep.expected_ip):
            ep.latched = True
            ep.set_remote(addr)
            stream = ep.stream
            self._changed(stream)
            self._events.append(LegLatched(stream.stream_id, ep.leg, ep.is_rtcp_port, addr, now))
            return True
        ep.unlatched_drops += 1
        return False

    # -- streams ------------------------------------------------------------------------------

    def add_stream(
        self,
        stream_id: str,
        a: LegSpec,
        b: LegSpec,
        now: float,
        *,
        clock_rate: int = 8000,
        inactivity_timeout_s: float | None = None,
    ) -> Stream:
        if stream_id in self._streams:
            raise ValueError(f"stream {stream_id!r} exists")
        for spec in (a, b):
            if spec.demux and (spec.remote_rtp is None or (spec.remote_rtcp is None and not spec.rtcp_mux)):
                raise ValueError("a demuxed leg needs its remote RTP (and RTCP) address as the key")
        timeout = self.default_inactivity_timeout_s if inactivity_timeout_s is None else inactivity_timeout_s
        stream = Stream(stream_id, a, b, now, clock_rate, timeout)
        self._check_free(stream)
        for leg in stream.legs:
            for ep in leg.endpoints():
                self._index(ep, leg.spec.demux)
        self._streams[stream_id] = stream
        self._changed(stream)
        if timeout is not None and (self._deadline is None or now + timeout < self._deadline):
            self._deadline = now + timeout
        return stream

    def _check_free(self, stream: Stream) -> None:
        seen: set[tuple[int, Addr | None]] = set()
        for leg in stream.legs:
            for ep in leg.endpoints():
                key = (ep.local_port, ep.remote if leg.spec.demux else None)
                taken = (
                    key in seen
                    or (ep.local_port in self._ports)
                    or (not leg.spec.demux and ep.local_port in self._demux)
                    or (leg.spec.demux and ep.remote in self._demux.get(ep.local_port, {}))
                )
                if taken:
                    raise ValueError(f"local port {ep.local_port} (remote {ep.remote}) already in use")
                seen.add(key)

    def _index(self, ep: Endpoint, demux: bool) -> None:
        if demux:
            assert ep.remote is not None
            self._demux.setdefault(ep.local_port, {})[ep.remote] = ep
        else:
            self._ports[ep.local_port] = ep

    def _unindex(self, ep: Endpoint, demux: bool) -> None:
        if not demux:
            del self._ports[ep.local_port]
            return
        by_addr = self._demux[ep.local_port]
        assert ep.remote is not None
        del by_addr[ep.remote]
        if not by_addr:
            del self._demux[ep.local_port]

    def remove_stream(self, stream_id: str) -> Stream:
        stream = self._streams.pop(stream_id)
        self.changed.discard(stream)
        for leg in stream.legs:
            for ep in leg.endpoints():
                self._unindex(ep, leg.spec.demux)
                for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"):
                    self._retired[k] += getattr(ep, k)
                for k, v in ep.drops().items():
                    self._retired[f"{k}_drops"] += v
        return stream

    def get_stream(self, stream_id: str) -> Stream:
        return self._streams[stream_id]

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def set_remote(self, stream_id: str, leg: int, remote_rtp: Addr, remote_rtcp: Addr | None = None) -> None:
        """Point a non-latching leg at new remote addresses (a re-INVITE changed the SDP)."""
        stream = self._streams[stream_id]
        self._changed(stream)
        lg = stream.legs[leg]
        pairs: list[tuple[Endpoint, Addr | None]] = [(lg.rtp, remote_rtp)]
        if not lg.spec.rtcp_mux:
            pairs.append((lg.rtcp, remote_rtcp))
        for ep, remote in pairs:
            if lg.spec.demux:
                if remote is None or remote in self._demux.get(ep.local_port, {}):
                    raise ValueError(f"demux key {remote} missing or in use")
                self._unindex(ep, True)
                ep.set_remote(remote)
                self._index(ep, True)
            else:
                ep.set_remote(remote)

    def relatch(
        self, stream_id: str, leg: int, remote_rtp: Addr | None = None, remote_rtcp: Addr | None = None
    ) -> None:
        """Forget what a latching leg learnt; its next packet latches again. With ``remote_*``
        (a re-INVITE's SDP) the leg is pre-latched: it sends there until then."""
        stream = self._streams[stream_id]
        self._changed(stream)
        lg = stream.legs[leg]
        for ep in lg.endpoints():
            if ep.latch:
                ep.latched = False
                ep.prelatch(remote_rtcp if ep.is_rtcp_port else remote_rtp)

    def set_transcoder(self, stream_id: str, ingress_leg: int, transcoder: Transcoder | None) -> None:
        """Transform packets received on ``ingress_leg`` (dedicated legs only) for the other leg."""
        stream = self._streams[stream_id]
        lg = stream.legs[ingress_leg]
        if lg.spec.demux:
            raise ValueError("transcoding is only supported on dedicated legs")
        self._changed(stream)
        for ep in lg.endpoints():
            ep.transcoder = transcoder

    def _changed(self, stream: Stream) -> None:
        if self.track_changes:
            first = not self.changed
            self.changed.add(stream)
            if first and self.on_change is not None:
                self.on_change()

    def take_changed(self) -> set[Stream]:
        """The streams ``changed`` since the last call (see ``track_changes``)."""
        changed, self.changed = self.changed, set()
        return changed

    # -- events and timers --------------------------------------------------------------------

    def drain_events(self) -> list[LegLatched]:
        events, self._events = self._events, []
        return events

    def get_timer(self) -> float | None:
        """The earliest time a stream may have gone idle (may be early: activity is not tracked)."""
        return self._deadline

    def due(self, before: float) -> list[Stream]:
        """The streams whose inactivity deadline (by ``last_seen``) is at or before ``before``.

        An adapter that keeps ``last_seen`` elsewhere (the native fast path) refreshes just these
        before ``handle_timer``, instead of every stream every time."""
        return [
            s
            for s in self._streams.values()
            if s.inactivity_timeout_s is not None and s.last_seen + s.inactivity_timeout_s <= before
        ]

    def handle_timer(self, now: float) -> list[StreamTimedOut]:
        expired: list[StreamTimedOut] = []
        deadline: float | None = None
        for stream in list(self._streams.values()):
            timeout = stream.inactivity_timeout_s
            if timeout is None:
                continue
            due = stream.last_seen + timeout
            if due <= now:
                self.remove_stream(stream.stream_id)
                expired.append(StreamTimedOut(stream.stream_id, now - stream.last_seen, now))
            elif deadline is None or due < deadline:
                deadline = due
        self._deadline = deadline
        return expired

    # -- status -------------------------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        # Plain attribute sums (no per-endpoint dicts): this runs over every endpoint.
        rx_p = rx_b = tx_p = tx_b = garbage = unlatched = not_latched = transcode = 0
        for stream in self._streams.values():
            for leg in stream.legs:
                for ep in leg.endpoints():
                    rx_p += ep.rx_packets
                    rx_b += ep.rx_bytes
                    tx_p += ep.tx_packets
                    tx_b += ep.tx_bytes
                    garbage += ep.garbage_drops
                    unlatched += ep.unlatched_drops
                    not_latched += ep.not_latched_drops
                    transcode += ep.transcode_drops
        totals = dict(self._retired)
        for k, v in (
            ("rx_packets", rx_p),
            ("rx_bytes", rx_b),
            ("tx_packets", tx_p),
            ("tx_bytes", tx_b),
            ("garbage_drops", garbage),
            ("unlatched_drops", unlatched),
            ("not_latched_drops", not_latched),
            ("transcode_drops", transcode),
        ):
            totals[k] += v
        totals["unknown_port_drops"] = self.unknown_port_drops
        totals["unknown_source_drops"] = self.unknown_source_drops
        totals["garbage_drops"] = self.garbage_drops  # includes per-stream garbage
        totals["streams"] = len(self._streams)
        return totals

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready status: every stream with per-leg counters, and table totals."""
        return {
            "streams": [s.snapshot() for s in self._streams.values()],
            "totals": self.totals(),
        }
