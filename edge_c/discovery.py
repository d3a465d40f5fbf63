"""Refresh servers on Expressway-C: which internal nodes exist and whether they answer.

Spec §4 (automatic allow-list rules "for every discovered node"; OAuth keys "fetched from UCM when
servers are refreshed") and §8 (C rediscovers nodes; MRA requests fail while that runs).

The administrator configures one Unified CM server per cluster (`expc.ucm_publishers`); C asks
it for the cluster's nodes with UDS `GET /cucm-uds/servers` (anonymous, as on Unified CM), which
answers ``<servers><server>fqdn</server>…</servers>``. Every node of a cluster serves the same
ports as its publisher. IM&P and Unity Connection nodes are the configured ones: nothing in the
lab's inside servers lists them (the real product asks their publishers over AXL). Every node is
then checked: its name must resolve in the internal DNS view and it must answer (UCM: UDS
`version`; Unity Connection: any HTTPS answer; IM&P: a TCP connection to its port for C).

`parse_uds_servers` and `Inventory` are pure; `Discoverer` does the I/O.
"""

from __future__ import annotations

import asyncio
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import aiohttp

from edge.config import LabConfig, UcmNode
from edge.dns.resolver import DnsLookupError, LabResolver
from edge_c.internal import summarize

NodeRole = Literal["ucm", "imp", "cuc"]
NodeState = Literal["active", "unreachable", "not checked"]

PROBE_TIMEOUT_S = 3.0
"""How long one node may take to answer its check (all nodes are checked at once)."""
MAX_SERVERS = 64
"""UDS `servers` entries taken from one cluster (a Unified CM cluster has at most 21 nodes)."""
MAX_SERVERS_BODY_BYTES = 256 * 1024
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


class DiscoveryError(Exception):
    """A publisher's answer C cannot use (the refresh reports it; known nodes stay)."""


def parse_uds_servers(body: bytes) -> list[str]:
    """The node FQDNs of a UDS `servers` answer, lower-cased, in order, without repeats.

    Raises DiscoveryError for anything that is not a `servers` document or names no valid host.
    """
    if len(body) > MAX_SERVERS_BODY_BYTES:
        raise DiscoveryError("UDS servers answer too large")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise DiscoveryError(f"UDS servers answer is not XML: {exc}") from None
    if root.tag != "servers":
        raise DiscoveryError(f"UDS servers answer has root <{root.tag[:40]}>, not <servers>")
    names: list[str] = []
    for server in root.iter("server"):
        name = (server.text or "").strip().lower().rstrip(".")
        if _HOSTNAME.match(name) and name not in names:
            names.append(name)
        if len(names) >= MAX_SERVERS:
            break
    if not names:
        raise DiscoveryError("UDS servers answer names no server")
    return names


@dataclass(frozen=True, slots=True)
class Node:
    """One internal node as C knows it: where it is, where it came from, whether it answered."""

    role: NodeRole
    fqdn: str
    cluster: str  # the configured server (publisher) this node was learnt from
    https_port: int
    source: Literal["configured", "discovered"] = "configured"
    tftp_http_port: int = 0  # UCM only
    tftp_https_port: int = 0  # UCM only
    edge_port: int = 0  # IM&P only: the XMPP port C connects to
    name: str = ""  # the lab component name when C's configuration names the node
    state: NodeState = "not checked"
    reason: str = ""
    address: str = ""
    checked_at: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "name": self.name or self.fqdn.split(".", 1)[0],
            "fqdn": self.fqdn,
            "address": self.address,
            "cluster": self.cluster,
            "source": self.source,
            "https_port": self.https_port,
            "state": self.state,
            "reason": self.reason,
            "checked_at": self.checked_at,
        }


@dataclass
class Inventory:
    """Every node C knows, by role; replaced as a whole by each refresh."""

    ucm: list[Node] = field(default_factory=list)
    imp: list[Node] = field(default_factory=list)
    cuc: list[Node] = field(default_factory=list)
    refreshed_at: float | None = None  # None: configured servers only, never refreshed

    def nodes(self) -> Iterator[Node]:
        yield from self.ucm
        yield from self.imp
        yield from self.cuc

    def by_role(self) -> dict[str, list[Node]]:
        return {"ucm": self.ucm, "imp": self.imp, "cuc": self.cuc}

    def ucm_node(self, fqdn: str) -> Node | None:
        fqdn = fqdn.lower()
        return next((n for n in self.ucm if n.fqdn == fqdn), None)

    def publishers(self) -> list[Node]:
        return [n for n in self.ucm if n.source == "configured"]


def configured_publishers(config: LabConfig) -> list[UcmNode]:
    names = config.expc.ucm_publishers or [config.ucm[0].name]
    return [n for n in config.ucm if n.name in names]


