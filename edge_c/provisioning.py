"""Edge provisioning on C (spec §4): get_edge_config, get_edge_sso, and authorizing proxied
requests (X-Auth cookie or OAuth bearer token)."""

from __future__ import annotations

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
from edge_c.auth import CookieIssuer, CredentialCache, RateControl, parse_basic, parse_bearer
from edge_c.internal import NodeHealth, is_connect_failure, summarize

log = logging.getLogger(__name__)

DEFAULT_SERVICES = ("_cisco-uds", "_cuplogin")
BASIC_CHALLENGE = 'Basic realm="Cisco-Edge"'


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
        self.oauth_keys: dict[str, Any] = {}
        self.counters: dict[str, int] = {}
        self.sessions: dict[str, float] = {}  # username → last provisioning time

    # -- helpers --------------------------------------------------------------------------

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def ucm_nodes(self) -> list[str]:
        return [n.fqdn for n in self.config.ucm]

    def live(self, hosts: list[str]) -> list[str]:
        return [h for h in hosts if not self.health.is_down(h)]

    async def _uds_get(
        self, path: str, auth: aiohttp.BasicAuth | None = None, bearer: str | None = None
    ) -> tuple[int, bytes]:
        """GET a UDS resource from the first live UCM node, failing over to the next (spec §4)."""
        nodes = self.live(self.ucm_nodes()) or self.ucm_nodes()
        last: Exception | None = None
        for host in nodes:
            port = next(n.https_port for n in self.config.ucm if n.fqdn == host)
            headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
            try:
                async with self.session.get(
                    f"https://{host}:{port}/cucm-uds/{path}", auth=auth, headers=headers
                ) as resp:
                    body = await resp.read()
                    self.health.mark_up(host)
                    return resp.status, body
            except Exception as exc:
                if not is_connect_failure(exc):
                    raise
                self.health.mark_down(host, summarize(exc))
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

    def validate_token(self, token: str) -> str | None:
        """Username of a valid self-describing OAuth access token (keys fetched from UCM)."""
        if not self.oauth_keys:
            return None
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self.oauth_keys.get(kid) if kid else None
            if key is None:
                return None
            claims = jwt.decode(
                token,
                key=key,
                algorithms=["ES256"],
                options={"verify_aud": False},
                leeway=self.config.expc.access.sip_token_extra_ttl_s,
            )
        except jwt.PyJWTError:
            return None
        if claims.get("token_type", "access") != "access":
            return None
        sub = claims.get("sub")
        return str(sub) if sub else None

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
            user = self.validate_token(token)
            if user is None:
                self._count("token_invalid")
                return Answer.text(
                    401,
                    "Unauthorized",
                    "invalid or expired token",
                    WWW_Authenticate='Bearer error="invalid_token"',
                )
            return Principal(user, "bearer")
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
        if parse_bearer(auth) is not None:
            user = self.validate_token(parse_bearer(auth) or "")
            if user is None:
                return Answer.text(
                    401,
                    "Unauthorized",
                    "invalid or expired token",
                    WWW_Authenticate='Bearer error="invalid_token"',
                )
            principal: Principal | Answer = Principal(user, "bearer")
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
        for node in cfg.ucm:
            if not self.health.is_down(node.fqdn):
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
        uds = next((n for n in cfg.ucm if not self.health.is_down(n.fqdn)), cfg.ucm[0])
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
        """Fetch the UCM's token signing keys (JWKS) for offline validation (spec §4)."""
        keys: dict[str, Any] = {}
        for node in self.config.ucm:
            if self.health.is_down(node.fqdn):
                continue
            try:
                async with self.session.get(f"https://{node.fqdn}:{node.https_port}/ssp/oauth/keys") as resp:
                    if resp.status != 200:
                        continue
                    jwks = await resp.json(content_type=None)
            except Exception as exc:
                if not is_connect_failure(exc) and not isinstance(exc, ValueError):
                    raise
                log.warning("oauth keys from %s: %s", node.fqdn, summarize(exc))
                continue
            for entry in jwks.get("keys", []):
                try:
                    keys[entry["kid"]] = jwt.algorithms.ECAlgorithm.from_jwk(entry)
                except (KeyError, ValueError, jwt.PyJWTError) as exc:
                    log.warning("oauth key from %s unusable: %s", node.fqdn, exc)
        self.oauth_keys = keys
        return len(keys)


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
