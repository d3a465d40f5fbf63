"""Expressway-E's media relay: SRTP passes through untouched (spec §7, §2).

For every RTP ``m=`` line of a call E anchors one stream with two legs:

* the *client leg*: an even/odd pair from ``media_port_min..media_port_max`` on E's external
  address. It latches (symmetric RTP): nothing is sent to the client before its first packet,
  and then only to the address that packet came from; other sources are dropped and counted.
* the *C leg*: E's shared demux ports (2776/2777) on its internal address, told apart by C's
  source address, which C announced in its SDP.

SDP towards C carries ``c=<internal address>``, ``m=<2776>``, ``a=rtcp:2777``; towards the client
``c=<external address>``, ``m=<allocated port>``, ``a=rtcp:<port+1>``. Profiles and ``a=crypto``
lines are not touched: E never sees keys it could use. ``a=rtcp-mux`` is removed (the relay keeps
RTP and RTCP on separate ports on every leg). ``m=`` lines with port 0 pass untouched.

Port binding: ``process_offer`` is synchronous, so the client pair is bound synchronously
(``RelayWorker.bind_pair_now``): the ports are reserved before the rewritten SDP leaves, and the
sockets join the event loop one iteration later (datagrams wait in the kernel meanwhile).
Streams enter the relay table when the answer arrives, so an unanswered call never times out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge.config import ExpeSettings
from edge.media_hooks import Side
from media_relay.anchor import AnchorBase
from media_relay.errors import MediaError
from media_relay.events import StreamTimedOut
from media_relay.sdp import RtcpAttribute, SessionDescription
from media_relay.table import Addr, LegSpec, PortAllocator
from media_relay.worker import DEMUX_RCVBUF_BYTES, DEMUX_SNDBUF_BYTES, RelayWorker

log = logging.getLogger(__name__)

_RTP_PROTOS = ("RTP/AVP", "RTP/AVPF", "RTP/SAVP", "RTP/SAVPF")
CLIENT_LEG = 0
C_LEG = 1


@dataclass(slots=True)
class _Stream:
    """One relayed m= line: the client-facing pair and what each side's SDP said."""

    stream_id: str
    index: int
    media: str
    client_rtp: int
    client_rtcp: int
    clock_rate: int
    c_remote: tuple[Addr, Addr] | None = None  # C's (rtp, rtcp) as the table uses it
    client_sdp: tuple[Addr, Addr] | None = None  # the client's SDP address, to relatch on change
    pending_c: tuple[Addr, Addr] | None = None  # from the offer in progress
    pending_client: tuple[Addr, Addr] | None = None
    in_table: bool = False


@dataclass(slots=True)
class _Call:
    key: str
    streams: dict[int, _Stream] = field(default_factory=dict)
    offer_from: Side | None = None
    offer_sections: int = 0
    offer_active: set[int] = field(default_factory=set)


