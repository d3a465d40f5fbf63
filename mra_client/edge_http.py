"""What a Jabber client does over HTTPS before it registers (spec §4): discover the edge with
`_collab-edge._tls`, `get_edge_config` with Basic credentials, then UDS / TFTP / VMREST through
the descriptor lane with the X-Auth cookie."""

from __future__ import annotations

import base64
import io
import ssl
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from edge.dns.resolver import DnsLookupError, LabResolver


class StepError(Exception):
    """A sign-in step failed; `step` names it, `detail` is the protocol error (e.g. `401 Cisco-Edge`)."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.detail = detail


def b64(text: str) -> str:
    return base64.b64encode(text.lower().encode()).decode().rstrip("=")


@dataclass
class ServiceRecord:
    name: str
    servers: list[tuple[int, int, int, str]] = field(default_factory=list)  # priority, weight, port, host
    error: str | None = None
    address: str | None = None


@dataclass
class EdgeConfig:
    services: dict[str, ServiceRecord]
    sip_edge: list[tuple[str, int]]
    sip_route: str | None
    xmpp_edge: list[tuple[str, int]]
    http_edge: list[tuple[str, int]]
    uds: list[tuple[str, int]]
    tftp: list[str]

    @classmethod
    def parse(cls, body: bytes) -> EdgeConfig:
        root = ET.fromstring(body)
        if root.tag != "getEdgeConfigResponse":
            raise ValueError(f"unexpected root element {root.tag}")
        services: dict[str, ServiceRecord] = {}
        tftp: list[str] = []
        for svc in root.iter("service"):
            name = (svc.findtext("name") or "").strip()
            if name == "tftpServer":
                tftp += [a.text.strip() for a in svc.findall("address") if a.text]
                continue
            rec = ServiceRecord(name, error=svc.findtext("error"))
            for srv in svc.findall("server"):
                rec.servers.append(
                    (
                        int(srv.findtext("priority") or 0),
                        int(srv.findtext("weight") or 0),
                        int(srv.findtext("port") or 0),
                        (srv.findtext("address") or "").strip(),
                    )
                )
            services[name] = rec

        def servers(tag: str) -> list[tuple[str, int]]:
            out = []
            node = root.find(f".//{tag}")
            if node is not None:
                for srv in node.findall("server"):
                    out.append(((srv.findtext("address") or "").strip(), int(srv.findtext("tlsPort") or 0)))
            return out

        route = root.findtext(".//sipRequest/route")
        return cls(
            services=services,
            sip_edge=servers("sipEdgeServer"),
            sip_route=route.strip() if route else None,
            xmpp_edge=servers("xmppEdgeServer"),
            http_edge=servers("httpEdgeServer"),
            uds=servers("userUdsServer"),
            tftp=tftp,
        )


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed_ms: float


class EdgeHttpClient:
    """HTTPS to one Expressway-E, as the client sees it: by FQDN, trusting the given CA."""

    def __init__(
        self,
        *,
        domain: str,
        edge_host: str,
        edge_port: int,
        edge_address: str,
        ca_file: str,
        local_address: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.domain = domain.lower()
        self.edge_host = edge_host
        self.edge_port = edge_port
        self.edge_address = edge_address
        # A load run shares one context between all its clients (the CA is parsed once).
        self.ssl = ssl_context or ssl.create_default_context(cafile=ca_file)
        self.cookie: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._local = local_address

    async def __aenter__(self) -> EdgeHttpClient:
        resolver = _FixedResolver(self.edge_host, self.edge_address)
        connector = aiohttp.TCPConnector(
            ssl=self.ssl, resolver=resolver, local_addr=(self._local, 0) if self._local else None
        )
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _url(self, path: str) -> URL:
        return URL(f"https://{self.edge_host}:{self.edge_port}{path}", encoded=True)

    async def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, data: bytes | None = None
    ) -> HttpResult:
        assert self._session is not None
        hdrs = dict(headers or {})
        if self.cookie and "Cookie" not in hdrs:
            hdrs["Cookie"] = f"X-Auth={self.cookie}"
        started = time.perf_counter()
        payload: bytes | io.BytesIO | None = (
            io.BytesIO(data) if data is not None and len(data) > 65536 else data
        )
        async with self._session.request(
            method, self._url(path), headers=hdrs, data=payload, allow_redirects=False
        ) as resp:
            body = await resp.read()
            return HttpResult(
                resp.status,
                {k: v for k, v in resp.headers.items()},
                body,
                round((time.perf_counter() - started) * 1000, 2),
            )

    async def get_edge_config(
        self, username: str, password: str, services: tuple[str, ...] = ("_cisco-uds", "_cuplogin")
    ) -> tuple[EdgeConfig, HttpResult]:
        query = "&".join(f"service_name={s}" for s in services)
        auth = base64.b64encode(f"{username}:{password}".encode()).decode()
        result = await self.request(
            "GET", f"/{b64(self.domain)}/get_edge_config/?{query}", headers={"Authorization": f"Basic {auth}"}
        )
        if result.status != 200:
            realm = result.headers.get("WWW-Authenticate", "")
            tag = " Cisco-Edge" if "Cisco-Edge" in realm else ""
            raise StepError("get_edge_config", f"{result.status}{tag} {_first_line(result.body)}".strip())
        cookie = result.headers.get("Set-Cookie", "")
        if "X-Auth=" in cookie:
            self.cookie = cookie.split("X-Auth=", 1)[1].split(";", 1)[0]
        try:
            return EdgeConfig.parse(result.body), result
        except (ET.ParseError, ValueError) as exc:
            raise StepError("get_edge_config", f"bad XML: {exc}") from exc

    def descriptor(self, scheme: str, host: str, port: int) -> str:
        return "/" + b64(f"{self.domain}/{scheme}/{host}/{port}")

    async def internal_get(
        self, step: str, scheme: str, host: str, port: int, path: str, basic: tuple[str, str] | None = None
    ) -> HttpResult:
        headers = {}
        if basic is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
        result = await self.request("GET", self.descriptor(scheme, host, port) + path, headers=headers)
        if result.status != 200:
            raise StepError(step, f"{result.status} {_first_line(result.body)}".strip())
        return result


def _first_line(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    return text.splitlines()[0][:120] if text else ""


class _FixedResolver(aiohttp.abc.AbstractResolver):
    """The client already resolved E's FQDN through DNS; connect there while keeping SNI = FQDN."""

    def __init__(self, host: str, address: str) -> None:
        self.host = host
        self.address = address

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[aiohttp.abc.ResolveResult]:
        import socket

        target = self.address if host == self.host else host
        return [
            {
                "hostname": host,
                "host": target,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


async def discover_edge(domain: str, dns_server: str, dns_port: int) -> tuple[str, int, str]:
    """`_collab-edge._tls.<domain>` SRV → (E FQDN, port, E address), as a client outside does."""
    resolver = LabResolver(dns_server, dns_port)
    try:
        targets = await resolver.resolve_srv(f"_collab-edge._tls.{domain}")
    except DnsLookupError as exc:
        raise StepError("discovery", f"_collab-edge._tls.{domain}: {exc.reason}") from exc
    if not targets:
        raise StepError("discovery", f"_collab-edge._tls.{domain}: no SRV records")
    first = targets[0]
    try:
        addrs = await resolver.resolve_a(first.target)
    except DnsLookupError as exc:
        raise StepError("discovery", f"{first.target}: {exc.reason}") from exc
    if not addrs:
        raise StepError("discovery", f"{first.target}: no address")
    return first.target, first.port, addrs[0]
