"""Edge provisioning on C (spec §4): get_edge_config, get_edge_sso, and authorizing proxied
requests (X-Auth cookie or OAuth bearer token)."""

from __future__ import annotations

import json
import logging
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

import aiohttp
import jwt

from edge.config import LabConfig
from edge.dns.resolver import DnsLookupError, LabResolver
from edge_c.auth import (
    CookieIssuer,
    CredentialCache,
    RateControl,
    TokenRejected,
    TokenValidator,
    parse_basic,
    parse_bearer,
)
from edge_c.discovery import Inventory, Node, configured_inventory, configured_publishers
from edge_c.internal import NodeHealth, is_connect_failure, summarize

log = logging.getLogger(__name__)

DEFAULT_SERVICES = ("_cisco-uds", "_cuplogin")
BASIC_CHALLENGE = 'Basic realm="Cisco-Edge"'
MAX_JWKS_BYTES = 64 * 1024


@dataclass
class Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @classmethod
    def text(cls, status: int, reason: str, text: str | None = None, **headers: str) -> Answer:
        hdrs = [("Content-Type", "text/plain")]
        hdrs += [(k.replace("_", "-"), v) for k, v in headers.items()]
        return cls(status, reason, hdrs, ((text or reason) + "\n").encode())


def unauthorized(text: str = "Unauthorized") -> Answer:
    return Answer.text(401, "Unauthorized", text, WWW_Authenticate=BASIC_CHALLENGE)


def invalid_token(reason: str) -> Answer:
    """RFC 6750 §3.1: 401 with a Bearer challenge naming the error and why."""
    challenge = f'Bearer realm="Cisco-Edge", error="invalid_token", error_description="{reason}"'
    return Answer.text(401, "Unauthorized", f"invalid token: {reason}", WWW_Authenticate=challenge)


class NextHopError(Exception):
    """An internal server could not be reached: the client gets 502 Next Hop Connection Failed."""


@dataclass(frozen=True)
class Principal:
    username: str
    via: str  # "basic", "cookie", "bearer"


