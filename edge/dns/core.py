"""The sans-IO authoritative DNS core of the lab's split-horizon server (shared/spec/MRA.md §3).

`DnsCore.handle_query(wire, client_ip, tcp=...)` takes one DNS message and returns the response
bytes (or None to stay silent). It never touches a socket and never raises on peer input: a
malformed query becomes FORMERR (RFC 1035 §4.1.1) as long as it still carries a query id.

Answering rules, per view (the first whose ``match_clients`` holds the client, `zone.View`):

* names under one of the view's zones are answered authoritatively (AA); anything else REFUSED;
* unknown name inside a zone: NXDOMAIN + the zone's SOA in authority (RFC 2308 §2.1);
* a name that exists (owner of data, or an empty non-terminal above one, RFC 8020) with other
  types only: NOERROR, empty answer, SOA in authority (RFC 2308 §2.2, "NODATA");
* CNAMEs are followed inside the view (RFC 1034 §4.3.2);
* SRV / MX / NS targets get their A/AAAA records in the additional section (RFC 2782);
* UDP answers above 512 bytes (no EDNS) or the EDNS payload size (RFC 6891 §6.2.5, capped by our
  own ``max_udp_payload_bytes``) are truncated with TC set, so the client retries over TCP.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from edge.dns.events import QueryAnswered, QueryDropped
from edge.dns.zone import View, select_view

MAX_CNAME_CHAIN = 8
UDP_CLASSIC_MAX_BYTES = 512  # RFC 1035 §4.2.1
TCP_MAX_BYTES = 65535  # RFC 1035 §4.2.2: 2-byte length prefix
_HEADER = struct.Struct("!HHHHHH")
# Synthesized SOA when the view's records do not carry one: refresh, retry, expire, minimum.
# The minimum (60 s) is the negative-caching TTL (RFC 2308 §4).
_SOA_TIMERS = "1 3600 600 86400 60"
_NEG_TTL_S = 60
_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
_TARGET_FIELD = {dns.rdatatype.SRV: "target", dns.rdatatype.NS: "target", dns.rdatatype.MX: "exchange"}


@dataclass
class _CompiledView:
    """A view's records indexed for lookup; built once, read-only afterwards."""

    view: View
    zones: list[dns.name.Name]
    """The view's zone apexes, deepest first, so the closest enclosing zone wins."""
    soas: dict[dns.name.Name, dns.rrset.RRset]
    rrsets: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], dns.rrset.RRset]
    names: set[dns.name.Name] = field(default_factory=set)
    """Every owner name plus the empty non-terminals between it and its zone apex."""

    def zone_of(self, name: dns.name.Name) -> dns.name.Name | None:
        for zone in self.zones:
            if name.is_subdomain(zone):
                return zone
        return None


def compile_view(view: View) -> _CompiledView:
    """Index a view; raises ValueError for bad rdata or a record outside the view's zones."""
    zones = sorted((dns.name.from_text(z) for z in view.zones), key=len, reverse=True)
    out = _CompiledView(view=view, zones=zones, soas={}, rrsets={})
    grouped: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], list[tuple[int, dns.rdata.Rdata]]] = {}
    for record in view.records:
        owner = record.owner
        zone = out.zone_of(owner)
        if zone is None:
            raise ValueError(f"view {view.name}: {record.name} is outside the view's zones {view.zones}")
        grouped.setdefault((owner, record.rdatatype), []).append((record.ttl, record.to_rdata()))
        name = owner
        while name != zone:  # mark empty non-terminals as existing (RFC 8020)
            out.names.add(name)
            name = name.parent()
        out.names.add(zone)
    for (owner, rdtype), items in grouped.items():
        ttl = min(t for t, _ in items)  # RFC 2181 §5.2: one TTL per RRset
        out.rrsets[(owner, rdtype)] = dns.rrset.from_rdata_list(owner, ttl, [r for _, r in items])
        if rdtype == dns.rdatatype.CNAME and any(k[0] == owner and k[1] != rdtype for k in grouped):
            raise ValueError(f"view {view.name}: {owner} has a CNAME and other data (RFC 1034 §3.6.2)")
    for zone in zones:
        out.names.add(zone)
        soa = out.rrsets.get((zone, dns.rdatatype.SOA))
        if soa is None:
            text = f"ns.{zone} hostmaster.{zone} {_SOA_TIMERS}"
            rdata = dns.rdata.from_text(
                dns.rdataclass.IN, dns.rdatatype.SOA, text, dns.name.root, relativize=False
            )
            soa = dns.rrset.from_rdata_list(zone, _NEG_TTL_S, [rdata])
            out.rrsets[(zone, dns.rdatatype.SOA)] = soa
        out.soas[zone] = soa
    return out


