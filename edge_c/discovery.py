"""Refresh servers on Expressway-C: which internal nodes exist and whether they answer.

Spec §4 (automatic allow-list rules "for every discovered node"; OAuth keys "fetched from UCM when
servers are refreshed") and §8 (C rediscovers nodes; MRA requests fail while that runs).

The administrator configures one server per cluster (`expc.ucm_publishers`, `expc.imp_publishers`,
`expc.cuc_publishers`; an empty list: the first Unified CM node, every IM&P / Unity Connection
node). C asks each for its cluster's nodes:

* Unified CM: UDS `GET /cucm-uds/servers` (anonymous, as on Unified CM), which answers
  ``<servers><server>fqdn</server>…</servers>``;
* IM&P: AXL `listProcessNode` (SOAP, `POST /axl/` on the node's HTTPS port), keeping the nodes of
  role ``CUCM IM and Presence``;
* Unity Connection: `GET /vmrest/cluster`, ``<Servers><Server><HostName>fqdn</HostName>…`` (the
  lab's stand-in for the product's cluster listing; see `mock_ucm.vmrest`).

AXL and the cluster listing take Basic credentials: the lab's admin ones (``lab.admin_username`` /
``lab.admin_password``), standing in for the application user configured with each server. Every
node of a cluster serves the same ports as its publisher. A publisher whose answer C cannot use
(error status, not XML, too large, no valid host) is reported, and the nodes the last refresh
learnt of its cluster stay. Every node is then checked: its name must resolve in the internal DNS
view and it must answer (UCM: UDS `version`; Unity Connection: any HTTPS answer; IM&P: a TCP
connection to its port for C).

The parsers (`parse_uds_servers`, `parse_axl_process_nodes`, `parse_vmrest_cluster`) and
`Inventory` are pure; `Discoverer` does the I/O.
"""

from __future__ import annotations

import asyncio
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import aiohttp

from edge.config import CucNode, ImpNode, LabConfig, UcmNode
from edge.dns.resolver import DnsLookupError, LabResolver
from edge_c.internal import summarize

NodeRole = Literal["ucm", "imp", "cuc"]
NodeState = Literal["active", "unreachable", "not checked"]

PROBE_TIMEOUT_S = 3.0
"""How long one node may take to answer its check (all nodes are checked at once)."""
MAX_SERVERS = 64
"""UDS `servers` entries taken from one cluster (a Unified CM cluster has at most 21 nodes)."""
MAX_SERVERS_BODY_BYTES = 256 * 1024
"""The largest cluster listing (UDS, AXL or VMREST) C reads from a publisher."""
IMP_PROCESS_NODE_ROLE = "CUCM IM and Presence"
AXL_LIST_PROCESS_NODE = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"'
    b' xmlns:ns="http://www.cisco.com/AXL/API/14.0"><soapenv:Body><ns:listProcessNode>'
    b"<searchCriteria><name>%</name></searchCriteria>"
    b"<returnedTags><name/><processNodeRole/></returnedTags>"
    b"</ns:listProcessNode></soapenv:Body></soapenv:Envelope>"
)
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


class DiscoveryError(Exception):
    """A publisher's answer C cannot use (the refresh reports it; known nodes stay)."""


def _parse_xml(body: bytes, what: str) -> ET.Element:
    if len(body) > MAX_SERVERS_BODY_BYTES:
        raise DiscoveryError(f"{what} answer too large")
    if b"<!ENTITY" in body:  # no entity expansion from an answer, however small
        raise DiscoveryError(f"{what} answer is not XML: it declares entities")
    try:
        return ET.fromstring(body)
    except ET.ParseError as exc:
        raise DiscoveryError(f"{what} answer is not XML: {exc}") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _hostnames(texts: Iterable[str | None], what: str) -> list[str]:
    """Valid host names among `texts`, lower-cased, in order, without repeats, at most MAX_SERVERS."""
    names: list[str] = []
    for text in texts:
        name = (text or "").strip().lower().rstrip(".")
        if _HOSTNAME.match(name) and name not in names:
            names.append(name)
        if len(names) >= MAX_SERVERS:
            break
    if not names:
        raise DiscoveryError(f"{what} answer names no server")
    return names


