"""The split-horizon lab DNS (edge/dns): zone data, the sans-IO core, the UDP+TCP server, the resolver.

Core tests feed wire bytes straight into `DnsCore`; loopback tests run `DnsServer` on 127.0.0.1 with
an ephemeral port and query it from different 127/8 source addresses (any of them works on Linux
`lo` without configuration), so the "internal" view (127.10.3.0/24) and the "external" view
(everyone else) both answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.config import LabConfig
from edge.dns.core import DnsCore
from edge.dns.events import QueryAnswered, QueryDropped
from edge.dns.framing import FrameTooLarge, TcpFramer, frame
from edge.dns.lab import lab_views
from edge.dns.resolver import DnsLookupError, LabResolver, SrvTarget, rfc2782_order, sort_srv
from edge.dns.server import DnsServer
from edge.dns.zone import Record, View, a, cname, networks, ptr_for, select_view, srv

INSIDE = "127.10.3.7"
OUTSIDE = "127.0.0.1"
OUTSIDE_2 = "127.10.1.99"
MANY = 60  # SRV records under _many._tcp: about 2.3 kB, above 512 and 1232 bytes


def internal_view() -> View:
    return View(
        "internal",
        networks("127.10.3.0/24"),
        ("example.com", "127.in-addr.arpa"),
        (
            srv("_cisco-uds._tcp.example.com", "ucm1.example.com", 8443),
            srv("_cuplogin._tcp.example.com", "imp1.example.com", 8443),
            a("ucm1.example.com", "127.10.3.20"),
            a("imp1.example.com", "127.10.3.30"),
            a("expe.example.com", "127.10.2.10"),
            ptr_for("127.10.3.20", "ucm1.example.com"),
            cname("uds.example.com", "ucm1.example.com"),
            *(srv("_many._tcp.example.com", f"host{i:03d}.example.com", 5000 + i) for i in range(MANY)),
        ),
    )


def external_view() -> View:
    return View(
        "external",
        (),
        ("example.com", "127.in-addr.arpa"),
        (
            srv("_collab-edge._tls.example.com", "expe.example.com", 8443),
            a("expe.example.com", "127.10.1.10"),
            ptr_for("127.10.1.10", "expe.example.com"),
        ),
    )


def make_core(**kwargs: int) -> DnsCore:
    return DnsCore([internal_view(), external_view()], **kwargs)


def ask(
    core: DnsCore, qname: str, qtype: str, client: str = OUTSIDE, *, tcp: bool = False, **query_kw: Any
) -> dns.message.Message:
    query = dns.message.make_query(qname, qtype, **query_kw)
    wire = core.handle_query(query.to_wire(), client, tcp=tcp)
    assert wire is not None
    response = dns.message.from_wire(wire)
    assert response.id == query.id
    assert response.flags & dns.flags.QR
    return response


def answer_texts(response: dns.message.Message) -> list[str]:
    return sorted(rdata.to_text() for rrset in response.answer for rdata in rrset)


# -- zone data ----------------------------------------------------------------------------


def test_record_helpers_produce_zone_text() -> None:
    assert srv("_collab-edge._tls.example.com", "expe.example.com", 8443) == Record(
        "_collab-edge._tls.example.com", "SRV", 300, "10 10 8443 expe.example.com."
    )
    assert a("expe.example.com", "127.10.1.10") == Record("expe.example.com", "A", 300, "127.10.1.10")
    assert a("v6.example.com", "::1").rtype == "AAAA"
    assert ptr_for("127.10.3.20", "ucm1.example.com") == Record(
        "20.3.10.127.in-addr.arpa.", "PTR", 300, "ucm1.example.com."
    )


def test_first_matching_view_wins_and_empty_match_clients_matches_everyone() -> None:
    views = (internal_view(), external_view())
    assert select_view(views, "127.10.3.200") is views[0]
    assert select_view(views, "::ffff:127.10.3.1") is views[0]  # IPv4-mapped counts as IPv4
    assert select_view(views, "127.10.4.1") is views[1]
    assert select_view(views, "::1") is views[1]
    assert select_view(views[:1], "127.0.0.1") is None


def test_bad_zone_data_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="outside the view's zones"):
        DnsCore([View("v", (), ("example.com",), (a("host.example.org", "127.0.0.1"),))])
    with pytest.raises(ValueError, match="not-a-number"):
        DnsCore([View("v", (), ("example.com",), (Record("x.example.com", "A", 60, "not-a-number"),))])
    with pytest.raises(ValueError, match="CNAME and other data"):
        DnsCore(
            [
                View(
                    "v",
                    (),
                    ("example.com",),
                    (cname("x.example.com", "y.example.com"), a("x.example.com", "127.0.0.1")),
                )
            ]
        )
    with pytest.raises(ValueError, match="TTL"):
        Record("x.example.com", "A", -1, "127.0.0.1")


def test_lab_views_split_the_default_lab() -> None:
    core = DnsCore(lab_views(LabConfig()))
    inside = ask(core, "_cisco-uds._tcp.example.com", "SRV", "127.10.3.10")
    assert answer_texts(inside) == ["10 10 8443 ucm1.example.com."]
    assert ask(core, "expe.example.com", "A", "127.10.3.10").answer[0][0].address == "127.10.2.10"
    outside = ask(core, "_cisco-uds._tcp.example.com", "SRV", "127.10.1.50")
    assert outside.rcode() == dns.rcode.NXDOMAIN
    edge = ask(core, "_collab-edge._tls.example.com", "SRV", "127.10.1.50")
    assert answer_texts(edge) == ["10 10 8443 expe.example.com."]
    assert [r.address for rrset in edge.additional for r in rrset] == ["127.10.1.10"]
    ptr = ask(core, "20.3.10.127.in-addr.arpa", "PTR", "127.10.3.10")
    assert answer_texts(ptr) == ["ucm1.example.com."]


# -- core: answers ------------------------------------------------------------------------


def test_external_view_answers_collab_edge_with_target_address_in_additional() -> None:
    response = ask(make_core(), "_collab-edge._tls.example.com", "SRV", OUTSIDE)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert answer_texts(response) == ["10 10 8443 expe.example.com."]
    assert len(response.additional) == 1
    assert response.additional[0].name == dns.name.from_text("expe.example.com")
    assert response.additional[0][0].address == "127.10.1.10"


def test_external_view_hides_internal_services_with_nxdomain_and_soa() -> None:
    response = ask(make_core(), "_cisco-uds._tcp.example.com", "SRV", OUTSIDE)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.flags & dns.flags.AA
    assert response.answer == []
    (soa,) = response.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.name == dns.name.from_text("example.com")
    assert soa.ttl == soa[0].minimum  # RFC 2308 §3 negative TTL


def test_internal_view_answers_uds_cuplogin_a_and_ptr() -> None:
    core = make_core()
    uds = ask(core, "_cisco-uds._tcp.example.com", "SRV", INSIDE)
    assert answer_texts(uds) == ["10 10 8443 ucm1.example.com."]
    assert uds.additional[0][0].address == "127.10.3.20"
    assert answer_texts(ask(core, "_cuplogin._tcp.example.com", "SRV", INSIDE)) == [
        "10 10 8443 imp1.example.com."
    ]
    assert answer_texts(ask(core, "expe.example.com", "A", INSIDE)) == ["127.10.2.10"]
    assert answer_texts(ask(core, "expe.example.com", "A", OUTSIDE)) == ["127.10.1.10"]
    assert answer_texts(ask(core, "20.3.10.127.in-addr.arpa", "PTR", INSIDE)) == ["ucm1.example.com."]
    # The internal view has no _collab-edge: an inside client does not use MRA (spec §3).
    assert ask(core, "_collab-edge._tls.example.com", "SRV", INSIDE).rcode() == dns.rcode.NXDOMAIN


def test_existing_name_other_type_and_empty_non_terminal_are_nodata() -> None:
    core = make_core()
    for qname, qtype in [("expe.example.com", "AAAA"), ("_tls.example.com", "SRV"), ("example.com", "A")]:
        response = ask(core, qname, qtype)
        assert response.rcode() == dns.rcode.NOERROR, qname
        assert response.answer == []
        assert [rrset.rdtype for rrset in response.authority] == [dns.rdatatype.SOA]


def test_names_outside_the_zones_are_refused_without_aa() -> None:
    response = ask(make_core(), "www.example.org", "A")
    assert response.rcode() == dns.rcode.REFUSED
    assert not response.flags & dns.flags.AA
    assert response.question[0].name == dns.name.from_text("www.example.org")


def test_case_insensitive_lookup_echoes_question_case() -> None:
    response = ask(make_core(), "EXPE.Example.COM", "A")
    assert response.question[0].name.to_text() == "EXPE.Example.COM."
    assert answer_texts(response) == ["127.10.1.10"]


def test_cname_is_followed_inside_the_view() -> None:
    response = ask(make_core(), "uds.example.com", "A", INSIDE)
    assert [rrset.rdtype for rrset in response.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert response.answer[1][0].address == "127.10.3.20"


def test_soa_and_any_queries() -> None:
    core = make_core()
    assert ask(core, "example.com", "SOA").answer[0].rdtype == dns.rdatatype.SOA
    types = {rrset.rdtype for rrset in ask(core, "expe.example.com", "ANY").answer}
    assert types == {dns.rdatatype.A}
    assert ask(core, "example.com", "AXFR", tcp=True).rcode() == dns.rcode.REFUSED


# -- core: errors and limits --------------------------------------------------------------


def test_garbage_with_a_query_id_gets_formerr() -> None:
    core = make_core()
    wire = core.handle_query(b"\xbe\xef\x01\x00\x00\x01garbage", OUTSIDE, tcp=False)
    assert wire is not None
    response = dns.message.from_wire(wire)
    assert response.id == 0xBEEF
    assert response.rcode() == dns.rcode.FORMERR
    assert response.flags & dns.flags.QR and response.flags & dns.flags.RD


def test_input_without_a_query_id_or_a_response_is_dropped() -> None:
    core = make_core()
    assert core.handle_query(b"", OUTSIDE, tcp=False) is None
    assert core.handle_query(b"\x01", OUTSIDE, tcp=True) is None
    reply = dns.message.make_response(dns.message.make_query("example.com", "A")).to_wire()
    event = core.receive_query(reply, OUTSIDE, tcp=False)
    assert isinstance(event, QueryDropped) and event.reason == "message is a response"
    assert core.stats()["dropped"] == 3


def test_non_query_opcode_is_notimp_and_edns_version_1_is_badvers() -> None:
    core = make_core()
    notify = dns.message.make_query("example.com", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    wire = core.handle_query(notify.to_wire(), OUTSIDE, tcp=False)
    assert wire is not None and dns.message.from_wire(wire).rcode() == dns.rcode.NOTIMP
    response = ask(core, "expe.example.com", "A", use_edns=1)
    assert response.rcode() == dns.rcode.BADVERS
    assert response.edns == 0


def test_udp_without_edns_truncates_at_512_bytes() -> None:
    core = make_core()
    query = dns.message.make_query("_many._tcp.example.com", "SRV")
    wire = core.handle_query(query.to_wire(), INSIDE, tcp=False)
    assert wire is not None and len(wire) <= 512
    assert dns.message.from_wire(wire).flags & dns.flags.TC
    event = core.receive_query(query.to_wire(), INSIDE, tcp=True)
    assert isinstance(event, QueryAnswered) and not event.truncated
    assert len(answer_texts(dns.message.from_wire(event.wire))) == MANY
    assert core.stats()["truncated"] == 1


def test_udp_with_edns_uses_the_smaller_of_both_payload_sizes() -> None:
    core = make_core(max_udp_payload_bytes=4096)
    big = ask(core, "_many._tcp.example.com", "SRV", INSIDE, use_edns=0, payload=4096)
    assert not big.flags & dns.flags.TC and len(big.answer[0]) == MANY
    small = ask(core, "_many._tcp.example.com", "SRV", INSIDE, use_edns=0, payload=1232)
    assert small.flags & dns.flags.TC
    capped = ask(make_core(), "_many._tcp.example.com", "SRV", INSIDE, use_edns=0, payload=4096)
    assert capped.flags & dns.flags.TC  # our own default cap is 1232 bytes


def test_additional_records_are_dropped_before_setting_tc() -> None:
    records = tuple(srv("_s._tcp.example.com", f"h{i}.example.com", 1) for i in range(12))
    addresses = tuple(a(f"h{i}.example.com", f"127.0.0.{i + 1}") for i in range(12))
    core = DnsCore([View("v", (), ("example.com",), records + addresses)])
    response = ask(core, "_s._tcp.example.com", "SRV")
    assert not response.flags & dns.flags.TC  # RFC 2181 §9: only the additional section was cut
    assert len(response.answer[0]) == 12
    assert 0 < len(response.additional) < 12


def test_stats_count_per_view_and_rcode() -> None:
    core = make_core()
    ask(core, "_cisco-uds._tcp.example.com", "SRV", INSIDE)
    ask(core, "_cisco-uds._tcp.example.com", "SRV", OUTSIDE)
    ask(core, "www.example.org", "A", OUTSIDE)
    core.handle_query(b"\x00\x01\x00", OUTSIDE, tcp=False)
    stats = core.stats()
    assert stats["queries"] == 4
    assert stats["views"]["internal"] == {"NOERROR": 1}
    assert stats["views"]["external"] == {"NXDOMAIN": 1, "REFUSED": 1, "FORMERR": 1}


FUZZ_CORE = make_core()  # only its counters change between examples


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_core_never_raises_on_arbitrary_bytes(data: bytes, tcp: bool) -> None:
    wire = FUZZ_CORE.handle_query(data, OUTSIDE, tcp=tcp)
    if wire is not None:
        assert wire[:2] == data[:2]
        assert wire[2] & 0x80  # QR
        dns.message.from_wire(wire)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["_collab-edge._tls.example.com", "expe.example.com", "nope.example.com"]),
    st.sampled_from(["A", "SRV", "TXT", "ANY"]),
    st.integers(0, 0xFFFF),
)
def test_core_answers_mutated_queries(qname: str, qtype: str, flip: int) -> None:
    wire = bytearray(dns.message.make_query(qname, qtype).to_wire())
    wire[flip % len(wire)] ^= flip >> 8 or 1  # corrupt one byte anywhere after parsing works
    out = FUZZ_CORE.handle_query(bytes(wire), OUTSIDE, tcp=False)
    assert out is None or dns.message.from_wire(out).id == int.from_bytes(wire[:2], "big")


# -- TCP framing --------------------------------------------------------------------------


def test_framer_gives_the_same_messages_byte_by_byte() -> None:
    messages = [b"\x00\x01" + bytes(20), b"\x00\x02" + bytes(300), b"\x00\x03" + bytes(12)]
    stream = b"".join(frame(m) for m in messages)
    assert TcpFramer().receive_data(stream) == messages
    framer = TcpFramer()
    got = [m for i in range(len(stream)) for m in framer.receive_data(stream[i : i + 1])]
    assert got == messages and framer.buffered_bytes == 0


@given(st.lists(st.binary(min_size=12, max_size=100), max_size=5), st.lists(st.integers(0, 600), max_size=8))
def test_framer_is_independent_of_segmentation(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(m) for m in messages)
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    framer = TcpFramer()
    got = [m for lo, hi in itertools.pairwise(bounds) for m in framer.receive_data(stream[lo:hi])]
    assert got == messages


def test_framer_rejects_an_oversize_length() -> None:
    with pytest.raises(FrameTooLarge):
        TcpFramer(max_message_bytes=512).receive_data(b"\x02\x01")


# -- SRV ordering -------------------------------------------------------------------------


def test_srv_sorting_is_priority_then_weight() -> None:
    targets = [SrvTarget(20, 50, 1, "c"), SrvTarget(10, 10, 1, "b"), SrvTarget(10, 60, 1, "a")]
    assert [t.target for t in sort_srv(targets)] == ["a", "b", "c"]
    ordered = rfc2782_order(targets, random.Random(7))
    assert sorted(ordered) == sorted(targets) and ordered[-1].target == "c"


# -- loopback server ----------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    srv_ = DnsServer(make_core(), "127.0.0.1", 0, tcp_idle_timeout_s=0.3, max_tcp_connections=3)
    await srv_.start()
    try:
        yield srv_
    finally:
        await srv_.stop()


async def query(server: DnsServer, qname: str, qtype: str, source: str, *, tcp: bool) -> dns.message.Message:
    q = dns.message.make_query(qname, qtype)
    send = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
    return await send(q, "127.0.0.1", timeout=5.0, port=server.bound_port, source=source)


async def test_listeners_share_one_ephemeral_port(server: DnsServer) -> None:
    udp, tcp = server.listeners
    assert (udp.transport, tcp.transport) == ("udp", "tcp")
    assert udp.port == tcp.port == server.bound_port != 0
    assert udp.host == "127.0.0.1"


@pytest.mark.parametrize("tcp", [False, True])
async def test_split_horizon_over_the_wire(server: DnsServer, tcp: bool) -> None:
    for source in (OUTSIDE, OUTSIDE_2):
        edge = await query(server, "_collab-edge._tls.example.com", "SRV", source, tcp=tcp)
        assert answer_texts(edge) == ["10 10 8443 expe.example.com."]
        assert edge.additional[0][0].address == "127.10.1.10"
        hidden = await query(server, "_cisco-uds._tcp.example.com", "SRV", source, tcp=tcp)
        assert hidden.rcode() == dns.rcode.NXDOMAIN
    uds = await query(server, "_cisco-uds._tcp.example.com", "SRV", INSIDE, tcp=tcp)
    assert answer_texts(uds) == ["10 10 8443 ucm1.example.com."]
    cup = await query(server, "_cuplogin._tcp.example.com", "SRV", INSIDE, tcp=tcp)
    assert answer_texts(cup) == ["10 10 8443 imp1.example.com."]
    assert answer_texts(await query(server, "ucm1.example.com", "A", INSIDE, tcp=tcp)) == ["127.10.3.20"]
    ptr = await query(server, "20.3.10.127.in-addr.arpa", "PTR", INSIDE, tcp=tcp)
    assert answer_texts(ptr) == ["ucm1.example.com."]
    refused = await query(server, "www.example.org", "A", INSIDE, tcp=tcp)
    assert refused.rcode() == dns.rcode.REFUSED


async def test_resolver_falls_back_to_tcp_on_truncation(server: DnsServer) -> None:
    resolver = LabResolver("127.0.0.1", server.bound_port, source=INSIDE)
    targets = await resolver.resolve_srv("_many._tcp.example.com")
    assert len(targets) == MANY and resolver.tcp_fallbacks == 1
    assert targets == sort_srv(targets)
    assert targets[0] == SrvTarget(10, 10, 5000, "host000.example.com")


async def test_resolver_api_and_typed_errors(server: DnsServer) -> None:
    inside = LabResolver("127.0.0.1", server.bound_port, source=INSIDE)
    outside = LabResolver("127.0.0.1", server.bound_port, source=OUTSIDE_2)
    assert await inside.resolve_srv("_cisco-uds._tcp.example.com") == [
        SrvTarget(10, 10, 8443, "ucm1.example.com")
    ]
    assert await inside.resolve_a("uds.example.com") == ["127.10.3.20"]  # through the CNAME
    assert await inside.resolve_ptr("127.10.3.20") == ["ucm1.example.com"]
    assert await outside.resolve_a("expe.example.com") == ["127.10.1.10"]
    assert await outside.resolve_a("_collab-edge._tls.example.com") == []  # NODATA is not an error
    with pytest.raises(DnsLookupError) as nx:
        await outside.resolve_srv("_cisco-uds._tcp.example.com")
    assert (nx.value.name, nx.value.rtype, nx.value.reason) == (
        "_cisco-uds._tcp.example.com",
        "SRV",
        "NXDOMAIN",
    )
    with pytest.raises(DnsLookupError) as refused:
        await outside.resolve_a("www.example.org")
    assert refused.value.reason == "REFUSED"


async def test_resolver_timeout_is_a_typed_error() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        resolver = LabResolver("127.0.0.1", silent.getsockname()[1], timeout_s=0.2)
        with pytest.raises(DnsLookupError) as err:
            await resolver.resolve_a("expe.example.com")
        assert err.value.reason == "timeout"
    finally:
        silent.close()


async def test_resolver_cache_honours_ttl_with_a_fake_clock(server: DnsServer) -> None:
    now = [1000.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    resolver = LabResolver("127.0.0.1", server.bound_port, source=INSIDE, cache_entries=8, clock=clock)
    for _ in range(3):
        assert await resolver.resolve_a("ucm1.example.com") == ["127.10.3.20"]
    assert resolver.queries_sent == 1
    now[0] += 301  # the A record's TTL is 300 s
    await resolver.resolve_a("ucm1.example.com")
    assert resolver.queries_sent == 2
    uncached = LabResolver("127.0.0.1", server.bound_port, source=INSIDE)  # cache is off by default
    for _ in range(2):
        await uncached.resolve_a("ucm1.example.com")
    assert uncached.queries_sent == 2


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.received.put_nowait(data)


async def test_garbage_datagrams_get_formerr_or_are_dropped_and_serving_continues(server: DnsServer) -> None:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        _Datagrams, local_addr=(OUTSIDE_2, 0), remote_addr=("127.0.0.1", server.bound_port)
    )
    try:
        transport.sendto(b"\x00")  # no query id: dropped
        transport.sendto(b"\x12\x34\x00\x00\xff\xff junk")
        formerr = dns.message.from_wire(await asyncio.wait_for(proto.received.get(), 5.0))
        assert (formerr.id, formerr.rcode()) == (0x1234, dns.rcode.FORMERR)
        good = dns.message.make_query("expe.example.com", "A")
        transport.sendto(good.to_wire())
        answer = dns.message.from_wire(await asyncio.wait_for(proto.received.get(), 5.0))
        assert answer.id == good.id and answer_texts(answer) == ["127.10.1.10"]
        assert proto.received.empty()  # nothing ever came back for the 1-byte datagram
    finally:
        transport.close()
    ok = await query(server, "_collab-edge._tls.example.com", "SRV", OUTSIDE, tcp=False)
    assert ok.rcode() == dns.rcode.NOERROR


async def open_tcp(
    server: DnsServer, source: str = INSIDE
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.bound_port, local_addr=(source, 0))


async def read_frame(reader: asyncio.StreamReader) -> dns.message.Message:
    length = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 5.0), "big")
    return dns.message.from_wire(await asyncio.wait_for(reader.readexactly(length), 5.0))


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def test_tcp_pipelined_queries_on_one_connection(server: DnsServer) -> None:
    reader, writer = await open_tcp(server)
    try:
        queries = [dns.message.make_query(n, "A") for n in ("ucm1.example.com", "imp1.example.com")]
        queries.append(dns.message.make_query("_many._tcp.example.com", "SRV"))
        stream = b"".join(frame(q.to_wire()) for q in queries)
        for i in range(0, len(stream), 7):  # split across segments on purpose
            writer.write(stream[i : i + 7])
            await writer.drain()
        answers = [await read_frame(reader) for _ in queries]
        assert [r.id for r in answers] == [q.id for q in queries]
        assert answer_texts(answers[0]) == ["127.10.3.20"]
        assert answer_texts(answers[1]) == ["127.10.3.30"]
        assert len(answers[2].answer[0]) == MANY and not answers[2].flags & dns.flags.TC
    finally:
        await close(writer)


async def test_tcp_oversize_message_closes_the_connection(server: DnsServer) -> None:
    reader, writer = await open_tcp(server)
    try:
        writer.write(b"\xff\xff")  # announces 65535 bytes, above max_tcp_query_bytes
        assert await asyncio.wait_for(reader.read(), 5.0) == b""
        assert server.stats()["tcp_oversize"] == 1
    finally:
        await close(writer)


async def test_tcp_idle_connection_is_closed(server: DnsServer) -> None:
    reader, writer = await open_tcp(server)
    try:
        writer.write(frame(dns.message.make_query("ucm1.example.com", "A").to_wire()))
        assert answer_texts(await read_frame(reader)) == ["127.10.3.20"]
        # EOF arrives once the 0.3 s idle timeout fires; the bound only guards against a hang.
        assert await asyncio.wait_for(reader.read(), 5.0) == b""
    finally:
        await close(writer)


async def test_tcp_connection_count_is_bounded(server: DnsServer) -> None:
    conns = [await open_tcp(server) for _ in range(3)]
    try:
        for reader, writer in conns:  # the three allowed connections are served
            writer.write(frame(dns.message.make_query("ucm1.example.com", "A").to_wire()))
            assert (await read_frame(reader)).rcode() == dns.rcode.NOERROR
        reader, writer = await open_tcp(server)
        conns.append((reader, writer))
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            writer.write(frame(dns.message.make_query("ucm1.example.com", "A").to_wire()))
            await read_frame(reader)
        assert server.stats()["tcp_rejected"] == 1
    finally:
        for _, writer in conns:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_stop_releases_the_port() -> None:
    first = DnsServer(make_core(), "127.0.0.1", 0)
    await first.start()
    port = first.bound_port
    await first.stop()
    assert first.listeners == []
    again = DnsServer(make_core(), "127.0.0.1", port)
    await again.start()
    try:
        assert again.bound_port == port
    finally:
        await again.stop()


def test_server_runs_under_uvloop() -> None:
    """The loopback scenarios above, once more on uvloop (the runtime's loop, edge/runtime.py)."""

    async def scenario() -> str:
        dns_server = DnsServer(make_core(), "127.0.0.1", 0, tcp_idle_timeout_s=0.3, max_tcp_connections=3)
        await dns_server.start()
        try:
            await test_listeners_share_one_ephemeral_port(dns_server)
            await test_split_horizon_over_the_wire(dns_server, tcp=False)
            await test_split_horizon_over_the_wire(dns_server, tcp=True)
            await test_resolver_falls_back_to_tcp_on_truncation(dns_server)
            await test_garbage_datagrams_get_formerr_or_are_dropped_and_serving_continues(dns_server)
            await test_tcp_pipelined_queries_on_one_connection(dns_server)
            await test_tcp_idle_connection_is_closed(dns_server)
            await test_tcp_connection_count_is_bounded(dns_server)
            await test_tcp_oversize_message_closes_the_connection(dns_server)
        finally:
            await dns_server.stop()
        return type(asyncio.get_running_loop()).__module__

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()).startswith("uvloop")
