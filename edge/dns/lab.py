"""The lab's two DNS views built from `edge.config.LabConfig` (spec §3, config.py address plan).

* ``internal`` (``dns.internal_clients``, the DMZ and inside prefixes): ``_cisco-uds._tcp`` → each
  Unified CM on its HTTPS port, ``_cuplogin._tcp`` → each IM&P node on 8443, A/PTR for every
  inside host, and each Expressway-E at its *internal* (DMZ) address, the one C dials.
* ``external`` (everyone else): ``_collab-edge._tls`` → each Expressway-E on 8443 and E's
  *external* address only. No ``_cisco-uds``, so a client outside falls back to MRA.
"""

from __future__ import annotations

import ipaddress

import dns.name
import dns.reversename

from edge.config import LabConfig
from edge.dns.zone import Record, View, a, networks, ptr_for, srv


def lab_views(config: LabConfig) -> tuple[View, View]:
    """(internal, external) in match order."""
    ttl = config.dns.ttl_s
    domain = config.lab.domain.rstrip(".")
    internal: list[Record] = []
    external: list[Record] = []
    for node in config.ucm:
        internal.append(srv(f"_cisco-uds._tcp.{domain}", node.fqdn, node.https_port, ttl=ttl))
    for imp in config.imp:
        internal.append(srv(f"_cuplogin._tcp.{domain}", imp.fqdn, imp.https_port, ttl=ttl))
    hosts = [(config.expc.fqdn, config.expc.address)]
    if config.expc.cluster_name != config.expc.fqdn:  # the name E's zone verifies in C's certificate
        hosts.append((config.expc.cluster_name, config.expc.address))
    hosts += [(n.fqdn, n.address) for n in config.ucm]
    hosts += [(n.fqdn, n.address) for n in config.imp]
    hosts += [(n.fqdn, n.address) for n in config.cuc]
    hosts += [(e.fqdn, e.internal_address) for e in config.expe]
    for fqdn, address in hosts:
        internal += [a(fqdn, address, ttl), ptr_for(address, fqdn, ttl)]
    for e in config.expe:
        external.append(srv(f"_collab-edge._tls.{domain}", e.fqdn, e.https_port, ttl=ttl))
        external += [a(e.fqdn, e.external_address, ttl), ptr_for(e.external_address, e.fqdn, ttl)]
    return (
        View("internal", networks(*config.dns.internal_clients), _zones(domain, internal), tuple(internal)),
        View("external", (), _zones(domain, external), tuple(external)),
    )


def _zones(domain: str, records: list[Record]) -> tuple[str, ...]:
    """The edge domain, the parent of every host outside it, and a /8 (IPv4) or /16 (IPv6) reverse zone."""
    zones = {dns.name.from_text(domain)}
    apex = dns.name.from_text(domain)
    for record in records:
        owner = record.owner
        if record.rtype == "PTR":
            zones.add(_reverse_zone(owner))
        elif not owner.is_subdomain(apex):
            zones.add(owner.parent())
    return tuple(sorted(z.to_text() for z in zones))


def _reverse_zone(owner: dns.name.Name) -> dns.name.Name:
    """in-addr.arpa zone of the first octet (``127.in-addr.arpa``); ip6.arpa of the first /16."""
    address = ipaddress.ip_address(dns.reversename.to_address(owner))
    # labels: first octet + in-addr.arpa + root / first 4 nibbles + ip6.arpa + root
    keep = 4 if address.version == 4 else 7
    return dns.name.Name(owner.labels[-keep:]) if keep < len(owner.labels) else owner
