"""Calls of a load run (spec §5, §7): placing them at a rate, holding them with SRTP media both
ways, answering them when the far end is another load user, and accounting their media.

C is a B2BUA, so a called load user sees a different Call-ID than its caller sent; `LoadCall`
ties the two legs together (the placer marks the callee as `expecting` the call). Media of every
leg goes through the run's single `MediaEngine`; a call costs one task for its whole life.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from edge.sip.address import Via
from edge.sip.dialog import Dialog
from edge.sip.message import Request, Response, make_response
from media_relay.sdp import SessionDescription
from media_relay.srtp import CryptoAttribute, SdesError, generate_crypto
from mra_client.call import make_invite, offer_sdp
from mra_client.edge_http import StepError
from mra_client.load.media import MediaEngine, MediaStream
from mra_client.load.settings import LoadSettings
from mra_client.load.stats import CallMedia, LoadStats, error_kind
from mra_client.load.users import LoadUser, OnlineUsers, UserState
from mra_client.sip_ua import MraSipUa

INVITE_TIMEOUT_S = 15.0
BYE_TIMEOUT_S = 10.0
MEDIA_DRAIN_S = 0.3
"""After both ends stop sending, how long packets in flight may still arrive and count (before BYE,
so that tearing down the relays does not turn them into loss)."""


@dataclass(eq=False)
class LoadCall:
    number: int
    caller: int
    target: str
    callee: int | None = None
    """The called load user, for calls between users (None: a number such as the echo 9999)."""
    setup_ms: float = 0.0
    a_handle: int | None = None
    a_stream: MediaStream | None = None
    b_handle: int | None = None
    b_stream: MediaStream | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the far end hung up (a BYE reached either leg)."""
    finished: bool = False


def parse_media(body: bytes, step: str) -> tuple[tuple[str, int], CryptoAttribute]:
    """Where to send and the peer's key, from an SDP offer or answer (first audio section)."""
    try:
        sdp = SessionDescription.parse(body)
        media = sdp.media[0]
        conn = media.connection or sdp.session.connection
        cryptos = media.crypto
    except (ValueError, IndexError) as exc:
        raise StepError(step, f"unusable SDP: {exc}") from exc
    if conn is None or not cryptos:
        raise StepError(step, "SDP without connection address or a=crypto")
    return (conn.address, media.port), cryptos[0]


def answer_response(sip: MraSipUa, invite: Request, port: int, ours: CryptoAttribute) -> Response:
    """200 OK with our SDES answer; Record-Route copied (RFC 3261 §12.1.1) so the dialog routes back."""
    resp = make_response(invite, 200, "OK")
    for rr in invite.headers.get_all("record-route"):
        resp.headers.add("Record-Route", rr)
    resp.headers.add("Contact", f"<sip:{sip.dn}@{sip.local[0]}:{sip.local[1]};transport=tls>")
    resp.headers.add("Content-Type", "application/sdp")
    resp.body = offer_sdp(sip.local[0], port, ours, int.from_bytes(os.urandom(4), "big"))
    return resp


async def send_bye(sip: MraSipUa, dialog: Dialog, via: Via) -> int:
    try:
        return (await sip.transact(dialog.make_request("BYE", via=via), BYE_TIMEOUT_S)).status_code
    except (TimeoutError, ConnectionError):
        return 0


