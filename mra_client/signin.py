"""`edge client signin`: the whole MRA sign-in of one user as a ladder of timed steps."""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mra_client.edge_http import EdgeConfig, EdgeHttpClient, StepError, discover_edge
from mra_client.sip_ua import MraSipUa

T = TypeVar("T")


@dataclass
class ClientSettings:
    """Everything the client needs to find and use an edge: works against any edge, not only the lab."""

    username: str
    password: str
    domain: str
    dns_server: str
    dns_port: int
    ca_file: str
    dn: str | None = None
    device: str | None = None
    local_address: str | None = None
    ssl_context: ssl.SSLContext | None = None
    """Shared TLS context (trusting `ca_file`); None builds one per client."""


@dataclass
class Step:
    name: str
    ok: bool
    elapsed_ms: float
    detail: str = ""


@dataclass
class Ladder:
    steps: list[Step] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    @property
    def failed(self) -> Step | None:
        return next((s for s in self.steps if not s.ok), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "steps": [s.__dict__ for s in self.steps],
            "facts": self.facts,
        }

    async def run(
        self, name: str, action: Callable[[], Awaitable[T]], detail: Callable[[T], str] | None = None
    ) -> T:
        started = time.perf_counter()
        try:
            result = await action()
        except StepError as exc:
            self.steps.append(Step(exc.step, False, _ms(started), exc.detail))
            raise
        except (OSError, TimeoutError) as exc:
            self.steps.append(Step(name, False, _ms(started), str(exc) or type(exc).__name__))
            raise StepError(name, str(exc) or type(exc).__name__) from exc
        self.steps.append(Step(name, True, _ms(started), detail(result) if detail else ""))
        return result


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


@dataclass
class SignedIn:
    """What a signed-in client holds: the HTTPS client (cookie), edge config and the SIP UA."""

    http: EdgeHttpClient
    config: EdgeConfig
    sip: MraSipUa | None
    dn: str
    edge: tuple[str, int, str]


async def sign_in(settings: ClientSettings, ladder: Ladder, *, register: bool = True) -> SignedIn:
    """Discovery → get_edge_config → UDS → TFTP → SIP REGISTER → STUN keepalive."""
    edge = await ladder.run(
        "discovery",
        lambda: discover_edge(settings.domain, settings.dns_server, settings.dns_port),
        lambda e: f"_collab-edge._tls.{settings.domain} → {e[0]}:{e[1]} ({e[2]})",
    )
    ladder.facts["edge"] = {"host": edge[0], "port": edge[1], "address": edge[2]}
    http = EdgeHttpClient(
        domain=settings.domain,
        edge_host=edge[0],
        edge_port=edge[1],
        edge_address=edge[2],
        ca_file=settings.ca_file,
        local_address=settings.local_address,
        ssl_context=settings.ssl_context,
    )
    await http.__aenter__()
    sip: MraSipUa | None = None
    try:
        config, _ = await ladder.run(
            "get_edge_config",
            lambda: http.get_edge_config(settings.username, settings.password),
            lambda r: (
                f"200, X-Auth cookie {'set' if http.cookie else 'missing'}, "
                f"{len(r[0].sip_edge)} SIP edge server(s)"
            ),
        )
        uds = config.uds[0] if config.uds else None
        if uds is None:
            raise StepError("get_edge_config", "no userUdsServer in the response")
        user_xml = await ladder.run(
            "UDS user",
            lambda: http.internal_get(
                "UDS user",
                "https",
                uds[0],
                uds[1],
                f"/cucm-uds/user/{settings.username}",
                basic=(settings.username, settings.password),
            ),
            lambda r: f"{r.status} via {uds[0]}:{uds[1]}",
        )
        dn = settings.dn or _phone_number(user_xml.body) or ""
        if not dn:
            raise StepError("UDS user", "no phoneNumber for the user")
        device = settings.device or f"CSF{settings.username.upper()}"
        tftp_host = config.tftp[0] if config.tftp else uds[0]
        await ladder.run(
            "TFTP config",
            lambda: http.internal_get("TFTP config", "http", tftp_host, 6970, f"/{device}.cnf.xml"),
            lambda r: f"{r.status} {device}.cnf.xml ({len(r.body)} bytes)",
        )
        ladder.facts.update(dn=dn, device=device)
        if register:
            if not config.sip_edge:
                raise StepError("REGISTER", "no sipEdgeServer in the edge config")
            sip_host, sip_port = config.sip_edge[0]
            route = config.sip_route.replace("&lt;", "<").replace("&gt;", ">") if config.sip_route else None
            sip = MraSipUa(
                dn=dn,
                username=settings.username,
                password=settings.password,
                domain=settings.domain,
                device=device,
                route=route,
                edge_host=sip_host,
                edge_address=edge[2],
                edge_port=sip_port,
                ca_file=settings.ca_file,
                local_address=settings.local_address,
                ssl_context=settings.ssl_context,
            )
            await ladder.run("SIP connect", sip.connect, lambda _: f"TLS to {sip_host}:{sip_port}")
            reg = await ladder.run(
                "REGISTER",
                sip.register,
                lambda r: f"200, expires {r.expires}, Supported: {r.supported or '-'}",
            )
            ladder.facts["registration"] = reg.__dict__

            async def stun() -> tuple[str, int]:
                assert sip is not None
                mapped = await sip.stun_keepalive()
                if mapped is None:
                    raise StepError("STUN keepalive", "no answer within 3 s (path to UCM down?)")
                return mapped

            await ladder.run("STUN keepalive", stun, lambda m: f"answered, mapped {m[0]}:{m[1]}")
        return SignedIn(http, config, sip, dn, edge)
    except BaseException:
        if sip is not None:  # a failed REGISTER or STUN step must not leave the TLS flow open
            await sip.close()
        await http.__aexit__(None, None, None)
        raise


def _phone_number(body: bytes) -> str | None:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    text = root.findtext("phoneNumber")
    return text.strip() if text else None


async def sign_out(session: SignedIn) -> None:
    if session.sip is not None:
        try:
            await session.sip.register(expires=0, timeout_s=5)
        except StepError:
            pass
        await session.sip.close()
    await session.http.__aexit__(None, None, None)