class Provisioning:
    def __init__(
        self,
        config: LabConfig,
        *,
        resolver: LabResolver,
        session: aiohttp.ClientSession,
        health: NodeHealth,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.session = session
        self.health = health
        access = config.expc.access
        self.cookies = CookieIssuer(lifetime_s=access.credentials_refresh_min * 60)
        self.credentials = CredentialCache(
            refresh_s=access.credentials_refresh_min * 60, cleanup_s=access.credentials_cleanup_min * 60
        )
        self.rate = RateControl(limit=access.auth_rate_max, window_s=access.auth_rate_window_s)
        self.tokens = TokenValidator()
        self.inventory: Inventory = configured_inventory(config)
        self.counters: dict[str, int] = {}
        self.sessions: dict[str, float] = {}  # username → last provisioning time

    # -- helpers --------------------------------------------------------------------------

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def ucm_nodes(self) -> list[Node]:
        """The Unified CM nodes C knows (configured, then discovered by "refresh servers")."""
        return self.inventory.ucm

    def live_ucm_nodes(self) -> list[Node]:
        """Nodes not known to be failed (spec §4: never list a failed node): not held down after
        a failure, and answering at the last refresh. All of them if none is."""
        nodes = self.ucm_nodes()
        live = [n for n in nodes if n.state != "unreachable" and not self.health.is_down(n.fqdn)]
        return live or nodes

    def set_inventory(self, inventory: Inventory) -> None:
        self.inventory = inventory

    async def _uds_get(
        self, path: str, auth: aiohttp.BasicAuth | None = None, bearer: str | None = None
    ) -> tuple[int, bytes]:
        """GET a UDS resource from the first live UCM node, failing over to the next (spec §4)."""
        last: Exception | None = None
        for node in self.live_ucm_nodes():
            headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
            try:
                async with self.session.get(
                    f"https://{node.fqdn}:{node.https_port}/cucm-uds/{path}", auth=auth, headers=headers
                ) as resp:
                    body = await resp.read()
                    self.health.mark_up(node.fqdn)
                    return resp.status, body
            except Exception as exc:
                if not is_connect_failure(exc):
                    raise
                self.health.mark_down(node.fqdn, summarize(exc))
                last = exc
        raise NextHopError(f"no Unified CM node reachable: {last}")

    # -- authentication -------------------------------------------------------------------

    async def _home_cluster(self, username: str) -> str | None:
        status, body = await self._uds_get(f"clusterUser?username={username}")
        if status != 200:
            return None
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            return None
        result = root.find(".//result")
        if result is not None and result.get("found", "").lower() != "true":
            return None
        home = root.find(".//homeCluster")
        return (home.text or "").strip() if home is not None else None

    async def _check_credentials(self, username: str, password: str, now: float) -> bool:
        if self.credentials.check(username, password, now):
            return True
        status, _ = await self._uds_get(f"user/{username}", auth=aiohttp.BasicAuth(username, password))
        if status == 200:
            self.credentials.remember(username, password, now)
            return True
        self.credentials.forget(username)
        return False

    def authenticate_bearer(self, token: str, now: float) -> Principal | Answer:
        """A Unified CM access token, validated offline with the keys fetched from the cluster
        (spec §4 "authorize by OAuth token"); 401 with a Bearer challenge otherwise."""
        access = self.config.expc.access
        if not (access.authorize_by_oauth_refresh or access.authorize_by_oauth_sso):
            self._count("token_refused_mode")
            return invalid_token("authorization by OAuth token is off")
        try:
            username = self.tokens.validate(token, now)
        except TokenRejected as exc:
            self._count("token_invalid")
            log.info("bearer token refused: %s", exc.reason)
            return invalid_token(exc.reason)
        self._count("token_ok")
        return Principal(username.lower(), "bearer")

    async def authenticate_basic(self, header: str, now: float) -> Principal | Answer:
        creds = parse_basic(header)
        if creds is None:
            self._count("auth_malformed")
            return unauthorized("malformed Basic credentials")
        username, password = creds
        username = username.split("@", 1)[0].lower()
        if not self.config.expc.access.authorize_by_user_credential:
            self._count("auth_refused_mode")
            return unauthorized("authorization by user credential is off")
        if not self.rate.allow(username, now):
            self._count("auth_rate_limited")
            retry = self.rate.retry_after(username, now)
            return Answer.text(429, "Too Many Requests", Retry_After=str(retry))
        home = await self._home_cluster(username)
        if home is None:
            self._count("auth_unknown_user")
            return unauthorized()
        if not await self._check_credentials(username, password, now):
            self._count("auth_failed")
            return unauthorized()
        self._count("auth_ok")
        return Principal(username, "basic")

    def authenticate_request(self, headers: list[tuple[str, str]], now: float) -> Principal | Answer:
        """For the descriptor lane: a valid X-Auth cookie or bearer token, else 401."""
        auth = _header(headers, "authorization") or ""
        token = parse_bearer(auth)
        if token is not None:
            return self.authenticate_bearer(token, now)
        cookie = _cookie(headers, "X-Auth")
        if cookie is None:
            return unauthorized("no X-Auth cookie")
        claims = self.cookies.validate(cookie, now)
        if claims is None:
            self._count("cookie_invalid")
            return unauthorized("X-Auth cookie invalid or expired")
        return Principal(claims.username, "cookie")

    # -- get_edge_config ------------------------------------------------------------------

    async def edge_config(self, domain: str, target: str, headers: list[tuple[str, str]]) -> Answer:
        now = time.time()
        if domain != self.config.lab.domain.lower():
            self._count("unknown_domain")
            return Answer.text(404, "Not Found", f"unknown domain {domain}")
        auth = _header(headers, "authorization") or ""
        token = parse_bearer(auth)
        principal: Principal | Answer
        if token is not None:
            principal = self.authenticate_bearer(token, now)
        elif auth[:7].lower() == "bearer ":
            self._count("token_invalid")
            principal = invalid_token("malformed token")
        else:
            principal = await self.authenticate_basic(auth, now)
        if isinstance(principal, Answer):
            return principal
        query = parse_qs(urlsplit(target).query)
        services = query.get("service_name") or list(DEFAULT_SERVICES)
        body = await self._edge_config_xml(principal.username, services)
        self.sessions[principal.username] = now
        cookie = self.cookies.issue(principal.username, now)
        return Answer(
            200,
            "OK",
            [("Content-Type", "text/xml"), ("Set-Cookie", f"X-Auth={cookie}; Secure; HttpOnly")],
            body,
        )

    async def _service_xml(self, name: str) -> str:
        if not name.startswith("_") or len(name) > 64:
            return f"<service><name>{escape(name)}</name><error>NameError</error></service>"
        try:
            targets = await self.resolver.resolve_srv(f"{name}._tcp.{self.config.lab.domain}")
        except DnsLookupError:
            targets = []
        servers = [t for t in targets if not self.health.is_down(t.target)]
        if not servers:
            return f"<service><name>{escape(name)}</name><error>NameError</error></service>"
        parts = [f"<service><name>{escape(name)}</name>"]
        for t in servers:
            parts.append(
                f"<server><priority>{t.priority}</priority><weight>{t.weight}</weight>"
                f"<port>{t.port}</port><address>{escape(t.target)}</address></server>"
            )
        parts.append("</service>")
        return "".join(parts)

    async def _edge_config_xml(self, username: str, services: list[str]) -> bytes:
        cfg = self.config
        svc = [await self._service_xml(name) for name in dict.fromkeys(services)]
        for node in self.live_ucm_nodes():
            if node.state != "unreachable" and not self.health.is_down(node.fqdn):
                svc.append(
                    f"<service><name>tftpServer</name><address>{escape(node.fqdn)}</address></service>"
                )
        sip = "".join(
            f"<server><address>{escape(e.fqdn)}</address><tlsPort>{e.sip_tls_port}</tlsPort></server>"
            for e in cfg.expe
        )
        xmpp = "".join(
            f"<server><address>{escape(e.fqdn)}</address><tlsPort>{e.xmpp_port}</tlsPort></server>"
            for e in cfg.expe
        )
        http = "".join(
            f"<server><address>{escape(e.fqdn)}</address><tlsPort>{e.https_port}</tlsPort></server>"
            for e in cfg.expe
        )
        route = f"&lt;sip:{cfg.expc.address}:{cfg.expc.sip_tls_port};transport=tls;zone-id=1;directed;lr&gt;"
        uds = self.live_ucm_nodes()[0]
        xml = (
            '<getEdgeConfigResponse version="1.0">'
            f"<serviceConfig>{''.join(svc)}</serviceConfig>"
            "<edgeConfig>"
            f"<sipEdgeServer>{sip}</sipEdgeServer>"
            f"<sipRequest><route>{route}</route></sipRequest>"
            f"<xmppEdgeServer>{xmpp}</xmppEdgeServer>"
            f"<httpEdgeServer>{http}</httpEdgeServer>"
            "<turnEdgeServer/>"
            f"<userUdsServer><server><address>{escape(uds.fqdn)}</address>"
            f"<tlsPort>{uds.https_port}</tlsPort></server></userUdsServer>"
            "</edgeConfig>"
            "</getEdgeConfigResponse>"
        )
        return xml.encode()

    # -- get_edge_sso ---------------------------------------------------------------------

    async def edge_sso(self, domain: str, target: str) -> Answer:
        if domain != self.config.lab.domain.lower():
            return Answer.text(404, "Not Found", f"unknown domain {domain}")
        query = parse_qs(urlsplit(target).query)
        user = (query.get("username") or query.get("email") or [""])[0].split("@", 1)[0].lower()
        if not user:
            return Answer.text(400, "Bad Request", "username or email parameter required")
        access = self.config.expc.access
        home = await self._home_cluster(user)
        sso = access.authorize_by_oauth_sso and home is not None
        xml = (
            '<getEdgeSsoResponse version="1.0">'
            f"<Cluster>{escape(home or '')}</Cluster>"
            f"<SsoEnabled>{'True' if sso else 'False'}</SsoEnabled>"
            f"<OAuthRefreshEnabled>{'True' if access.authorize_by_oauth_refresh else 'False'}"
            "</OAuthRefreshEnabled>"
            f"<CredentialsEnabled>{'True' if access.authorize_by_user_credential else 'False'}"
            "</CredentialsEnabled>"
            "</getEdgeSsoResponse>"
        )
        return Answer(200, "OK", [("Content-Type", "text/xml")], xml.encode())

    # -- keys -----------------------------------------------------------------------------

    async def fetch_oauth_keys(self) -> int:
        """Fetch the cluster's token signing keys (JWKS at `/ssp/oauth/keys`) from every live
        Unified CM node, for offline validation (spec §4). Returns how many keys C now holds;
        when no node answers, the keys of the last refresh stay."""
        keys: dict[str, Any] = {}
        answered = False
        for node in self.ucm_nodes():
            if node.state == "unreachable" or self.health.is_down(node.fqdn):
                continue
            url = f"https://{node.fqdn}:{node.https_port}/ssp/oauth/keys"
            try:
                async with self.session.get(url) as resp:
                    if resp.status != 200:
                        log.warning("oauth keys from %s: HTTP %d", node.fqdn, resp.status)
                        continue
                    jwks = json.loads(await resp.content.read(MAX_JWKS_BYTES))
            except (ValueError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("oauth keys from %s: %s", node.fqdn, summarize(exc))
                continue
            answered = True
            entries = jwks.get("keys") if isinstance(jwks, dict) else None
            for entry in entries if isinstance(entries, list) else []:
                try:
                    keys[str(entry["kid"])] = jwt.algorithms.ECAlgorithm.from_jwk(entry)
                except (KeyError, TypeError, ValueError, jwt.PyJWTError) as exc:
                    log.warning("oauth key from %s unusable: %s", node.fqdn, exc)
        issuers = {
            f"https://{p.fqdn}:{p.https_port}/ssp/oauth": p.fqdn for p in configured_publishers(self.config)
        }
        if answered:
            self.tokens.set_keys(keys, issuers)
        return self.tokens.key_count


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _cookie(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() != "cookie":
            continue
        for part in value.split(";"):
            k, _, v = part.strip().partition("=")
            if k == name and v:
                return v
    return None
