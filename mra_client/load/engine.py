"""`edge load`: N MRA users in one asyncio process (spec §4-§7 as a Jabber client does them).

Each user signs in exactly like `edge client signin` (discovery, get_edge_config, UDS, TFTP, SIP
REGISTER over TLS with the preloaded route, STUN keepalive) and then opens an XMPP session with
presence (`--sip-only`, a load-test shortcut for registration scale, skips the per-user HTTP
steps: `sip_only.py`). Users hold their registrations (refresh at half the granted expiry, STUN
every 30 s), place SRTP calls at a rate with a hold time, and chat at a rate. Everything is shared: one TLS
context, one deadline heap for all periodic work (`timers`), one media ticker for all streams
(`media`), a task only per sign-in, per call and per short periodic job.

The run is bounded: users, calls and the duration are finite, and the stop sequence (hang up,
sign out) has its own deadline. SIGINT/SIGTERM start that stop sequence early; a second one
cuts it short. The report is built from `LoadStats` either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import re
import signal
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from mra_client.edge_http import StepError
from mra_client.load.calls import CallDriver
from mra_client.load.media import MediaEngine
from mra_client.load.settings import LoadSettings
from mra_client.load.sip_only import SipOnlySignIn
from mra_client.load.stats import LoadStats, error_kind
from mra_client.load.timers import Job, Timers
from mra_client.load.users import LoadUser, OnlineUsers, UserState
from mra_client.signin import ClientSettings, Ladder, SignedIn, sign_in
from mra_client.xmpp_lean import ChatReceived, LeanXmppSession

log = logging.getLogger(__name__)

REFRESH_TIMEOUT_S = 10.0
REFRESH_RETRY_S = 10.0
FREEZE_EVERY_SIGNINS = 500
_MESSAGE_MARK = re.compile(r"^load #(\d+) ")


class LoadEngine:
    def __init__(
        self,
        settings: LoadSettings,
        client: ClientSettings,
        *,
        on_sample: Callable[[LoadEngine], None] | None = None,
        seed: int | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.on_sample = on_sample
        self.ssl = client.ssl_context or ssl.create_default_context(cafile=client.ca_file)
        self.stats = LoadStats(started_at=time.perf_counter())
        self.users = [LoadUser(i, settings.username(i), settings.password(i)) for i in range(settings.users)]
        self.timers = Timers()
        self.media = MediaEngine()
        self.rng = random.Random(seed)
        self.stop_reason = ""
        self.started_wall = time.time()
        self.elapsed_s = 0.0
        self.online = OnlineUsers(self.users, self.rng)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._signins: set[asyncio.Task[Any]] = set()
        self._calls: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._ramp_done = asyncio.Event()
        self.calls = CallDriver(
            settings=settings,
            stats=self.stats,
            media=self.media,
            users=self.users,
            online=self.online,
            stop=self._stop,
            error=self._error,
            spawn=lambda coro: self._spawn(coro, self._calls),
        )
        self._messages_pending: dict[int, float] = {}
        self._message_seq = 0
        self._sip_only = SipOnlySignIn() if settings.sip_only else None

    # -- bookkeeping ------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], group: set[asyncio.Task[Any]] | None = None) -> None:
        task = asyncio.ensure_future(coro)
        owner = self._tasks if group is None else group
        owner.add(task)
        task.add_done_callback(owner.discard)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # a bug, not a protocol failure: counted and logged, never a traceback
            self._error("internal", f"{type(exc).__name__}: {exc}")
            log.debug("load task failed", exc_info=exc)

    def _error(self, kind: str, text: str) -> None:
        self.stats.error(kind, text, time.perf_counter())

    def _step_error(self, exc: StepError, step: str | None = None) -> None:
        name = step or exc.step
        self._error(error_kind(name, exc.detail), f"{name}: {exc.detail}")

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Errors asyncio would print with a traceback (a callback that raised, a transport
        error) are counted in the report instead; the details go to the debug log."""
        exc = context.get("exception")
        text = f"{type(exc).__name__}: {exc}" if exc is not None else str(context.get("message", "?"))
        self._error("internal", text)
        log.debug("event loop error: %s", context.get("message"), exc_info=exc)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self, reason: str) -> None:
        """Start the stop sequence (idempotent); a second request while stopping hurries it."""
        if self._stop.is_set():
            self._force.set()
            return
        self.stop_reason = reason
        self._stop.set()

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> LoadStats:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self.stats.started_at = started
        self.started_wall = time.time()
        loop.set_exception_handler(self._loop_exception)
        installed = []
        for sig, name in ((signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.request_stop, f"interrupted ({name})")
                installed.append(sig)
        background: set[asyncio.Task[Any]] = set()
        for coro in (
            self._sampler(),
            self._lag_probe(),
            self._housekeeping(),
            self._ramp(),
            self._place_calls(),
            self._chat(),
        ):
            self._spawn(coro, background)
        try:
            remaining = started + self.settings.duration_s - time.perf_counter()
            try:
                await asyncio.wait_for(self._stop.wait(), max(0.0, remaining))
            except TimeoutError:
                self.stop_reason = f"duration reached ({self.settings.duration_s:g} s)"
                self._stop.set()
            await self._shutdown(background)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            gc.unfreeze()
        self.elapsed_s = round(time.perf_counter() - started, 3)
        return self.stats

    async def _bounded(self, aws: set[asyncio.Task[Any]], timeout_s: float) -> None:
        """Wait for tasks until all done, `timeout_s`, or a second Ctrl-C; cancel what is left."""
        deadline = time.perf_counter() + timeout_s
        force = asyncio.ensure_future(self._force.wait())
        try:
            while not self._force.is_set() and any(not t.done() for t in aws):
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                pending = {t for t in aws if not t.done()}
                await asyncio.wait({*pending, force}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            force.cancel()
        for task in aws:
            if not task.done():
                task.cancel()
        if aws:
            await asyncio.gather(*aws, return_exceptions=True)

    async def _shutdown(self, background: set[asyncio.Task[Any]]) -> None:
        limit = self.settings.stop_timeout_s
        deadline = time.perf_counter() + limit
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        # Sign-ins in flight finish (or are cut) before sign-out, so nobody stays registered.
        await self._bounded(set(self._signins), min(10.0, limit))
        await self._bounded(set(self._calls), max(1.0, deadline - time.perf_counter()))
        await self._bounded(set(self._tasks), 2.0)  # periodic jobs
        for _ in range(20):  # chats still in flight get up to 2 s to arrive
            if not self._messages_pending:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0)
        users = [u for u in self.users if u.session is not None or u.xmpp is not None]
        sem = asyncio.Semaphore(200)

        async def out(user: LoadUser) -> None:
            async with sem:
                await self._sign_out(user)

        outs = {asyncio.ensure_future(out(u)) for u in users}
        await self._bounded(outs, max(1.0, deadline - time.perf_counter()))
        # Whatever did not sign out in time is closed hard (still counted as signed out by us).
        for user in users:
            if user.session is not None or user.xmpp is not None:
                await self._close_user(user)
        await self.media.aclose()
        self.stats.sample(time.perf_counter(), self.media.live_totals())
        if self.on_sample is not None:  # the live display ends on the signed-out state
            self.on_sample(self)

    # -- periodic ------------------------------------------------------------------------------

    async def _sampler(self) -> None:
        interval = self.settings.sample_interval_s
        next_at = time.perf_counter()
        while True:
            self.stats.sample(time.perf_counter(), self.media.live_totals())
            if self.on_sample is not None:
                self.on_sample(self)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    async def _lag_probe(self, interval_s: float = 0.1) -> None:
        """How late a 100 ms timer fires: the generator's own headroom (a busy loop shows here
        before it shows as loss or jitter that would wrongly be blamed on the edge)."""
        while True:
            due = time.perf_counter() + interval_s
            await asyncio.sleep(interval_s)
            self.stats.lagged(max(0.0, time.perf_counter() - due) * 1000.0)

    async def _housekeeping(self) -> None:
        while True:
            deadline = self.timers.next_deadline()
            wait = 0.5 if deadline is None else min(0.5, deadline - time.perf_counter())
            if wait > 0:
                await asyncio.sleep(wait)
            for due in self.timers.pop_due(time.perf_counter()):
                user = self.users[due.user]
                if user.generation != due.generation or user.state is not UserState.ONLINE:
                    continue
                if due.job is Job.REGISTER_REFRESH:
                    self._spawn(self._refresh(user))
                elif due.job is Job.STUN_KEEPALIVE:
                    self._spawn(self._stun(user))
                elif due.job is Job.XMPP_KEEPALIVE:
                    self._xmpp_keepalive(user)

    def _jittered(self, interval_s: float) -> float:
        return time.perf_counter() + interval_s * self.rng.uniform(0.9, 1.1)

    async def _refresh(self, user: LoadUser) -> None:
        sip = user.sip
        if sip is None:
            return
        try:
            reg = await sip.register(self.settings.register_expires_s, timeout_s=REFRESH_TIMEOUT_S)
        except StepError as exc:
            self.stats.refreshes_failed += 1
            self._step_error(exc, "REGISTER refresh")
            if user.registered:
                user.registered = False
                self.stats.registered(-1)
            self.timers.schedule(
                self._jittered(REFRESH_RETRY_S), user.index, Job.REGISTER_REFRESH, user.generation
            )
            return
        self.stats.refreshes_ok += 1
        if not user.registered and user.state is UserState.ONLINE:
            user.registered = True
            self.stats.registered(+1)
        self._schedule_refresh(user, reg.expires)

    def _schedule_refresh(self, user: LoadUser, granted_s: int) -> None:
        # Refresh at half the granted expiry, as Jabber does; never more often than every 5 s.
        interval = max(5.0, (granted_s or self.settings.register_expires_s) / 2)
        self.timers.schedule(self._jittered(interval), user.index, Job.REGISTER_REFRESH, user.generation)

    async def _stun(self, user: LoadUser) -> None:
        sip = user.sip
        if sip is None:
            return
        self.stats.stun_sent += 1
        try:
            mapped = await sip.stun_keepalive()
        except ConnectionError as exc:
            mapped = None
            self._error("STUN keepalive: flow closed", f"STUN keepalive: {exc}")
        else:
            if mapped is None:
                self._error(
                    "STUN keepalive: no answer", "STUN keepalive: no answer within 3 s (path to UCM down?)"
                )
        if mapped is not None:
            self.stats.stun_answered += 1
        self.timers.schedule(
            self._jittered(self.settings.stun_interval_s), user.index, Job.STUN_KEEPALIVE, user.generation
        )

    def _xmpp_keepalive(self, user: LoadUser) -> None:
        if user.xmpp is not None:
            with contextlib.suppress(ConnectionError):
                user.xmpp.keepalive()
        self.timers.schedule(
            self._jittered(self.settings.xmpp_keepalive_s), user.index, Job.XMPP_KEEPALIVE, user.generation
        )

    # -- sign-in / sign-out ----------------------------------------------------------------------

    async def _ramp(self) -> None:
        gate = asyncio.Semaphore(self.settings.signin_concurrency)
        interval = 1.0 / self.settings.signin_rate_per_s
        start = time.perf_counter()
        try:
            for user in self.users:
                delay = start + user.index * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await gate.acquire()
                if self.stopping:
                    break

                async def one(u: LoadUser) -> None:
                    try:
                        await self._sign_in(u)
                    finally:
                        gate.release()

                self._spawn(one(user), self._signins)
            while self._signins:
                await asyncio.wait(set(self._signins))
        finally:
            gc.freeze()
            self._ramp_done.set()

    async def _sign_in(self, user: LoadUser) -> None:
        self.stats.signins_attempted += 1
        user.state = UserState.SIGNING_IN
        started = time.perf_counter()
        settings = replace(self.client, username=user.username, password=user.password, ssl_context=self.ssl)
        ladder = Ladder()
        try:
            if self._sip_only is not None:
                session = await self._sip_only(settings, ladder)
            else:
                session = await sign_in(settings, ladder)
        except StepError as exc:
            return self._signin_failed(user, exc)
        except Exception as exc:  # e.g. aiohttp's ServerDisconnectedError (not an OSError)
            return self._signin_failed(user, StepError("sign-in", f"{type(exc).__name__}: {exc}"))
        # HTTPS is done once signed in; SIP and XMPP carry the session from here (frees E's 8443).
        await session.http.__aexit__(None, None, None)
        user.session = session
        user.dn = session.dn
        sip = session.sip
        assert sip is not None
        sip.on_request = lambda req: self.calls.on_request(user, req)
        sip.on_closed = lambda reason: self._on_flow_lost(user, reason)
        user.registered = True
        self.stats.registered(+1)
        self.stats.stun_sent += 1  # the sign-in ladder's own keepalive step, answered
        self.stats.stun_answered += 1
        if self.settings.xmpp:
            try:
                await self._xmpp_sign_in(user, session)
            except StepError as exc:
                await self._unregister(user)  # a client that cannot chat signs out and retries later
                await self._close_user(user)
                return self._signin_failed(user, exc)
        user.state = UserState.ONLINE
        self.online.set(user, True)
        self.stats.signins_ok += 1
        if self.stats.signins_ok % FREEZE_EVERY_SIGNINS == 0:
            # Signed-in users live until the end of the run: take them out of the cyclic GC's
            # full collections, which otherwise walk every user's objects again and again
            # (measured at 10,000 users: 21-32 full collections of up to 1-2.5 s each, the
            # loop's worst lag; sign-ins then timed out at discovery). Cyclic garbage pending at
            # that moment is frozen with them: bounded, and freed with the process.
            gc.freeze()
        self.stats.signin_ms.append((time.perf_counter() - started) * 1000.0)
        self._schedule_refresh(user, int(ladder.facts.get("registration", {}).get("expires", 0)))
        self.timers.schedule(
            self._jittered(self.settings.stun_interval_s), user.index, Job.STUN_KEEPALIVE, user.generation
        )
        if user.xmpp is not None:
            self.timers.schedule(
                self._jittered(self.settings.xmpp_keepalive_s),
                user.index,
                Job.XMPP_KEEPALIVE,
                user.generation,
            )
        return None

    def _signin_failed(self, user: LoadUser, exc: StepError) -> None:
        user.state = UserState.FAILED
        self.stats.signins_failed += 1
        self._step_error(exc)

    async def _xmpp_sign_in(self, user: LoadUser, session: SignedIn) -> None:
        if not session.config.xmpp_edge:
            raise StepError("XMPP sign-in", "no xmppEdgeServer in the edge config")
        xmpp = LeanXmppSession(
            username=user.username,
            password=user.password,
            domain=self.client.domain,
            resource=f"load{os.getpid()}",
            ssl_context=self.ssl,
            on_chat=lambda msg: self._on_chat(user, msg),
            on_closed=lambda reason: self._on_xmpp_lost(user, reason),
        )
        await xmpp.login(session.edge[2], session.config.xmpp_edge[0][1])
        user.xmpp = xmpp
        self.stats.xmpp_online(+1)

    def _on_flow_lost(self, user: LoadUser, reason: str) -> None:
        if user.state is not UserState.ONLINE:
            return
        self._error("SIP flow lost", f"SIP flow to E: {reason}")
        self._lose(user)

    def _on_xmpp_lost(self, user: LoadUser, reason: str) -> None:
        if user.xmpp is None:
            return
        self._error("XMPP stream lost", f"XMPP stream: {reason}")
        xmpp, user.xmpp = user.xmpp, None
        self.stats.xmpp_online(-1)
        self._spawn(xmpp.close())

    def _lose(self, user: LoadUser) -> None:
        user.state = UserState.LOST
        user.generation += 1
        self.online.set(user, False)
        if user.registered:
            user.registered = False
            self.stats.registered(-1)

    async def _sign_out(self, user: LoadUser) -> None:
        """REGISTER expires 0, `</stream:stream>`, close (what Jabber does on sign-out)."""
        was_online = user.state is UserState.ONLINE
        user.state = UserState.SIGNED_OUT
        user.generation += 1
        self.online.set(user, False)
        await self._unregister(user)
        await self._close_user(user)
        if was_online:
            self.stats.signed_out += 1

    async def _unregister(self, user: LoadUser) -> None:
        sip = user.sip
        if sip is not None and user.registered and sip.closed_reason is None:
            try:
                await sip.register(expires=0, timeout_s=5.0)
            except StepError as exc:
                self._step_error(exc, "REGISTER sign-out")

    async def _close_user(self, user: LoadUser) -> None:
        if user.registered:
            user.registered = False
            self.stats.registered(-1)
        if user.xmpp is not None:
            xmpp, user.xmpp = user.xmpp, None
            self.stats.xmpp_online(-1)
            await xmpp.close()
        session, user.session = user.session, None
        if session is not None:
            if session.sip is not None:
                await session.sip.close()
            await session.http.__aexit__(None, None, None)

    # -- calls ---------------------------------------------------------------------------------

    async def _place_calls(self) -> None:
        if not self.settings.calls:
            return
        await self._ramp_done.wait()
        interval = 1.0 / self.settings.call_rate_per_s
        start = time.perf_counter()
        for n in range(self.settings.calls):
            delay = start + n * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stopping:
                return
            self.calls.place(n + 1)

    # -- chat ------------------------------------------------------------------------------

    async def _chat(self) -> None:
        per_s = self.settings.messages_per_min / 60.0
        if per_s <= 0:
            return
        await self._ramp_done.wait()
        start = time.perf_counter()
        n = 0
        while not self.stopping:  # bounded by the run's duration
            n += 1
            delay = start + n / per_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            self._send_one_message()

    def _send_one_message(self) -> None:
        sender = self.online.pick(xmpp=True)
        receiver = self.online.pick(xmpp=True, exclude=sender.index) if sender else None
        if sender is None or receiver is None or sender.xmpp is None:
            self._error(
                "message not sent: no XMPP peer", "message not sent: fewer than 2 users online in XMPP"
            )
            return
        self._message_seq += 1
        seq = self._message_seq
        try:
            sender.xmpp.send_chat(
                f"{receiver.username}@{self.client.domain}", f"load #{seq} from {sender.username}"
            )
        except ConnectionError as exc:
            self.stats.messages_failed += 1
            self._error("message: stream closed", f"message: {exc}")
            return
        self.stats.messages_sent += 1
        self._messages_pending[seq] = time.perf_counter()

    def _on_chat(self, user: LoadUser, msg: ChatReceived) -> None:
        match = _MESSAGE_MARK.match(msg.body)
        if match is None:
            return
        sent_at = self._messages_pending.pop(int(match.group(1)), None)
        if sent_at is None:
            return
        self.stats.messages_received += 1
        self.stats.message_ms.add((time.perf_counter() - sent_at) * 1000.0)