def _header_only(query_id: int, flags_byte: int, rcode: int) -> bytes:
    """A response with no sections, echoing the query's opcode and RD bit (RFC 1035 §4.1.1)."""
    flags = 0x8000 | ((flags_byte & 0x79) << 8) | rcode  # QR | opcode | RD, then RCODE
    return _HEADER.pack(query_id, flags, 0, 0, 0, 0)


class DnsCore:
    """Authoritative answers from split-horizon views; counters per view and rcode."""

    def __init__(self, views: Sequence[View], *, max_udp_payload_bytes: int = 1232) -> None:
        # 1232 bytes: the DNS Flag Day 2020 default EDNS buffer, safe from IP fragmentation.
        self._views = tuple(views)
        self._compiled = {v.name: compile_view(v) for v in self._views}
        if len(self._compiled) != len(self._views):
            raise ValueError("view names must be unique")
        self._max_udp = max(UDP_CLASSIC_MAX_BYTES, min(max_udp_payload_bytes, TCP_MAX_BYTES))
        self._counts: dict[str, Counter[str]] = {v.name: Counter() for v in self._views}
        self._counts["-"] = Counter()  # clients no view matches
        self._queries = 0
        self._dropped = 0
        self._truncated = 0

    @property
    def views(self) -> tuple[View, ...]:
        return self._views

    def handle_query(self, wire: bytes, client_ip: str, *, tcp: bool) -> bytes | None:
        """The response to one DNS message, or None when it must be dropped."""
        event = self.receive_query(wire, client_ip, tcp=tcp)
        return event.wire if isinstance(event, QueryAnswered) else None

    def receive_query(self, wire: bytes, client_ip: str, *, tcp: bool) -> QueryAnswered | QueryDropped:
        """Like `handle_query`, but returns the typed event (for logs and tests)."""
        self._queries += 1
        view = select_view(self._views, client_ip)
        compiled = self._compiled[view.name] if view is not None else None
        if len(wire) < 2:
            return self._drop(client_ip, tcp, "no query id")
        flags_byte = wire[2] if len(wire) > 2 else 0
        if flags_byte & 0x80:  # QR set: a response; answering it could loop (RFC 1035 §4.1.1)
            return self._drop(client_ip, tcp, "message is a response")
        query_id = int.from_bytes(wire[:2], "big")
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # dnspython raises many exception types on hostile input
            return self._raw(client_ip, tcp, view, query_id, flags_byte, dns.rcode.FORMERR)
        if query.opcode() != dns.opcode.QUERY:  # NOTIFY, UPDATE...: not for a lab server
            return self._raw(client_ip, tcp, view, query_id, flags_byte, dns.rcode.NOTIMP)
        response, qname, qtype = self._respond(query, compiled)
        return self._render(client_ip, tcp, view, query, response, qname, qtype)

    def stats(self) -> dict[str, Any]:
        """``{"queries", "dropped", "truncated", "views": {view: {rcode: n}}}``; view "-" = no match."""
        return {
            "queries": self._queries,
            "dropped": self._dropped,
            "truncated": self._truncated,
            "views": {name: dict(c) for name, c in self._counts.items()},
        }

    # -- answering ----------------------------------------------------------------------

    def _respond(
        self, query: dns.message.Message, view: _CompiledView | None
    ) -> tuple[dns.message.Message, str | None, str | None]:
        response = dns.message.make_response(query, our_payload=self._max_udp)
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response, None, None
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        names = qname.to_text(), dns.rdatatype.to_text(qtype)
        if query.edns > 0:  # RFC 6891 §6.1.3: we speak EDNS version 0 only
            response.set_rcode(dns.rcode.BADVERS)
        elif qtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
            response.set_rcode(dns.rcode.REFUSED)  # no zone transfers from the lab
        elif dns.rdatatype.is_metatype(qtype) and qtype != dns.rdatatype.ANY:
            response.set_rcode(dns.rcode.FORMERR)  # OPT, TSIG... are not questions
        elif question.rdclass != dns.rdataclass.IN or view is None or view.zone_of(qname) is None:
            response.set_rcode(dns.rcode.REFUSED)
        else:
            self._answer(view, qname, qtype, response)
        return response, *names

    def _answer(
        self,
        view: _CompiledView,
        qname: dns.name.Name,
        qtype: dns.rdatatype.RdataType,
        response: dns.message.Message,
    ) -> None:
        response.flags |= dns.flags.AA
        name = qname
        for _ in range(MAX_CNAME_CHAIN):
            zone = view.zone_of(name)
            if zone is None:
                return  # CNAME left our zones: the client resolves the rest
            found = self._lookup(view, name, qtype)
            if found:
                response.answer.extend(found)
                response.additional.extend(self._additional(view, found))
                return
            alias = view.rrsets.get((name, dns.rdatatype.CNAME))
            if alias is not None and qtype != dns.rdatatype.CNAME:
                response.answer.append(alias)
                name = alias[0].target
                continue
            if name not in view.names:
                response.set_rcode(dns.rcode.NXDOMAIN)  # RFC 6604: rcode of the last name
            response.authority.append(self._negative_soa(view.soas[zone]))
            return

    @staticmethod
    def _lookup(
        view: _CompiledView, name: dns.name.Name, qtype: dns.rdatatype.RdataType
    ) -> list[dns.rrset.RRset]:
        if qtype == dns.rdatatype.ANY:
            return [rrset for (owner, _), rrset in view.rrsets.items() if owner == name]
        rrset = view.rrsets.get((name, qtype))
        return [rrset] if rrset is not None else []

    @staticmethod
    def _additional(view: _CompiledView, answer: Iterable[dns.rrset.RRset]) -> list[dns.rrset.RRset]:
        """A/AAAA for SRV, MX and NS targets we hold (RFC 2782 "Usage rules", RFC 1035 §3.3.9)."""
        targets: list[dns.name.Name] = []
        for rrset in answer:
            attr = _TARGET_FIELD.get(rrset.rdtype, "")
            for rdata in rrset if attr else ():
                target = getattr(rdata, attr)
                if isinstance(target, dns.name.Name) and target not in targets:
                    targets.append(target)
        found = (view.rrsets.get((target, rdtype)) for target in targets for rdtype in _ADDRESS_TYPES)
        return [rrset for rrset in found if rrset is not None]

    @staticmethod
    def _negative_soa(soa: dns.rrset.RRset) -> dns.rrset.RRset:
        """The SOA for a negative answer, with TTL min(SOA TTL, SOA minimum) (RFC 2308 §3)."""
        ttl = min(soa.ttl, soa[0].minimum)
        return dns.rrset.from_rdata_list(soa.name, ttl, list(soa))

    # -- output -------------------------------------------------------------------------

    def _render(
        self,
        client_ip: str,
        tcp: bool,
        view: View | None,
        query: dns.message.Message,
        response: dns.message.Message,
        qname: str | None,
        qtype: str | None,
    ) -> QueryAnswered:
        if tcp:
            limit = TCP_MAX_BYTES
        elif query.edns < 0:
            limit = UDP_CLASSIC_MAX_BYTES
        else:  # RFC 6891 §6.2.5: values below 512 are treated as 512
            limit = max(UDP_CLASSIC_MAX_BYTES, min(query.payload, self._max_udp))
        # Additional records are dropped first and silently; TC only when the answer or
        # authority would be cut (RFC 2181 §9).
        wire = response.to_wire(max_size=limit, prefer_truncation=True)
        truncated = bool(wire[2] & 0x02)
        return self._answered(client_ip, tcp, view, qname, qtype, response.rcode(), truncated, wire)

    def _raw(
        self, client_ip: str, tcp: bool, view: View | None, query_id: int, flags_byte: int, rcode: int
    ) -> QueryAnswered:
        wire = _header_only(query_id, flags_byte, rcode)
        return self._answered(client_ip, tcp, view, None, None, dns.rcode.Rcode(rcode), False, wire)

    def _answered(
        self,
        client_ip: str,
        tcp: bool,
        view: View | None,
        qname: str | None,
        qtype: str | None,
        rcode: dns.rcode.Rcode,
        truncated: bool,
        wire: bytes,
    ) -> QueryAnswered:
        rcode_text = dns.rcode.to_text(rcode)
        view_name = view.name if view is not None else None
        self._counts[view_name or "-"][rcode_text] += 1
        self._truncated += truncated
        return QueryAnswered(client_ip, tcp, view_name, qname, qtype, rcode_text, truncated, wire)

    def _drop(self, client_ip: str, tcp: bool, reason: str) -> QueryDropped:
        self._dropped += 1
        return QueryDropped(client_ip, tcp, reason)
