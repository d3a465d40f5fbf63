"""Expressway-C's media anchor: both legs relayed, SRTP terminated on the outside (spec §7).

For every RTP ``m=`` line C anchors one stream with two dedicated even/odd pairs on its address:

* the *outside leg* faces E's demux ports (2776/2777, from E's SDP). It is not latching: it
  sends to and accepts from E's SDP address only. It is always SRTP (SDES, RFC 4568): the
  client's key decrypts what comes in, C's own fresh key protects what goes out.
* the *inside leg* faces the far end (Unified CM side). It is pre-latched: it sends to the far
  end's SDP address and follows the source of the first packet from that IP (symmetric RTP).
  Plain RTP unless the inside endpoint itself offered SRTP (then C terminates that too).

Suites: ``AES_CM_128_HMAC_SHA1_80`` and ``_32`` always, the AEAD GCM ones when
``settings.aes_gcm`` (the per-UCM "AES GCM" option). C keeps one key per suite per stream for the
call's life, so a re-INVITE does not rekey (and replay state survives). ``a=rtcp-mux`` is removed
(separate RTCP ports on every leg); ``m=`` lines C cannot anchor (port 0, not RTP, no usable
crypto) go on with port 0 and come back with port 0; when no stream is left the SDP is refused
with ``MediaRejected`` (488).

C sends first towards E (spec §7: it opens the DMZ firewall pinhole): as soon as C knows E's
address for an outside leg (outside offer, or outside answer to C's offer) it sends, from its
outside RTP and RTCP ports, one SRTP-protected comfort-noise packet (PT 13, RFC 3389 level
127 = silence, C's own random SSRC) and one SRTCP empty receiver report. E drops both (its client
leg has not latched), as the real E does.

Port binding is synchronous (``RelayWorker.bind_pair_now``; see ``edge_e.media``); streams enter
the relay table when the answer arrives.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge.config import ExpcSettings
from edge.media_hooks import Side
from media_relay.anchor import AnchorBase
from media_relay.errors import MediaError
from media_relay.events import StreamTimedOut
from media_relay.sdp import MediaSection, RtcpAttribute, SessionDescription
from media_relay.srtp import (
    DEFAULT_SUITES,
    GCM_SUITES,
    SUITES,
    CryptoAttribute,
    Direction,
    SrtpContext,
    SrtpTranscoder,
    check_usable,
    generate_crypto,
    negotiate,
)
from media_relay.table import Addr, LegSpec, PortAllocator
from media_relay.worker import RelayWorker

log = logging.getLogger(__name__)

OUTSIDE_LEG = 0
INSIDE_LEG = 1
_SECURE = {"RTP/SAVP": "RTP/AVP", "RTP/SAVPF": "RTP/AVPF"}
_PLAIN = {v: k for k, v in _SECURE.items()}
_UNSPECIFIED = ("0.0.0.0", "::")  # RFC 3264 §8.4 hold: send nowhere
Remote = tuple[Addr, Addr]


@dataclass(slots=True)
class _Keys:
    """The SDES state of one stream: peers' keys, C's keys, and per-direction contexts."""

    outside_theirs: CryptoAttribute | None = None  # the client's key (outside -> C)
    outside_ours: CryptoAttribute | None = None  # C's key (C -> client)
    inside_theirs: CryptoAttribute | None = None  # the far end's, when it uses SRTP
    inside_ours: CryptoAttribute | None = None


@dataclass(slots=True)
class _Offer:
    """What an offer in progress settled for one stream; the answer completes it."""

    remote: Remote  # the offerer's SDP address (E's on the outside, the far end's inside)
    proto: str  # the offerer's profile, for rejected streams in the answer
    keys: _Keys
    offered: dict[int, CryptoAttribute] = field(default_factory=dict)  # C's a=crypto by tag


@dataclass(slots=True)
class _Stream:
    stream_id: str
    index: int
    media: str
    out_rtp: int
    out_rtcp: int
    in_rtp: int
    in_rtcp: int
    clock_rate: int
    own_outside: dict[str, CryptoAttribute] = field(default_factory=dict)  # C's key per suite
    own_inside: dict[str, CryptoAttribute] = field(default_factory=dict)
    keys: _Keys = field(default_factory=_Keys)
    e_remote: Remote | None = None
    far_remote: Remote | None = None
    pending: _Offer | None = None
    contexts: dict[tuple[str, bytes, Direction], SrtpContext] = field(default_factory=dict)
    transcoders: list[SrtpTranscoder] = field(default_factory=list)  # by ingress leg
    auth_failures_retired: list[int] = field(default_factory=lambda: [0, 0])
    pinholed: Remote | None = None
    in_table: bool = False

    def context(self, attr: CryptoAttribute, direction: Direction) -> SrtpContext:
        key = (attr.suite, attr.key_salt, direction)
        ctx = self.contexts.get(key)
        if ctx is None:
            ctx = self.contexts[key] = SrtpContext.from_crypto(attr, direction)
        return ctx

    def auth_failures(self, leg: int) -> int:
        live = self.transcoders[leg].auth_failures if self.transcoders else 0
        return self.auth_failures_retired[leg] + live


@dataclass(slots=True)
class _Call:
    key: str
    streams: dict[int, _Stream] = field(default_factory=dict)
    offer_from: Side | None = None
    offer_sections: int = 0
    offer_refused: set[int] = field(default_factory=set)  # m= C set to port 0 in its offer


class GatewayMedia(AnchorBase):
    what = "media anchor"

    """C's ``MediaSession`` (``edge.media_hooks``): anchors both legs, terminates SRTP outside.

    ``await start()`` before the first ``process_*``; ``await stop()`` ends every call and closes
    every port. ``on_stream_timeout(call, event)`` is called when a stream idles out.
    """

    def __init__(
        self,
        settings: ExpcSettings,
        *,
        inactivity_timeout_s: float | None = 60.0,
        on_stream_timeout: Callable[[str, StreamTimedOut], None] | None = None,
    ) -> None:
        self.settings = settings
        self.inactivity_timeout_s = inactivity_timeout_s
        self.on_stream_timeout = on_stream_timeout
        wanted = DEFAULT_SUITES + (GCM_SUITES if settings.aes_gcm else ())
        self.suites: tuple[str, ...] = tuple(s for s in wanted if s in SUITES)
        super().__init__()
        self._calls: dict[str, _Call] = {}
        self._by_stream: dict[str, tuple[str, int]] = {}
        self.pinholes_sent = 0

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def worker(self) -> RelayWorker:
        if self._worker is None:
            raise RuntimeError("GatewayMedia is not started")
        return self._worker

    async def start(self) -> None:
        s = self.settings
        self._worker = RelayWorker(
            s.address,
            allocator=PortAllocator(s.media_port_min, s.media_port_max),
            transcoding=True,
            on_timeout=self._on_timeout,
            threads=s.media_threads if s.media_threads > 1 else None,
            helper=True if s.media_send_helper else None,
            kernel_forwarding=True if s.media_kernel_srtp else None,
        )
        log.info(
            "media anchor up on %s:%d-%d (%s path), suites %s",
            s.address,
            s.media_port_min,
            s.media_port_max,
            self._worker.path,
            ", ".join(self.suites),
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
        plans: dict[int, _Offer] = {}
        refused: set[int] = set()
        try:
            for i in range(len(sd.media)):
                plan = self._plan_offer(sd, i, ingress, state.streams.get(i))
                if plan is None:
                    refused.add(i)
                else:
                    plans[i] = plan
        except MediaError as exc:
            raise self._reject(call, f"offer not served: {exc}") from None
        if not plans:
            raise self._reject(call, "no stream C can anchor (no RTP m= line with a usable SRTP suite)")
        created: list[_Stream] = []
        try:
            for i in plans:
                if i not in state.streams:
                    created.append(self._new_stream(call, i, sd.media[i]))
        except (MediaError, ValueError) as exc:
            for st in created:
                worker.release_pair(st.out_rtp)
                worker.release_pair(st.in_rtp)
            raise self._reject(call, f"offer not served: {exc}") from None
        for st in created:
            state.streams[st.index] = st
            self._by_stream[st.stream_id] = (call, st.index)
        for i in [i for i in state.streams if i not in plans]:
            self._drop_stream(state, i)
        for i, m in enumerate(sd.media):
            if i in refused:
                if m.port != 0:
                    m.set_port(0)
                m.set_crypto([])  # never hand a peer's keys to the other side
                continue
            st = state.streams[i]
            plan = plans[i]
            if ingress == "outside":
                self._outside_offer_rewrite(sd, i, st, plan)
            else:
                self._inside_offer_rewrite(sd, i, st, plan)
            st.pending = plan
        state.offer_from, state.offer_sections, state.offer_refused = ingress, len(sd.media), refused
        self._calls[call] = state
        if ingress == "outside":
            for i in plans:
                self._send_first(state.streams[i], plans[i].remote, plans[i].keys.outside_ours)
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
        settled: dict[int, tuple[Remote, _Keys]] = {}
        try:
            for i, m in enumerate(sd.media):
                st = state.streams.get(i)
                if i in state.offer_refused or st is None or st.pending is None or m.port == 0:
                    continue
                settled[i] = (sd.media_remote(i), self._answer_keys(m, st.pending, ingress))
        except MediaError as exc:
            raise self._reject(call, f"answer not served: {exc}") from None
        for i, m in enumerate(sd.media):
            st = state.streams.get(i)
            if i not in settled or st is None or st.pending is None:
                # Refused by C's offer or by the answerer, or idled out meanwhile: port 0 onwards
                # with the offer's profile (RFC 3264 §6).
                proto = None if st is None or st.pending is None else st.pending.proto
                self._drop_stream(state, i)
                if m.port != 0:
                    m.set_port(0)
                m.set_crypto([])
                if proto is not None:
                    m.set_proto(proto)
                continue
            remote, keys = settled[i]
            plan = st.pending
            e_remote, far_remote = (remote, plan.remote) if ingress == "outside" else (plan.remote, remote)
            try:
                self._apply(st, e_remote, far_remote, keys)
            except (MediaError, ValueError) as exc:
                self._drop_stream(state, i)
                raise self._reject(call, f"answer not served: {exc}") from None
            if ingress == "outside":
                self._inside_answer_rewrite(sd, i, st, plan, keys)
                self._send_first(st, e_remote, keys.outside_ours)
            else:
                self._outside_answer_rewrite(sd, i, st, plan, keys)
        return bytes(sd)

    def end_call(self, call: str) -> None:
        state = self._calls.pop(call, None)
        if state is None or self._worker is None:
            return
        for i in list(state.streams):
            self._drop_stream(state, i)

    def snapshot(self) -> dict[str, Any]:
        if self._worker is None:
            return {"anchored": True, "role": "expc", "running": False, "calls": {}}
        stats = self._worker.stats()  # first: it brings the table's counters up to date
        calls = {k: [self._stream_snapshot(st) for st in c.streams.values()] for k, c in self._calls.items()}
        return {
            "anchored": True,
            "role": "expc",
            "running": True,
            "address": self.settings.address,
            "suites": list(self.suites),
            "calls": calls,
            "rejected": self.rejected,
            "pinholes_sent": self.pinholes_sent,
            "totals": stats["totals"],
            "worker": stats["worker"],
        }

    # -- offers -----------------------------------------------------------------------------------

    def _plan_offer(self, sd: SessionDescription, i: int, ingress: Side, st: _Stream | None) -> _Offer | None:
        """What C will do with one offered m= line, or None to refuse it (port 0 onwards)."""
        m = sd.media[i]
        if m.port == 0:
            return None
        if ingress == "outside":
            if m.proto not in _SECURE:
                return None  # all media on client <-> E <-> C is SRTP (spec §7)
            theirs = negotiate(m.crypto, self.suites)
            if theirs is None:
                return None
            ours = self._own_key(st, "outside", theirs.suite, theirs.tag)
            return _Offer(sd.media_remote(i), m.proto, _Keys(theirs, ours))
        if m.proto in _PLAIN:
            inside_theirs = inside_ours = None
        elif m.proto in _SECURE:
            inside_theirs = negotiate(m.crypto, self.suites)
            if inside_theirs is None:
                return None
            inside_ours = self._own_key(st, "inside", inside_theirs.suite, inside_theirs.tag)
        else:
            return None
        offered = {
            tag: self._own_key(st, "outside", suite, tag) for tag, suite in enumerate(self.suites, start=1)
        }
        keys = _Keys(None, None, inside_theirs, inside_ours)
        return _Offer(sd.media_remote(i), m.proto, keys, offered)

    def _own_key(self, st: _Stream | None, leg: str, suite: str, tag: int) -> CryptoAttribute:
        """C's key for ``suite`` on one leg: fresh for a new stream, kept for the call's life."""
        mine = None if st is None else (st.own_outside if leg == "outside" else st.own_inside)
        attr = None if mine is None else mine.get(suite)
        if attr is None:
            attr = generate_crypto(tag, suite)
        return dataclasses.replace(attr, tag=tag)

    def _new_stream(self, call: str, i: int, m: MediaSection) -> _Stream:
        worker = self.worker
        out_rtp, out_rtcp = worker.bind_pair_now()
        try:
            in_rtp, in_rtcp = worker.bind_pair_now()
        except BaseException:
            worker.release_pair(out_rtp)
            raise
        clock = m.clock_rate() or (90000 if m.media == "video" else 8000)
        return _Stream(f"{call}#{i}", i, m.media, out_rtp, out_rtcp, in_rtp, in_rtcp, clock)

    def _outside_offer_rewrite(self, sd: SessionDescription, i: int, st: _Stream, plan: _Offer) -> None:
        """Towards the inside: plain RTP/AVP(F) on C's inside pair (spec §7)."""
        m = sd.media[i]
        self._point(sd, i, st.in_rtp, st.in_rtcp)
        m.set_proto(_SECURE[m.proto])
        m.set_crypto([])
        self._remember_keys(st, plan.keys)

    def _inside_offer_rewrite(self, sd: SessionDescription, i: int, st: _Stream, plan: _Offer) -> None:
        """Towards the client: RTP/SAVP(F), one a=crypto per allowed suite with C's keys."""
        m = sd.media[i]
        self._point(sd, i, st.out_rtp, st.out_rtcp)
        m.set_proto(_PLAIN.get(m.proto, m.proto))
        m.set_crypto(list(plan.offered.values()))
        for attr in plan.offered.values():
            st.own_outside.setdefault(attr.suite, attr)
        self._remember_keys(st, plan.keys)

    def _remember_keys(self, st: _Stream, keys: _Keys) -> None:
        if keys.outside_ours is not None:
            st.own_outside.setdefault(keys.outside_ours.suite, keys.outside_ours)
        if keys.inside_ours is not None:
            st.own_inside.setdefault(keys.inside_ours.suite, keys.inside_ours)

    # -- answers ----------------------------------------------------------------------------------

    def _answer_keys(self, m: MediaSection, plan: _Offer, ingress: Side) -> _Keys:
        """The stream's keys once this answer is accepted; ``MediaError`` if it cannot be."""
        if ingress == "inside":
            return plan.keys  # C offered plain RTP inside: nothing to learn from the far end
        for attr in m.crypto:  # RFC 4568 §7.1.2: the answer names the tag of the chosen offer
            offered = plan.offered.get(attr.tag)
            if offered is not None and offered.suite == attr.suite:
                check_usable(attr)
                return dataclasses.replace(plan.keys, outside_theirs=attr, outside_ours=offered)
        raise MediaError("the client's answer accepts none of the a=crypto lines C offered")

    def _outside_answer_rewrite(
        self, sd: SessionDescription, i: int, st: _Stream, plan: _Offer, keys: _Keys
    ) -> None:
        """Towards the client: C's outside pair, SAVP, C's own key under the chosen tag."""
        m = sd.media[i]
        self._point(sd, i, st.out_rtp, st.out_rtcp)
        m.set_proto(plan.proto)
        assert keys.outside_ours is not None
        m.set_crypto([keys.outside_ours])

    def _inside_answer_rewrite(
        self, sd: SessionDescription, i: int, st: _Stream, plan: _Offer, keys: _Keys
    ) -> None:
        """Towards the inside: plain RTP, or SAVP with C's inside key if the far end offered SRTP."""
        m = sd.media[i]
        self._point(sd, i, st.in_rtp, st.in_rtcp)
        m.set_proto(plan.proto)
        m.set_crypto([] if keys.inside_ours is None else [keys.inside_ours])

    # -- the relay --------------------------------------------------------------------------------

    def _apply(self, st: _Stream, e_remote: Remote, far_remote: Remote, keys: _Keys) -> None:
        worker = self.worker
        far = None if far_remote[0][0] in _UNSPECIFIED else far_remote
        e = None if e_remote[0][0] in _UNSPECIFIED else e_remote
        if not st.in_table:
            worker.add_stream(
                st.stream_id,
                LegSpec.dedicated(
                    st.out_rtp,
                    st.out_rtcp,
                    latch=False,
                    remote_rtp=None if e is None else e[0],
                    remote_rtcp=None if e is None else e[1],
                ),
                LegSpec.dedicated(
                    st.in_rtp,
                    st.in_rtcp,
                    latch=True,
                    expected_ip=None if far is None else far[0][0],
                    remote_rtp=None if far is None else far[0],
                    remote_rtcp=None if far is None else far[1],
                ),
                clock_rate=st.clock_rate,
                inactivity_timeout_s=self.inactivity_timeout_s,
            )
            st.in_table = True
        else:
            table = worker.table
            if e_remote != st.e_remote:
                lg = table.get_stream(st.stream_id).legs[OUTSIDE_LEG]
                lg.rtp.set_remote(None if e is None else e[0])
                lg.rtcp.set_remote(None if e is None else e[1])
            if far_remote != st.far_remote:
                table.relatch(st.stream_id, INSIDE_LEG, *(far or (None, None)))
            table.get_stream(st.stream_id).last_seen = worker.time()  # an answer is activity
        st.e_remote, st.far_remote = e_remote, far_remote
        self._set_keys(st, keys)

    def _set_keys(self, st: _Stream, keys: _Keys) -> None:
        assert keys.outside_theirs is not None and keys.outside_ours is not None
        out_in = st.context(keys.outside_theirs, Direction.INBOUND)
        out_out = st.context(keys.outside_ours, Direction.OUTBOUND)
        in_in = None if keys.inside_theirs is None else st.context(keys.inside_theirs, Direction.INBOUND)
        in_out = None if keys.inside_ours is None else st.context(keys.inside_ours, Direction.OUTBOUND)
        if st.transcoders:
            for leg in (OUTSIDE_LEG, INSIDE_LEG):
                st.auth_failures_retired[leg] += st.transcoders[leg].auth_failures
        # Outside -> inside: unprotect with the client's key, protect with C's inside key (if any).
        # Inside -> outside: unprotect with the far end's key (if any), protect with C's key.
        st.transcoders = [SrtpTranscoder(out_in, in_out), SrtpTranscoder(in_in, out_out)]
        table = self.worker.table
        table.set_transcoder(st.stream_id, OUTSIDE_LEG, st.transcoders[OUTSIDE_LEG])
        table.set_transcoder(st.stream_id, INSIDE_LEG, st.transcoders[INSIDE_LEG])
        used = {id(c) for c in (out_in, out_out, in_in, in_out) if c is not None}
        for k in [k for k, c in st.contexts.items() if id(c) not in used]:
            del st.contexts[k]
        st.keys = keys

    def _send_first(self, st: _Stream, e_remote: Remote, ours: CryptoAttribute | None) -> None:
        """One SRTP and one SRTCP packet towards E's demux ports: opens the DMZ pinhole."""
        if ours is None or e_remote == st.pinholed or e_remote[0][0] in _UNSPECIFIED:
            return
        ctx = st.context(ours, Direction.OUTBOUND)
        ssrc = secrets.randbits(32)
        seq, ts = secrets.randbits(15), secrets.randbits(32)
        cn = struct.pack("!BBHII", 0x80, 13, seq, ts, ssrc) + bytes([127])  # RFC 3389 silence
        rr = struct.pack("!BBHI", 0x80, 201, 1, ssrc)  # RFC 3550 §6.4.2, no report blocks
        worker = self.worker
        worker.send(st.out_rtp, ctx.protect(cn), e_remote[0])
        worker.send(st.out_rtcp, ctx.protect_rtcp(rr), e_remote[1])
        st.pinholed = e_remote
        self.pinholes_sent += 1

    # -- shared -----------------------------------------------------------------------------------

    def _point(self, sd: SessionDescription, i: int, rtp: int, rtcp: int) -> None:
        m = sd.media[i]
        sd.set_media_address(i, self.settings.address)
        m.set_port(rtp)
        m.set_rtcp(RtcpAttribute(rtcp))
        m.set_attribute("rtcp-mux", None, present=False)

    def _drop_stream(self, state: _Call, index: int) -> None:
        st = state.streams.pop(index, None)
        if st is None:
            return
        self._by_stream.pop(st.stream_id, None)
        worker = self.worker
        if st.in_table and st.stream_id in worker.table:
            worker.remove_stream(st.stream_id)  # frees both pairs
        else:
            worker.release_pair(st.out_rtp)
            worker.release_pair(st.in_rtp)

    def _on_timeout(self, event: StreamTimedOut) -> None:
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

    def _stream_snapshot(self, st: _Stream) -> dict[str, Any]:
        legs: list[dict[str, Any]] = []
        if st.in_table:
            legs = self.worker.table.get_stream(st.stream_id).snapshot()["legs"]
        out: dict[str, Any] = {
            "index": st.index,
            "media": st.media,
            "stream_id": st.stream_id,
            "state": "relaying" if st.in_table else "offered",
            "outside_srtp": None if st.keys.outside_ours is None else st.keys.outside_ours.suite,
            "inside_srtp": None if st.keys.inside_ours is None else st.keys.inside_ours.suite,
        }
        for name, leg, port, remote in (
            ("outside", OUTSIDE_LEG, st.out_rtp, st.e_remote),
            ("inside", INSIDE_LEG, st.in_rtp, st.far_remote),
        ):
            snap = legs[leg] if legs else None
            out[name] = {
                "local_port": port,
                "sdp_remote": None if remote is None else _fmt(remote[0]),
                "remote": None if snap is None else snap["remote_rtp"],
                "packets": 0 if snap is None else snap["rx_packets"],
                "bytes": 0 if snap is None else snap["rx_bytes"],
                "packets_sent": 0 if snap is None else snap["tx_packets"],
                "bytes_sent": 0 if snap is None else snap["tx_bytes"],
                "lost": 0 if snap is None else snap["rtp"]["lost"],
                "jitter_ms": 0.0 if snap is None else snap["rtp"]["jitter_ms"],
                "srtp_auth_failures": st.auth_failures(leg),
                "drops": {} if snap is None else snap["drops"],
            }
        return out


def _fmt(addr: Addr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
