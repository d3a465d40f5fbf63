"""XMPP as a Jabber client does it over MRA (spec §6): to the edge's xmppEdgeServer on 5222,
STARTTLS (E's certificate), SASL, bind, roster, presence, 1:1 chat — with slixmpp."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import slixmpp

from mra_client.edge_http import StepError


class MraXmppClient(slixmpp.ClientXMPP):
    def __init__(self, jid: str, password: str, ca_file: str) -> None:
        super().__init__(jid, password)
        self.ca_certs = Path(ca_file)
        self.enable_plaintext = False
        self.enable_starttls = True
        self.enable_direct_tls = False
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self.presences: asyncio.Queue[Any] = asyncio.Queue()
        self.started = asyncio.Event()
        self.auth_failed = asyncio.Event()
        self.ended = asyncio.Event()
        self.add_event_handler("session_start", self._on_start)
        self.add_event_handler("message", self.messages.put_nowait)
        self.add_event_handler("presence", self.presences.put_nowait)
        self.add_event_handler("failed_auth", lambda _s: self.auth_failed.set())
        self.add_event_handler("disconnected", lambda _r: self.ended.set())

    async def _on_start(self, _event: Any) -> None:
        await self.get_roster(timeout=10)
        self.send_presence()
        self.started.set()

    async def sign_in(self, host: str, port: int, timeout_s: float = 10.0) -> float:
        started = time.perf_counter()
        self.connect(host, port)
        failed = asyncio.ensure_future(self.auth_failed.wait())
        ended = asyncio.ensure_future(self.ended.wait())
        ok = asyncio.ensure_future(self.started.wait())
        done, pending = await asyncio.wait(
            {failed, ended, ok}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        if ok in done:
            return round((time.perf_counter() - started) * 1000, 2)
        await self.sign_out()
        if failed in done:
            raise StepError("XMPP sign-in", "SASL failure: not-authorized")
        if ended in done:
            raise StepError("XMPP sign-in", "stream closed by the edge")
        raise StepError("XMPP sign-in", f"no session within {timeout_s:.0f} s")

    async def wait_message(self, timeout_s: float = 10.0) -> Any:
        return await asyncio.wait_for(self.messages.get(), timeout_s)

    async def sign_out(self) -> None:
        self.cancel_connection_attempt()
        if self.transport is not None and not self.ended.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.disconnect(wait=2.0), 5.0)
                await asyncio.wait_for(self.ended.wait(), 5.0)
        filters = getattr(self, "_run_out_filters", None)
        if filters is not None and not filters.done():
            filters.cancel()
            await asyncio.gather(filters, return_exceptions=True)