class CallDriver:
    """Places, holds, answers and accounts the calls of one run."""

    def __init__(
        self,
        *,
        settings: LoadSettings,
        stats: LoadStats,
        media: MediaEngine,
        users: list[LoadUser],
        online: OnlineUsers,
        stop: asyncio.Event,
        error: Callable[[str, str], None],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self.settings = settings
        self.stats = stats
        self.media = media
        self.users = users
        self.online = online
        self.stop = stop
        self.error = error
        self.spawn = spawn

    # -- caller side ---------------------------------------------------------------------------

    def place(self, number: int) -> LoadCall | None:
        """Pick an idle caller (and an idle callee for calls between users) and start a call."""
        between_users = self.settings.call_to == "users"
        caller = self.online.pick(idle=True)
        callee = self.online.pick(idle=True, exclude=caller.index) if caller and between_users else None
        if caller is None or (between_users and callee is None):
            self.error(
                "call not placed: no idle user", "call not placed: every signed-in user is busy or offline"
            )
            return None
        call = LoadCall(
            number=number, caller=caller.index, target=callee.dn if callee else self.settings.call_to
        )
        caller.busy = True
        if callee is not None:
            call.callee = callee.index
            callee.busy = True
            callee.expecting = call
        self.spawn(self.run(call))
        return call

    async def run(self, call: LoadCall) -> None:
        caller = self.users[call.caller]
        self.stats.call_started()
        ok = False
        try:
            ok = await self._flow(call, caller)
        except StepError as exc:
            self.error(error_kind(exc.step, exc.detail), f"{exc.step}: {exc.detail}")
        except (ConnectionError, OSError, SdesError) as exc:
            self.error(f"INVITE: {type(exc).__name__}", f"INVITE: {exc or type(exc).__name__}")
        finally:
            self._end(call, caller)
            self.stats.call_ended(ok)

    async def _flow(self, call: LoadCall, caller: LoadUser) -> bool:
        sip = caller.sip
        if sip is None:
            raise StepError("INVITE", "caller signed out before the call")
        handle, port = await self.media.open(sip.local[0])
        call.a_handle = handle
        ours = generate_crypto(1, self.settings.suite)
        invite = make_invite(sip, call.target, port, ours, kind="load")
        caller.dialogs[invite.call_id or ""] = call
        started = time.perf_counter()
        try:
            resp = await sip.transact(invite, INVITE_TIMEOUT_S)
        except (TimeoutError, ConnectionError) as exc:
            raise StepError("INVITE", f"no answer from {call.target}: {exc or 'timeout'}") from exc
        if resp.status_code != 200:
            raise StepError("INVITE", f"{resp.status_code} {resp.reason}")
        call.setup_ms = (time.perf_counter() - started) * 1000.0
        self.stats.setup_ms.append(call.setup_ms)
        dialog = Dialog.from_uac(invite, resp)
        via = Via(sip.local[0], sip.local[1], "TLS")
        sip.send(dialog.make_request("ACK", via=via))
        try:
            remote, theirs = parse_media(resp.body, "INVITE")
            stream = MediaStream(ours, theirs, remote, time.perf_counter(), self.stats.latency)
        except (StepError, SdesError):
            await send_bye(sip, dialog, via)
            raise
        call.a_stream = stream
        self.media.start(handle, stream)
        await self._hold(call)
        for h in (call.a_handle, call.b_handle):
            if h is not None:
                self.media.stop_sending(h)
        await asyncio.sleep(MEDIA_DRAIN_S)
        bye_status = 200
        if not call.ended.is_set():
            bye_status = await send_bye(sip, dialog, via)
            if bye_status != 200:
                self.error(f"BYE {bye_status or 'timeout'}", f"BYE: {bye_status or 'no answer within 10 s'}")
        return self._account(call) and bye_status == 200

    async def _hold(self, call: LoadCall) -> None:
        waits = {asyncio.ensure_future(call.ended.wait()), asyncio.ensure_future(self.stop.wait())}
        try:
            await asyncio.wait(waits, timeout=self.settings.hold_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _account(self, call: LoadCall) -> bool:
        a, b = call.a_stream, call.b_stream
        if a is None:
            return False
        streams = [s for s in (a, b) if s is not None]
        sent = sum(s.sent for s in streams)
        received = sum(s.received for s in streams)
        if call.callee is None:  # the echo returns our own stream
            lost = max(0, a.sent - a.received)
        else:  # each end receives what the other sent
            b_sent, b_received = (b.sent, b.received) if b else (0, 0)
            lost = max(0, a.sent - b_received) + max(0, b_sent - a.received)
        mismatched = sum(s.mismatched for s in streams)
        auth = sum(s.auth_failures for s in streams)
        self.stats.media_sent += sent
        self.stats.media_received += received
        self.stats.media_mismatched += mismatched
        self.stats.media_auth_failures += auth
        self.stats.media_skipped += sum(s.skipped for s in streams)
        self.stats.call_media.append(
            CallMedia(
                call=call.number,
                target=call.target,
                sent=sent,
                received=received,
                lost=lost,
                loss_pct=round(100.0 * lost / sent, 3) if sent else 0.0,
                jitter_ms=max(s.jitter_ms for s in streams),
                mismatched=mismatched,
                auth_failures=auth,
            )
        )
        where = f"call {call.number} to {call.target}"
        if received == 0:
            self.error("media: nothing received", f"{where}: no SRTP packet came back")
            return False
        if call.callee is not None and (b is None or not b.received or not a.received):
            self.error("media: one way", f"{where}: media flowed one way only")
            return False
        return True

    def _end(self, call: LoadCall, caller: LoadUser) -> None:
        call.finished = True
        for handle in (call.a_handle, call.b_handle):
            if handle is not None:
                self.media.close(handle)
        parties = [caller] + ([self.users[call.callee]] if call.callee is not None else [])
        for user in parties:
            user.busy = False
            if user.expecting is call:
                user.expecting = None
            for key in [k for k, v in user.dialogs.items() if v is call]:
                del user.dialogs[key]

    # -- called side and in-dialog requests -------------------------------------------------------

    def on_request(self, user: LoadUser, req: Request) -> None:
        """Requests E sends down a user's flow (MraSipUa.on_request): INVITE, BYE, …"""
        sip = user.sip
        if sip is None:
            return
        try:
            if req.method == "INVITE" and req.to_tag is None:
                self.spawn(self._answer(user, sip, req))
                return
            if req.method == "ACK":
                return
            call = user.dialogs.get(req.call_id or "")
            if req.method == "BYE" and call is not None:
                sip.send(make_response(req, 200, "OK"))
                if call.b_handle is not None and call.callee == user.index:
                    self.media.stop_sending(call.b_handle)
                call.ended.set()
            elif call is None and req.method != "CANCEL":
                sip.send(make_response(req, 481, "Call/Transaction Does Not Exist"))
            else:
                sip.send(make_response(req, 200, "OK"))
        except ConnectionError:
            pass  # the flow went away; the engine counts the lost flow

    async def _answer(self, user: LoadUser, sip: MraSipUa, invite: Request) -> None:
        try:
            await self._answer_flow(user, sip, invite)
        except ConnectionError:
            pass  # the flow went away; the engine counts the lost flow

    async def _answer_flow(self, user: LoadUser, sip: MraSipUa, invite: Request) -> None:
        """A called user answers at once with its own SDES key and starts sending."""
        call = user.expecting
        if call is None or call.finished or user.state is not UserState.ONLINE:
            sip.send(make_response(invite, 486, "Busy Here"))
            self.error("INVITE received: unexpected", "a call arrived for a user the run did not call")
            return
        user.expecting = None
        try:
            remote, theirs = parse_media(invite.body, "answer")
            ours = generate_crypto(theirs.tag, theirs.suite)
        except (StepError, SdesError) as exc:
            sip.send(make_response(invite, 488, "Not Acceptable Here"))
            self.error("answer: bad offer", f"answer: {exc}")
            return
        handle, port = await self.media.open(sip.local[0])
        if call.finished:  # the caller gave up while we opened the socket
            self.media.close(handle)
            sip.send(make_response(invite, 487, "Request Terminated"))
            return
        call.b_handle = handle
        resp = answer_response(sip, invite, port, ours)
        user.dialogs[invite.call_id or ""] = call
        sip.send(resp)
        stream = MediaStream(ours, theirs, remote, time.perf_counter(), self.stats.latency)
        call.b_stream = stream
        self.media.start(handle, stream)
        self.stats.calls_answered_here += 1
