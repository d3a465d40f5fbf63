"""`edge load --sip-only`: a load-test shortcut to registration scale that real clients never take.

A Jabber client does get_edge_config, UDS and TFTP over HTTPS (three requests through E → C →
UCM, one TLS handshake to E's 8443) before it registers (spec §4). To measure how many SIP
registrations the edge holds, those per-user HTTP steps are noise: this sign-in does the whole
ladder (`mra_client.signin.sign_in`) once, for the first user, keeps that edge config (the
sipEdgeServer, the `sipRequest` route and the xmppEdgeServer are the same for every user of
one edge) and then, per user, only DNS discovery, the TLS connection to E's SIP port, REGISTER
(with digest if the UCM challenges) and the first STUN keepalive, the same steps and code as the
full sign-in. The SIP identity is the user name (UCM matches a REGISTER's To user against the
directory number or the user id), since the directory number would need the UDS request.
"""

from __future__ import annotations

import asyncio

from mra_client.edge_http import EdgeConfig, EdgeHttpClient, StepError, discover_edge
from mra_client.signin import ClientSettings, Ladder, SignedIn, sign_in
from mra_client.sip_ua import MraSipUa


class SipOnlySignIn:
    """Sign-ins of one run sharing the first successful sign-in's edge config."""

    def __init__(self) -> None:
        self.config: EdgeConfig | None = None
        self.full_signins = 0
        self._lock = asyncio.Lock()

    async def __call__(self, settings: ClientSettings, ladder: Ladder) -> SignedIn:
        if self.config is None:
            async with self._lock:  # one full sign-in at a time until one succeeded
                if self.config is None:
                    self.full_signins += 1
                    session = await sign_in(settings, ladder)
                    self.config = session.config
                    return session
        return await self._sign_in(settings, ladder, self.config)

    async def _sign_in(self, settings: ClientSettings, ladder: Ladder, config: EdgeConfig) -> SignedIn:
        edge = await ladder.run(
            "discovery",
            lambda: discover_edge(settings.domain, settings.dns_server, settings.dns_port),
        )
        if not config.sip_edge:
            raise StepError("REGISTER", "no sipEdgeServer in the edge config")
        sip_host, sip_port = config.sip_edge[0]
        route = config.sip_route.replace("&lt;", "<").replace("&gt;", ">") if config.sip_route else None
        sip = MraSipUa(
            dn=settings.dn or settings.username,
            username=settings.username,
            password=settings.password,
            domain=settings.domain,
            device=settings.device or f"CSF{settings.username.upper()}",
            route=route,
            edge_host=sip_host,
            edge_address=edge[2],
            edge_port=sip_port,
            ca_file=settings.ca_file,
            local_address=settings.local_address,
            ssl_context=settings.ssl_context,
        )
        try:
            await ladder.run("SIP connect", sip.connect)
            reg = await ladder.run("REGISTER", sip.register)
            ladder.facts["registration"] = reg.__dict__
            if await sip.stun_keepalive() is None:
                raise StepError("STUN keepalive", "no answer within 3 s (path to UCM down?)")
        except BaseException:
            await sip.close()
            raise
        # Never entered: no HTTPS session to close (the engine's __aexit__ is then a no-op).
        http = EdgeHttpClient(
            domain=settings.domain,
            edge_host=edge[0],
            edge_port=edge[1],
            edge_address=edge[2],
            ca_file=settings.ca_file,
            ssl_context=settings.ssl_context,
        )
        return SignedIn(http, config, sip, sip.dn, edge)
