"""The lab's split-horizon DNS: zone data (`zone`), a sans-IO authoritative core (`core`), asyncio
UDP+TCP listeners (`server`) and an async stub resolver that binds its source address
(`resolver`). See shared/spec/MRA.md §3."""

from edge.dns.core import DnsCore
from edge.dns.events import QueryAnswered, QueryDropped
from edge.dns.resolver import DnsLookupError, LabResolver, SrvTarget
from edge.dns.server import DnsListener, DnsServer
from edge.dns.zone import Record, View, a, cname, networks, ptr_for, srv

__all__ = [
    "DnsCore",
    "DnsListener",
    "DnsLookupError",
    "DnsServer",
    "LabResolver",
    "QueryAnswered",
    "QueryDropped",
    "Record",
    "SrvTarget",
    "View",
    "a",
    "cname",
    "networks",
    "ptr_for",
    "srv",
]