def parse_uds_servers(body: bytes) -> list[str]:
    """The node FQDNs of a UDS `servers` answer, lower-cased, in order, without repeats.

    Raises DiscoveryError for anything that is not a `servers` document or names no valid host.
    """
    root = _parse_xml(body, "UDS servers")
    if root.tag != "servers":
        raise DiscoveryError(f"UDS servers answer has root <{root.tag[:40]}>, not <servers>")
    return _hostnames((s.text for s in root.iter("server")), "UDS servers")


def parse_axl_process_nodes(body: bytes) -> list[str]:
    """The IM&P node FQDNs of an AXL `listProcessNode` answer (role ``CUCM IM and Presence``).

    Raises DiscoveryError for a SOAP fault, anything that is not a `listProcessNodeResponse`
    envelope, or an answer that names no valid IM&P host.
    """
    root = _parse_xml(body, "AXL listProcessNode")
    if _local(root.tag) != "Envelope":
        raise DiscoveryError(f"AXL answer has root <{_local(root.tag)[:40]}>, not a SOAP <Envelope>")
    soap_body = next((c for c in root if _local(c.tag) == "Body"), None)
    if soap_body is None or len(soap_body) == 0:
        raise DiscoveryError("AXL answer has no SOAP body")
    answer = soap_body[0]
    if _local(answer.tag) == "Fault":
        fault = next((c.text or "" for c in answer.iter() if _local(c.tag) == "faultstring"), "")
        raise DiscoveryError(f"AXL fault: {fault.strip()[:100]}")
    if _local(answer.tag) != "listProcessNodeResponse":
        raise DiscoveryError(f"AXL answer is <{_local(answer.tag)[:40]}>, not listProcessNodeResponse")

    def imp_names() -> Iterator[str | None]:
        for node in answer.iter():
            if _local(node.tag) != "processNode":
                continue
            fields = {_local(c.tag): (c.text or "").strip() for c in node}
            if fields.get("processNodeRole", "").lower() == IMP_PROCESS_NODE_ROLE.lower():
                yield fields.get("name")

    return _hostnames(imp_names(), "AXL listProcessNode")


def parse_vmrest_cluster(body: bytes) -> list[str]:
    """The node FQDNs of a VMREST `cluster` answer (``<Servers><Server><HostName>``).

    Raises DiscoveryError for anything that is not a `Servers` document or names no valid host.
    """
    root = _parse_xml(body, "VMREST cluster")
    if root.tag != "Servers":
        raise DiscoveryError(f"VMREST cluster answer has root <{root.tag[:40]}>, not <Servers>")
    return _hostnames((s.findtext("HostName") for s in root.iter("Server")), "VMREST cluster")


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


def configured_imp(config: LabConfig) -> list[ImpNode]:
    names = config.expc.imp_publishers
    return [n for n in config.imp if not names or n.name in names]


def configured_cuc(config: LabConfig) -> list[CucNode]:
    names = config.expc.cuc_publishers
    return [n for n in config.cuc if not names or n.name in names]


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
            for n in configured_imp(config)
        ],
        cuc=[
            Node("cuc", n.fqdn.lower(), n.fqdn.lower(), n.https_port, name=n.name)
            for n in configured_cuc(config)
        ],
    )


def member_node(config: LabConfig, publisher: Node, fqdn: str) -> Node:
    """A node `publisher` listed: the publisher's ports, the lab name if the config knows the host."""
    nodes: list[UcmNode] | list[ImpNode] | list[CucNode] = getattr(config, publisher.role)
    known = next((n.name for n in nodes if n.fqdn.lower() == fqdn), "")
    return replace(publisher, fqdn=fqdn, source="discovered", name=known)


def merge_nodes(nodes: Iterable[Node]) -> list[Node]:
    """One node per FQDN, in order; a configured server wins over the same host discovered."""
    nodes = list(nodes)
    configured = {n.fqdn for n in nodes if n.source == "configured"}
    out: list[Node] = []
    seen: set[str] = set()
    for node in nodes:
        if node.fqdn in seen or (node.source == "discovered" and node.fqdn in configured):
            continue
        seen.add(node.fqdn)
        out.append(node)
    return out