class EdgeMedia(AnchorBase):
    what = "media relay"

    """E's ``MediaSession`` (``edge.media_hooks``): relays SRTP client <-> E <-> C.

    ``await start()`` binds the demux ports and must precede the first ``process_*``;
    ``await stop()`` ends every call and closes every port. ``on_stream_timeout(call, event)``
    is called when a stream idles out (signalling may tear the call down).
    """

    def __init__(
        self,
        settings: ExpeSettings,
        *,
        inactivity_timeout_s: float | None = 60.0,
        on_stream_timeout: Callable[[str, StreamTimedOut], None] | None = None,
    ) -> None:
        if settings.media_port_min <= settings.demux_rtp_port <= settings.media_port_max or (
            settings.media_port_min <= settings.demux_rtcp_port <= settings.media_port_max
        ):
            raise ValueError("the demux ports must lie outside the media port range")
        self.settings = settings
        self.inactivity_timeout_s = inactivity_timeout_s
        self.on_stream_timeout = on_stream_timeout
        super().__init__()
        self._calls: dict[str, _Call] = {}
        self._by_stream: dict[str, tuple[str, int]] = {}

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def worker(self) -> RelayWorker:
        if self._worker is None:
            raise RuntimeError("EdgeMedia is not started")
        return self._worker

    async def start(self) -> None:
        s = self.settings
        worker = RelayWorker(
            s.external_address,
            allocator=PortAllocator(s.media_port_min, s.media_port_max),
            on_timeout=self._on_timeout,
            kernel_forwarding=True if s.media_kernel_forwarding else None,
        )
        try:
            # Every C-facing stream shares these two sockets: large buffers, or a burst from C
            # overflows them (the 300-call drops of benchmarks/media/README.md).
            for port in (s.demux_rtp_port, s.demux_rtcp_port):
                await worker.bind_port(
                    port,
                    host=s.internal_address,
                    rcvbuf_bytes=DEMUX_RCVBUF_BYTES,
                    sndbuf_bytes=DEMUX_SNDBUF_BYTES,
                )
        except BaseException:
            await worker.close()
            raise
        self._worker = worker
        log.info(
            "media relay up (%s path): client pairs on %s:%d-%d, demux %s:%d/%d",
            worker.path,
            s.external_address,
            s.media_port_min,
            s.media_port_max,
            s.internal_address,
            s.demux_rtp_port,
            s.demux_rtcp_port,
        )

    async def stop(self) -> None:
        if self._worker is None:
            return
        for call in list(self._calls):
            self.end_call(call)
        worker, self._worker = self._worker, None
        await worker.close()

    # -- MediaSession -----------------------------------------------------------------------------

    def process_offer(self, call: str, ingress: Side, sdp: bytes) -> bytes:
        worker = self._running()
        sd = self._parse(sdp)
        state = self._calls.get(call) or _Call(call)
        created: list[_Stream] = []
        # Streams this offer disables are dropped only once it is accepted (a refused re-INVITE
        # leaves the call's media as it was, RFC 3261 §14.2).
        disabled = [i for i in state.streams if i >= len(sd.media)]
        try:
            active: set[int] = set()
            for i, m in enumerate(sd.media):
                if m.port == 0 or m.proto not in _RTP_PROTOS:
                    disabled.append(i)
                    continue
                remote = sd.media_remote(i)
                st = state.streams.get(i)
                if st is None:
                    rtp, rtcp = worker.bind_pair_now()
                    clock = m.clock_rate() or (90000 if m.media == "video" else 8000)
                    st = _Stream(f"{call}#{i}", i, m.media, rtp, rtcp, clock)
                    created.append(st)
                if ingress == "outside":
                    st.pending_client, st.pending_c = remote, st.c_remote
                else:
                    st.pending_c, st.pending_client = remote, st.client_sdp
                self._rewrite(sd, i, st, towards=_other(ingress))
                active.add(i)
        except (MediaError, ValueError) as exc:
            for st in created:
                worker.release_pair(st.client_rtp)
            raise self._reject(call, f"offer not served: {exc}") from None
        for st in created:
            state.streams[st.index] = st
            self._by_stream[st.stream_id] = (call, st.index)
        for i in disabled:
            self._drop_stream(state, i)
        state.offer_from, state.offer_sections, state.offer_active = ingress, len(sd.media), active
        self._calls[call] = state
        return bytes(sd)

    def process_answer(self, call: str, ingress: Side, sdp: bytes) -> bytes:
        self._running()
        state = self._calls.get(call)
        if state is None or state.offer_from is None:
            raise self._reject(call, "answer without an offer")
        if ingress == state.offer_from:
            raise self._reject(call, f"answer from the offerer's side ({ingress})")
        sd = self._parse(sdp)
        if len(sd.media) != state.offer_sections:
            raise self._reject(call, f"answer has {len(sd.media)} m= lines, the offer {state.offer_sections}")
        try:
            remotes = {i: sd.media_remote(i) for i in state.offer_active if sd.media[i].port != 0}
        except MediaError as exc:
            raise self._reject(call, f"answer not served: {exc}") from None
        for i, m in enumerate(sd.media):
            if i not in state.offer_active:
                continue
            st = state.streams.get(i)
            if st is None or m.port == 0:  # timed out meanwhile, or refused by the answerer
                self._drop_stream(state, i)
                m.set_port(0)
                continue
            c_remote: tuple[Addr, Addr] | None
            if ingress == "inside":
                c_remote, client_sdp = remotes[i], st.pending_client
            else:
                c_remote, client_sdp = st.pending_c, remotes[i]
            assert c_remote is not None  # the offer (from inside) or this answer named C
            try:
                self._apply(st, c_remote, client_sdp)
            except ValueError as exc:  # C's address is another stream's demux key
                self._drop_stream(state, i)
                raise self._reject(call, f"answer not served: {exc}") from None
            self._rewrite(sd, i, st, towards=_other(ingress))
        return bytes(sd)

    def end_call(self, call: str) -> None:
        state = self._calls.pop(call, None)
        if state is None or self._worker is None:
            return
        for i in list(state.streams):
            self._drop_stream(state, i)

    def snapshot(self) -> dict[str, Any]:
        if self._worker is None:
            return {"anchored": True, "role": "expe", "running": False, "calls": {}}
        stats = self._worker.stats()  # first: it folds the native path's counters in
        table = self._worker.table
        calls: dict[str, list[dict[str, Any]]] = {}
        for key, state in self._calls.items():
            calls[key] = [
                {
                    "index": st.index,
                    "media": st.media,
                    "stream_id": st.stream_id,
                    "client_port": st.client_rtp,
                    "c_remote": None if st.c_remote is None else _fmt(st.c_remote[0]),
                    "state": "relaying" if st.in_table else "offered",
                    "stream": table.get_stream(st.stream_id).snapshot() if st.in_table else None,
                }
                for st in state.streams.values()
            ]
        return {
            "anchored": True,
            "role": "expe",
            "running": True,
            "external_address": self.settings.external_address,
            "internal_address": self.settings.internal_address,
            "demux_ports": [self.settings.demux_rtp_port, self.settings.demux_rtcp_port],
            "calls": calls,
            "rejected": self.rejected,
            "totals": stats["totals"],
            "worker": stats["worker"],
        }

    # -- internals --------------------------------------------------------------------------------

    def _rewrite(self, sd: SessionDescription, i: int, st: _Stream, towards: Side) -> None:
        s = self.settings
        m = sd.media[i]
        if towards == "inside":
            sd.set_media_address(i, s.internal_address)
            m.set_port(s.demux_rtp_port)
            m.set_rtcp(RtcpAttribute(s.demux_rtcp_port))
        else:
            sd.set_media_address(i, s.external_address)
            m.set_port(st.client_rtp)
            m.set_rtcp(RtcpAttribute(st.client_rtcp))
        m.set_attribute("rtcp-mux", None, present=False)

    def _apply(self, st: _Stream, c_remote: tuple[Addr, Addr], client_sdp: tuple[Addr, Addr] | None) -> None:
        worker = self.worker
        if not st.in_table:
            worker.add_stream(
                st.stream_id,
                LegSpec.dedicated(st.client_rtp, st.client_rtcp, latch=True),
                LegSpec.demuxed(self.settings.demux_rtp_port, self.settings.demux_rtcp_port, *c_remote),
                clock_rate=st.clock_rate,
                inactivity_timeout_s=self.inactivity_timeout_s,
            )
            st.in_table = True
            log.debug("stream %s: client port %d <-> C %s", st.stream_id, st.client_rtp, _fmt(c_remote[0]))
        else:
            if c_remote != st.c_remote:
                worker.table.set_remote(st.stream_id, C_LEG, *c_remote)
            if st.client_sdp is not None and client_sdp is not None and client_sdp != st.client_sdp:
                worker.table.relatch(st.stream_id, CLIENT_LEG)  # the client moved (re-INVITE)
            # An answer is signalling activity: an unanswered 18x must not idle the stream out.
            worker.table.get_stream(st.stream_id).last_seen = worker.time()
        st.c_remote, st.client_sdp = c_remote, client_sdp

    def _drop_stream(self, state: _Call, index: int) -> None:
        st = state.streams.pop(index, None)
        if st is None:
            return
        self._by_stream.pop(st.stream_id, None)
        worker = self.worker
        if st.in_table and st.stream_id in worker.table:
            worker.remove_stream(st.stream_id)  # also frees the client pair
        else:
            worker.release_pair(st.client_rtp)

    def _on_timeout(self, event: StreamTimedOut) -> None:
        # The worker already removed the stream and freed its pair; forget it here.
        found = self._by_stream.pop(event.stream_id, None)
        if found is None:
            return
        call, index = found
        state = self._calls.get(call)
        if state is not None:
            state.streams.pop(index, None)
        log.info("call %s: stream %s idle for %.1f s, removed", call, event.stream_id, event.idle_s)
        if self.on_stream_timeout is not None:
            self.on_stream_timeout(call, event)


def _other(side: Side) -> Side:
    return "inside" if side == "outside" else "outside"


def _fmt(addr: Addr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