def _ucm_node(
    config: LabConfig, publisher: UcmNode, fqdn: str, source: Literal["configured", "discovered"]
) -> Node:
    known = next((n for n in config.ucm if n.fqdn.lower() == fqdn), None)
    return Node(
        "ucm",
        fqdn,
        publisher.fqdn.lower(),
        publisher.https_port,
        source,
        tftp_http_port=publisher.tftp_http_port,
        tftp_https_port=publisher.tftp_https_port,
        name=known.name if known else "",
    )


def configured_inventory(config: LabConfig) -> Inventory:
    """What C knows before any refresh: the configured servers, unchecked."""
    return Inventory(
        ucm=[_ucm_node(config, p, p.fqdn.lower(), "configured") for p in configured_publishers(config)],
        imp=[
            Node("imp", n.fqdn.lower(), n.fqdn.lower(), n.https_port, edge_port=n.edge_port, name=n.name)
            for n in config.imp
        ],
        cuc=[Node("cuc", n.fqdn.lower(), n.fqdn.lower(), n.https_port, name=n.name) for n in config.cuc],
    )


@dataclass
class DiscoveryResult:
    inventory: Inventory
    errors: list[str]


class Discoverer:
    """Runs one discovery: UDS `servers` of each configured Unified CM, then a check of every node."""

    def __init__(
        self,
        config: LabConfig,
        session: aiohttp.ClientSession,
        resolver: LabResolver,
        local_address: str | None = None,
    ) -> None:
        self.config = config
        self.session = session
        self.resolver = resolver
        self.local_address = local_address

    async def discover(self, previous: Inventory) -> DiscoveryResult:
        errors: list[str] = []
        ucm: list[Node] = []
        for publisher in configured_publishers(self.config):
            pub = publisher.fqdn.lower()
            try:
                names = await self._uds_servers(publisher)
            except (DiscoveryError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                errors.append(f"{pub}: {summarize(exc)}")
                # Keep what the last refresh learnt of this cluster; the checks below show its state.
                known = [n for n in previous.ucm if n.cluster == pub] or [
                    _ucm_node(self.config, publisher, pub, "configured")
                ]
                ucm += known
                continue
            ucm.append(_ucm_node(self.config, publisher, pub, "configured"))
            ucm += [_ucm_node(self.config, publisher, n, "discovered") for n in names if n != pub]
        base = configured_inventory(self.config)
        nodes = await asyncio.gather(*(self._check(n) for n in [*ucm, *base.imp, *base.cuc]))
        inventory = Inventory(
            ucm=[n for n in nodes if n.role == "ucm"],
            imp=[n for n in nodes if n.role == "imp"],
            cuc=[n for n in nodes if n.role == "cuc"],
            refreshed_at=time.time(),
        )
        return DiscoveryResult(inventory, errors)

    async def _uds_servers(self, publisher: UcmNode) -> list[str]:
        url = f"https://{publisher.fqdn}:{publisher.https_port}/cucm-uds/servers"
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        async with self.session.get(url, timeout=timeout, headers={"Accept": "application/xml"}) as resp:
            if resp.status != 200:
                raise DiscoveryError(f"UDS servers answered {resp.status}")
            body = await resp.content.read(MAX_SERVERS_BODY_BYTES + 1)
        return parse_uds_servers(body)

    async def _check(self, node: Node) -> Node:
        now = time.time()
        try:
            addresses = await self.resolver.resolve_a(node.fqdn)
        except DnsLookupError as exc:
            return replace(node, state="unreachable", reason=f"DNS: {exc}"[:200], checked_at=now)
        if not addresses:
            return replace(node, state="unreachable", reason="no address in the internal DNS", checked_at=now)
        node = replace(node, address=addresses[0])
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                reason = await self._probe(node)
        except TimeoutError:
            reason = f"no answer within {PROBE_TIMEOUT_S:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            reason = summarize(exc)
        state: NodeState = "active" if reason is None else "unreachable"
        return replace(node, state=state, reason=reason or "", checked_at=time.time())

    async def _probe(self, node: Node) -> str | None:
        """None if the node answers as its role should, else why not."""
        if node.role == "imp":
            local = (self.local_address, 0) if self.local_address else None
            _, writer = await asyncio.open_connection(node.address, node.edge_port, local_addr=local)
            writer.close()
            await writer.wait_closed()
            return None
        path = "/cucm-uds/version" if node.role == "ucm" else "/vmrest/version"
        async with self.session.get(f"https://{node.fqdn}:{node.https_port}{path}") as resp:
            await resp.read()
            if node.role == "ucm" and resp.status != 200:
                return f"UDS version answered {resp.status}"
            return None if resp.status < 500 else f"answered {resp.status}"