@dataclass
class DiscoveryResult:
    inventory: Inventory
    errors: list[str]


Ask = Callable[[Node], Awaitable[list[str]]]


class Discoverer:
    """Runs one discovery: each configured server's cluster listing, then a check of every node."""

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
        self.auth = aiohttp.BasicAuth(config.lab.admin_username, config.lab.admin_password)

    async def discover(self, previous: Inventory) -> DiscoveryResult:
        base = configured_inventory(self.config)
        roles = await asyncio.gather(
            self._role(base.ucm, self._uds_servers, previous.ucm),
            self._role(base.imp, self._axl_process_nodes, previous.imp),
            self._role(base.cuc, self._vmrest_cluster, previous.cuc),
        )
        errors = [e for _, errs in roles for e in errs]
        nodes = await asyncio.gather(*(self._check(n) for known, _ in roles for n in known))
        inventory = Inventory(
            ucm=[n for n in nodes if n.role == "ucm"],
            imp=[n for n in nodes if n.role == "imp"],
            cuc=[n for n in nodes if n.role == "cuc"],
            refreshed_at=time.time(),
        )
        return DiscoveryResult(inventory, errors)

    async def _role(
        self, publishers: list[Node], ask: Ask, previous: list[Node]
    ) -> tuple[list[Node], list[str]]:
        """Every node of the configured servers' clusters of one role, and what went wrong."""
        errors: list[str] = []
        nodes: list[Node] = []
        for publisher in publishers:
            pub = publisher.fqdn
            try:
                names = await ask(publisher)
            except (DiscoveryError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                errors.append(f"{pub}: {summarize(exc)}")
                # Keep what the last refresh learnt of this cluster; the checks below show its state.
                nodes += [n for n in previous if n.cluster == pub] or [publisher]
                continue
            nodes.append(publisher)
            nodes += [member_node(self.config, publisher, n) for n in names if n != pub]
        return merge_nodes(nodes), errors

    async def _fetch(self, what: str, method: str, url: str, **kwargs: Any) -> bytes:
        """The body of a 200 answer, at most MAX_SERVERS_BODY_BYTES + 1 bytes of it."""
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        async with self.session.request(method, url, timeout=timeout, **kwargs) as resp:
            if resp.status != 200:
                raise DiscoveryError(f"{what} answered {resp.status}")
            if (resp.content_length or 0) > MAX_SERVERS_BODY_BYTES:
                raise DiscoveryError(f"{what} answer too large")
            body = b""
            while len(body) <= MAX_SERVERS_BODY_BYTES:
                chunk = await resp.content.read(MAX_SERVERS_BODY_BYTES + 1 - len(body))
                if not chunk:
                    break
                body += chunk
        return body

    async def _uds_servers(self, publisher: Node) -> list[str]:
        url = f"https://{publisher.fqdn}:{publisher.https_port}/cucm-uds/servers"
        body = await self._fetch("UDS servers", "GET", url, headers={"Accept": "application/xml"})
        return parse_uds_servers(body)

    async def _axl_process_nodes(self, publisher: Node) -> list[str]:
        url = f"https://{publisher.fqdn}:{publisher.https_port}/axl/"
        headers = {
            "Content-Type": "text/xml; charset=utf-8",
            "SOAPAction": '"CUCM:DB ver=14.0 listProcessNode"',
        }
        body = await self._fetch(
            "AXL listProcessNode", "POST", url, data=AXL_LIST_PROCESS_NODE, headers=headers, auth=self.auth
        )
        return parse_axl_process_nodes(body)

    async def _vmrest_cluster(self, publisher: Node) -> list[str]:
        url = f"https://{publisher.fqdn}:{publisher.https_port}/vmrest/cluster"
        body = await self._fetch(
            "VMREST cluster", "GET", url, headers={"Accept": "application/xml"}, auth=self.auth
        )
        return parse_vmrest_cluster(body)

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
