"""C's one HTTP client session to the inside servers carries every user's proxied requests, so it
must never keep cookies: a backend session cookie set for one user (UCM's JSESSIONID) would be
replayed on the next user's requests. A loopback aiohttp server stands in for the backend."""

from __future__ import annotations

import ssl

from aiohttp import web

from edge.dns.resolver import LabResolver
from edge_c.internal import make_session


class _Loopback(LabResolver):
    """Every name is 127.0.0.1 (a host name, not an IP literal: cookie jars ignore IP hosts)."""

    async def resolve_a(self, name: str) -> list[str]:
        return ["127.0.0.1"]


async def test_backend_cookies_are_not_replayed_across_requests() -> None:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.Response(text="ok")
        response.set_cookie("JSESSIONID", f"session-{len(seen)}")
        return response

    app = web.Application()
    app.router.add_get("/cucm-uds/user/alice", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    session = make_session(_Loopback("127.0.0.1", 53), ssl.create_default_context(), None)
    url = f"http://ucm1.example.com:{port}/cucm-uds/user/alice"
    try:
        async with session.get(url) as first:
            assert "JSESSIONID=session-1" in first.headers["Set-Cookie"]
        async with session.get(url, headers={"Cookie": "JSESSIONID=bobs-own"}) as second:
            assert second.status == 200
        async with session.get(url) as third:
            assert third.status == 200
    finally:
        await session.close()
        await runner.cleanup()
    # Nothing the backend set comes back; a client's own Cookie header passes through as sent.
    assert seen == [None, "JSESSIONID=bobs-own", None]
