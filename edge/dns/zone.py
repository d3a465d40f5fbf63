"""Zone data for the lab's split-horizon DNS: records and BIND-style views.

The lab answers clients differently depending on where they are (shared/spec/MRA.md §3): a client
outside sees only ``_collab-edge._tls.<domain>`` (and so uses MRA through Expressway-E), while
inside hosts such as Expressway-C also see ``_cisco-uds._tcp`` and ``_cuplogin._tcp``. A `View`
is BIND's ``view { match-clients { ... }; }``: the first view whose ``match_clients`` contains the
client's source address answers; an empty ``match_clients`` matches everyone (put it last).

Records hold their data in zone-file text, so the tables read like a zone file and dnspython does
the parsing (`compile_view` fails fast on a typo, before the server binds anything).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.reversename

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_TTL_S = 300


@dataclass(frozen=True)
class Record:
    """One resource record; ``rdata`` is zone-file text relative to the root.

    Examples: SRV ``"10 10 8443 expe.example.com."``, A ``"127.10.1.10"``,
    PTR ``"ucm1.example.com."``. ``name`` may omit the trailing dot.
    """

    name: str
    rtype: str
    ttl: int
    rdata: str

    def __post_init__(self) -> None:
        if not 0 <= self.ttl <= 0x7FFFFFFF:  # RFC 2181 §8
            raise ValueError(f"{self.name} {self.rtype}: TTL out of range: {self.ttl}")

    @property
    def owner(self) -> dns.name.Name:
        return dns.name.from_text(self.name)

    @property
    def rdatatype(self) -> dns.rdatatype.RdataType:
        return dns.rdatatype.from_text(self.rtype)

    def to_rdata(self) -> dns.rdata.Rdata:
        """Parse ``rdata``; raises ValueError naming the record when it is not valid zone text."""
        try:
            return dns.rdata.from_text(
                dns.rdataclass.IN, self.rdatatype, self.rdata, dns.name.root, relativize=False
            )
        except Exception as exc:  # dnspython raises many types for bad text; report one
            raise ValueError(f"{self.name} {self.rtype} {self.rdata!r}: {exc}") from exc


@dataclass(frozen=True)
class View:
    """A BIND-style view: who it answers (``match_clients``), for which zones, with which data."""

    name: str
    match_clients: tuple[IPNetwork, ...]
    zones: tuple[str, ...]
    records: tuple[Record, ...]

    def matches(self, client: IPAddress | None) -> bool:
        """True if this view answers `client` (an empty ``match_clients`` matches everyone)."""
        if not self.match_clients:
            return True
        if client is None:
            return False
        return any(client.version == net.version and client in net for net in self.match_clients)


def parse_client_ip(text: str) -> IPAddress | None:
    """The client's address as the socket reports it; IPv4-mapped IPv6 counts as IPv4."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def select_view(views: tuple[View, ...] | list[View], client_ip: str) -> View | None:
    """The first view matching `client_ip` (BIND match-clients order), or None."""
    client = parse_client_ip(client_ip)
    for view in views:
        if view.matches(client):
            return view
    return None


def networks(*prefixes: str) -> tuple[IPNetwork, ...]:
    """``networks("127.10.3.0/24", "::1/128")`` for `View.match_clients`."""
    return tuple(ipaddress.ip_network(p, strict=False) for p in prefixes)


def _absolute(name: str) -> str:
    return name if name.endswith(".") else name + "."


def srv(
    name: str, target: str, port: int, priority: int = 10, weight: int = 10, ttl: int = DEFAULT_TTL_S
) -> Record:
    """An SRV record (RFC 2782), e.g. ``srv("_collab-edge._tls.example.com", "expe.example.com", 8443)``."""
    return Record(name, "SRV", ttl, f"{priority} {weight} {port} {_absolute(target)}")


def a(name: str, ip: str, ttl: int = DEFAULT_TTL_S) -> Record:
    """An A record, or AAAA when `ip` is an IPv6 address."""
    addr = ipaddress.ip_address(ip)
    return Record(name, "A" if addr.version == 4 else "AAAA", ttl, str(addr))


def ptr_for(ip: str, name: str, ttl: int = DEFAULT_TTL_S) -> Record:
    """The PTR record for `ip` (in in-addr.arpa / ip6.arpa) pointing at `name`."""
    owner = dns.reversename.from_address(str(ipaddress.ip_address(ip)))
    return Record(owner.to_text(), "PTR", ttl, _absolute(name))


def cname(name: str, target: str, ttl: int = DEFAULT_TTL_S) -> Record:
    return Record(name, "CNAME", ttl, _absolute(target))
