"""The hops' byte-level fast path (edge.sip.fastpath; edge_e.sip_fast, edge_c.sip_fast) against the
full parser: for generated REGISTERs and answers, a hop with its fast path sends exactly the bytes,
and keeps exactly the state (counters, registrations, client → zone map), that the same hop sends
and keeps with the full parser alone. Whatever the fast path declines goes the full way, so the
property covers the error answers too (483, 400, 404, ...)."""

from __future__ import annotations

# ruff: noqa: E501  (wire-format fixtures are kept one header per line)
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge.config import LabConfig, load_config
from edge.sip import fastpath
from edge.sip.events import FramingError, MessageFramed, MessageReceived
from edge.sip.framing import StreamFramer
from edge.sip.message import Request, Response, Validation, parse_message
from tests.sip_tools import CLIENT, FakeFlow, wire_edge


def lab_config(*overrides: str) -> LabConfig:
    return load_config(None, overrides=["lab.demo=false", *overrides], environ={})


class Hops:
    """E and C wired to fake flows; `fast` decides whether the byte-level path may run."""

    def __init__(self, config: LabConfig, fast: bool, salt: str = "5a17") -> None:
        self.config = config
        self.fast = fast
        w = wire_edge(config)
        self.e, self.c, self.conn = w.e, w.c, w.conn
        self.client, self.e_zone, self.c_zone, self.c_ucm = w.client, w.e_zone, w.c_zone, w.c_ucm
        self.e.salt = self.c.salt = salt

    def _deliver(
        self,
        validation: Validation,
        flow: FakeFlow,
        data: bytes,
        fast: Callable[[Any, MessageFramed], bool],
        slow: Callable[[Any, Request | Response], None],
    ) -> bool:
        """As SipFlow.data_received: fast path first, else parse (errors answered like SipFlow)."""
        framer = StreamFramer(validation=validation, split_heads=self.fast)
        (event,) = framer.receive_frames(data)
        assert isinstance(event, MessageFramed)
        if self.fast and fast(flow, event):
            return True
        parsed = framer.parse_frame(event)
        if isinstance(parsed, FramingError):
            flow.sent.append(b"framing error %d" % parsed.status_code)
            return False
        assert isinstance(parsed, MessageReceived)
        try:
            slow(flow, parsed.message)
        except Exception as exc:  # SipFlow answers these; here they only need to match
            flow.sent.append(f"raised {exc!r}".encode())
        return False

    def e_request(self, data: bytes) -> bool:
        return self._deliver(
            Validation.PROXY, self.client, data, self.e.fast.client_frame, self.e._client_message
        )

    def c_request(self, data: bytes) -> bool:
        slow: Callable[[Any, Request | Response], None] = lambda _f, m: self.c._zone_message(self.conn, m)  # noqa: E731
        return self._deliver(Validation.NONE, self.c_zone, data, self.c.fast.zone_frame, slow)

    def c_response(self, data: bytes) -> bool:
        return self._deliver(Validation.NONE, self.c_ucm, data, self.c.fast.ucm_frame, self.c._ucm_message)

    def e_response(self, data: bytes) -> bool:
        return self._deliver(Validation.NONE, self.e_zone, data, self.e.fast.zone_frame, self.e._zone_message)

    def state(self) -> Any:
        regs = self.e.registrations
        return (
            [f.sent for f in (self.client, self.e_zone, self.c_zone, self.c_ucm)],
            self.e.counters,
            self.c.counters,
            dict(self.c.client_edge),
            regs._count,
            {aor: sorted(b) for aor, b in regs._by_aor.items()},
        )


@contextmanager
def fixed_tags() -> Iterator[None]:
    """Error answers carry a random To tag: the same one for both runs."""
    with mock.patch("edge.sip.message.new_tag", return_value="fixedtag"):
        yield


def both(*overrides: str) -> tuple[Hops, Hops]:
    config = lab_config(*overrides)
    return Hops(config, fast=True), Hops(config, fast=False)


# -- generated messages -----------------------------------------------------------------------

C_ADDR = "127.10.3.10"  # the lab's Expressway-C (config default), as in the Route the lab hands out
ROUTE = f"<sip:{C_ADDR}:5061;transport=tls;zone-id=1;directed;lr>"
MRA_PARAMS = (
    ';+sip.instance="<urn:uuid:00000000-0000-4000-8000-000000000001>"'
    ';+u.sip!devicename.ccm.cisco.com="CSFLOAD00001";+u.sip!model.ccm.cisco.com="503";x-cisco-mra-ha=AR_SK'
)


def mostly(fine: list[Any], odd: list[Any]) -> st.SearchStrategy[Any]:
    """Seven times in eight something the fast path takes, else something it must decline."""
    return st.integers(0, 7).flatmap(lambda n: st.sampled_from(odd if n == 0 else fine))


names = {
    "via": st.sampled_from(["Via", "v", "VIA", "via"]),
    "from": st.sampled_from(["From", "f"]),
    "to": st.sampled_from(["To", "t", "TO"]),
    "call-id": st.sampled_from(["Call-ID", "i", "call-id"]),
    "contact": st.sampled_from(["Contact", "m", "CONTACT"]),
    "cl": st.sampled_from(["Content-Length", "l"]),
}
colon = st.sampled_from([": ", ":", ":  ", " : ", ":\t"])
client_via = st.builds(
    lambda t, hp, branch, rport, extra: f"SIP/2.0/{t} {hp}{branch}{rport}{extra}",
    st.sampled_from(["TLS", "tls", "TCP", "Tls"]),
    mostly(
        [f"{CLIENT[0]}:{CLIENT[1]}", CLIENT[0], "client.example.com:5061", f"{CLIENT[0]}:051000"],
        ["[2001:db8::1]:5061", "bad_host:1", "a..b:1"],
    ),
    mostly(
        [";branch=z9hG4bK-1-1-0", ";BRANCH=z9hG4bKx", ";branch=abc"],
        [";branch=z9hG4bK", "", ';branch="z9hG4bK1"'],
    ),
    st.sampled_from([";rport", "", ";rport=4444", ";RPORT", ";rportx;rport", ";rportx=1"]),
    mostly(
        ["", ";alias", ";a=b;c", ";lr"],
        [";received=203.0.113.9", ';x="q"', ";ingress-zone=X", " ;lr", ";", ";a="],
    ),
)
max_fwd = mostly(["70", "1", "255", " 16 "], [None, "0", "256", "abc", "0070", "-1"])
route = mostly(
    [None, ROUTE, f"<sip:{C_ADDR}:5061;transport=tls;lr>"],
    [
        f"<sip:{C_ADDR}:5061;transport=tls;zone-id=2;lr>",
        "<sip:127.10.2.20:5061;lr>",
        "<sip:127.10.2.10:7001;lr>",
        f"<sip:{C_ADDR};lr>",
        f"{ROUTE}, <sip:x.example.com;lr>",
        "<sip:bad host;lr>",
        "sip:y.example.com;lr",
        "",
    ],
)
contact = mostly(
    [
        None,
        f"<sip:20001@{CLIENT[0]}:{CLIENT[1]};transport=tls>{MRA_PARAMS}",
        f"<sip:20001@{CLIENT[0]}:{CLIENT[1]};transport=tls>",
        f"<sip:{CLIENT[0]}:{CLIENT[1]}>;expires=60",
        f"<sip:20001@{CLIENT[0]}:{CLIENT[1]};orig-hostport=1.2.3.4:5;TRANSPORT=udp>",
        f"<sips:20001@{CLIENT[0]}>",
    ],
    [
        f'"Alice" <sip:20001@{CLIENT[0]}:{CLIENT[1]};transport=tls>',
        "*",
        f"<sip:a@{CLIENT[0]}>, <sip:b@{CLIENT[0]}>",
        f"<SIP:20001@{CLIENT[0]}:{CLIENT[1]}>",
        f"<sip:20001@{CLIENT[0]}:{CLIENT[1]}?h=v>",
        f"sip:20001@{CLIENT[0]}:{CLIENT[1]}",
        "<sip:20001@bad_host>",
        "<sip:20001@h;a=>",
    ],
)
cseq = mostly(
    ["1 REGISTER", "2147483647 REGISTER", "1  REGISTER", "1\tREGISTER"],
    ["2147483648 REGISTER", "1 INVITE", "x REGISTER", "REGISTER"],
)
call_id = mostly(["1-4242@198.51.100.7", "x"], [""])
extra = st.lists(
    mostly(
        [
            "Expires: 120",
            "Supported: path",
            "User-Agent: x",
            "X-Odd: a:b",
            "Expires: abc",
            "Record-Route: <sip:x;lr>",
        ],
        ["Bad Name: x", " folded", "Allow: INVITE,\r\n ACK", "Subject: caf\u00e9", "NoColon"],
    ),
    max_size=3,
)
request_line = mostly(
    [
        "REGISTER sip:example.com SIP/2.0",
        "REGISTER sips:example.com SIP/2.0",
        "REGISTER tel:+1234 SIP/2.0",
        "REGISTER SIP:example.com SIP/2.0",
    ],
    [
        "REGISTER mailto:x@y SIP/2.0",
        "REGISTER  sip:example.com SIP/2.0",
        "REGISTER sip:example.com SIP/3.0",
        "INVITE sip:example.com SIP/2.0",
        "REGISTER sip:example.com sip/2.0",
        "REGISTER example.com SIP/2.0",
    ],
)


@st.composite
def registers(draw: st.DrawFn) -> bytes:
    """A client's REGISTER, mostly plain, sometimes anything the fast path must decline."""
    c = draw(colon)
    headers = [
        f"{draw(names['via'])}{c}{draw(client_via)}",
        f"{draw(names['from'])}{c}<sip:20001@example.com>;tag=1SIPpTag001",
        f"{draw(names['to'])}{c}<sip:20001@example.com>",
        f"{draw(names['call-id'])}{c}{draw(call_id)}",
        f"CSeq{c}{draw(cseq)}",
    ]
    if (mf := draw(max_fwd)) is not None:
        headers.append(f"Max-Forwards{c}{mf}")
    if (r := draw(route)) is not None:
        headers.append(f"Route{c}{r}")
    if (ct := draw(contact)) is not None:
        headers.append(f"{draw(names['contact'])}{c}{ct}")
    headers += draw(extra)
    headers = draw(st.permutations(headers))
    body = draw(mostly([b""], [b"v=0\r\n"]))
    if body:
        headers.append("Content-Type: application/sdp")
    if draw(st.integers(0, 9)) == 0:
        headers.append(f"Call-ID{c}dup")
    head = "\r\n".join([draw(request_line), *headers, f"{draw(names['cl'])}{c}{len(body)}"])
    return bytes(head.encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body)


PARITY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PARITY
@given(registers())
def test_e_request_fast_path_sends_what_the_full_path_sends(data: bytes) -> None:
    with fixed_tags():
        fast, slow = both()
        fast.e_request(data)
        slow.e_request(data)
        assert fast.state() == slow.state()


@PARITY
@given(registers(), st.sampled_from([(), ("expc.sip_path_headers=true",)]), st.booleans())
def test_c_request_fast_path_sends_what_the_full_path_sends(
    data: bytes, overrides: tuple[str, ...], via_e: bool
) -> None:
    """C's input: what E forwarded (when E takes it), or the generated message itself."""
    with fixed_tags():
        fast, slow = both(*overrides)
        if via_e:
            fast.e_request(data)
            slow.e_request(data)
            if not slow.e_zone.sent or not slow.e_zone.sent[0].startswith(b"REGISTER"):
                return
            data = slow.e_zone.sent[0]
        fast.c_request(data)
        slow.c_request(data)
        assert fast.state() == slow.state()


E_VIA = "SIP/2.0/TLS 127.10.2.10:7001;branch=z9hG4bKb19d625de2fc2a904303;x-edge-cf=f1;rport=7001;received=127.10.2.10;ingress-zone=CollaborationEdgeZone"
C_VIA = (
    "SIP/2.0/TCP 127.10.3.10:5060;branch=z9hG4bKfa4cabcd96e3a298c701;egress-zone=CEtcp-ucm1;x-c-flow=f3;rport"
)
CLIENT_VIA = (
    f"SIP/2.0/TLS {CLIENT[0]}:{CLIENT[1]};branch=z9hG4bK-1-1-0;rport={CLIENT[1]};received={CLIENT[0]}"
)
RESPONSE_CONTACT = (
    f"<sip:20001@127.10.3.10:5060;transport=tcp;orig-hostport={CLIENT[0]}:{CLIENT[1]}>{MRA_PARAMS}"
)


@st.composite
def responses(draw: st.DrawFn, own_via: str) -> bytes:
    """A registrar's answer on its way back, our own Via on top (or something odd there)."""
    c = draw(colon)
    top = draw(
        mostly(
            [own_via],
            [
                own_via.replace("x-edge-cf=f1", "x-edge-cf=f9").replace("x-c-flow=f3", "x-c-flow=f9"),
                own_via.replace(";x-edge-cf=f1", "").replace(";x-c-flow=f3", ""),
                own_via.upper(),
                "SIP/2.0/TLS 192.0.2.99:7001;branch=z9hG4bK1;x-edge-cf=f1",
                f"{own_via}, {CLIENT_VIA}",
                own_via.replace("branch=z9hG4bKb19d625de2fc2a904303", "branch=z9hG4bK").replace(
                    "branch=z9hG4bKfa4cabcd96e3a298c701", "branch=z9hG4bK"
                ),
            ],
        )
    )
    contacts = draw(
        st.sampled_from(
            [
                [],
                [f"{RESPONSE_CONTACT};expires=120"],
                [f"{RESPONSE_CONTACT};expires=0"],
                [f"{RESPONSE_CONTACT};expires=120, <sip:b@h>;expires=60"],
                [RESPONSE_CONTACT],
                ["*"],
            ]
        )
    )
    headers = [
        f"{draw(names['via'])}{c}{top}",
        f"Via{c}{CLIENT_VIA}",
        f"{draw(names['from'])}{c}<sip:20001@example.com>;tag=1SIPpTag001",
        f"{draw(names['to'])}{c}<sip:20001@example.com>;tag=994518cc7d19",
        f"{draw(names['call-id'])}{c}1-4242@198.51.100.7",
        f"CSeq{c}{draw(mostly(['1 REGISTER', '1 OPTIONS'], ['1 INVITE', '1 UPDATE', 'x REGISTER', '1 FOO']))}",
        *(f"{draw(names['contact'])}{c}{v}" for v in contacts),
        *draw(
            st.lists(
                mostly(
                    [
                        "Expires: 120",
                        "Expires: x",
                        "Server: Cisco-CUCM14.0",
                        "Supported: X-cisco-supports-AR_SK",
                    ],
                    ["Bad Name: y"],
                ),
                max_size=2,
            )
        ),
    ]
    if draw(st.booleans()):
        headers = [headers[0], *draw(st.permutations(headers[1:]))]
    status = draw(
        mostly(
            ["SIP/2.0 200 OK", "SIP/2.0 401 Unauthorized", "SIP/2.0 100 Trying", "SIP/2.0 200"],
            ["SIP/2.0 2000 OK", "SIP/2.1 200 OK", "SIP/2.0 099 x"],
        )
    )
    cl = draw(mostly(["Content-Length: 0", "l: 0"], ["Content-Length: 0\r\nContent-Length: 0"]))
    return "\r\n".join([status, *headers, cl]).encode() + b"\r\n\r\n"


@PARITY
@given(responses(E_VIA), st.booleans())
def test_e_response_fast_path_sends_what_the_full_path_sends(data: bytes, client_open: bool) -> None:
    with fixed_tags():
        fast, slow = both()
        for hops in (fast, slow):
            hops.client.is_open = client_open
        fast.e_response(data)
        slow.e_response(data)
        assert fast.state() == slow.state()


@PARITY
@given(responses(C_VIA.replace("x-edge-cf", "x")))
def test_c_response_fast_path_sends_what_the_full_path_sends(data: bytes) -> None:
    with fixed_tags():
        fast, slow = both()
        fast.c_response(data)
        slow.c_response(data)
        assert fast.state() == slow.state()


# -- the fast path is taken where it should be -------------------------------------------------


def lab_register(i: int = 1) -> bytes:
    return (
        "REGISTER sip:example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/TLS {CLIENT[0]}:{CLIENT[1]};branch=z9hG4bK-{i}-1-0;rport\r\n"
        f"Route: {ROUTE}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:2000{i}@example.com>;tag={i}SIPpTag001\r\n"
        f"To: <sip:2000{i}@example.com>\r\n"
        f"Call-ID: {i}-4242@{CLIENT[0]}\r\n"
        "CSeq: 1 REGISTER\r\n"
        f"Contact: <sip:2000{i}@{CLIENT[0]}:{CLIENT[1]};transport=tls>{MRA_PARAMS}\r\n"
        "Expires: 120\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def test_the_lab_register_and_its_200_take_the_fast_path_at_every_hop() -> None:
    fast, slow = both()
    data = lab_register()
    assert fast.e_request(data)
    slow.e_request(data)
    to_c = slow.e_zone.sent[-1]
    assert fast.e_zone.sent[-1] == to_c
    assert fast.c_request(to_c)
    slow.c_request(to_c)
    to_ucm = slow.c_ucm.sent[-1]
    assert fast.c_ucm.sent[-1] == to_ucm
    assert b"orig-hostport=198.51.100.7:51000" in to_ucm
    req = parse_message(to_ucm)
    assert isinstance(req, Request)
    contact_value = req.headers.get("contact") or ""
    ok = (
        b"SIP/2.0 200 OK\r\n"
        + b"".join(b"Via: " + v.encode() + b"\r\n" for v in req.headers.get_all("via"))
        + b"From: <sip:20001@example.com>;tag=1SIPpTag001\r\nTo: <sip:20001@example.com>;tag=x\r\n"
        + b"Call-ID: 1-4242@198.51.100.7\r\nCSeq: 1 REGISTER\r\n"
        + b"Contact: "
        + contact_value.encode()
        + b";expires=120\r\n"
        + b"Content-Length: 0\r\n\r\n"
    )
    assert fast.c_response(ok)
    slow.c_response(ok)
    to_e = slow.c_zone.sent[-1]
    assert fast.c_zone.sent[-1] == to_e
    assert fast.e_response(to_e)
    slow.e_response(to_e)
    assert fast.state() == slow.state()
    assert fast.e.registrations.current(0.0) == 1
    assert fast.client.sent[-1].startswith(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TLS 198.51.100.7:51000;")


def test_max_forwards_zero_is_answered_483_by_the_full_path() -> None:
    fast, _ = both()
    data = lab_register().replace(b"Max-Forwards: 70", b"Max-Forwards: 0")
    assert not fast.e_request(data)
    assert fast.client.sent[-1].startswith(b"SIP/2.0 483 Too Many Hops")


@pytest.mark.parametrize(
    "head",
    [
        b"REGISTER sip:a SIP/2.0\r\nVia: x\r\n folded",
        b"REGISTER sip:a SIP/2.0\r\nBad Name: x",
        b"REGISTER sip:a SIP/2.0\r\nNoColon",
        "REGISTER sip:a SIP/2.0\r\nSubject: caf\u00e9".encode(),
    ],
)
def test_scan_declines_what_only_the_full_parser_handles(head: bytes) -> None:
    assert fastpath.scan_head(head) is None


@settings(max_examples=200, deadline=None)
@given(registers(), st.integers(min_value=1, max_value=64))
def test_split_heads_frames_the_same_messages(data: bytes, chunk: int) -> None:
    """Content-Length read from the split head frames exactly as the framer's own scan."""
    stream = data + lab_register() + data

    def run(split: bool) -> list[Any]:
        framer = StreamFramer(validation=Validation.NONE, split_heads=split)
        out: list[Any] = []
        for i in range(0, len(stream), chunk):
            for ev in framer.receive_frames(stream[i : i + chunk]):
                out.append((ev.data, ev.head_end) if isinstance(ev, MessageFramed) else ev)
        return out

    assert run(True) == run(False)


@given(st.binary(max_size=40), st.sampled_from([b"rport", b"branch", b"received"]), st.binary(max_size=8))
def test_param_helpers_match_params(text: bytes, name: bytes, value: bytes) -> None:
    """get_param/set_param against headers.Params on plain parameter lists."""
    from edge.sip.headers import Params

    plain = (
        b";"
        + b";".join(
            p
            for p in text.split(b";")
            if p
            and all(c in b"abcrpotxz=19" for c in p)
            and not p.startswith(b"=")
            and not p.endswith(b"=")
            and p.count(b"=") <= 1
        )
        if text
        else b""
    )
    if plain in (b";",) or not value.isalnum():
        return
    p = Params.parse(plain[1:].decode()) if plain else Params()
    expected = p.get(name.decode())
    assert fastpath.get_param(plain, name) == (None if expected is None else expected.encode())
    p.set(name.decode(), value.decode())
    assert fastpath.set_param(plain, name, value) == str(p).encode()


# -- the optional C scans (edge/sip/_scan.c) against their Python twins --------------------------

scan_bytes = st.lists(
    st.sampled_from(
        [
            b"\r\n",
            b"\r",
            b"\n",
            b":",
            b" ",
            b";",
            b"=",
            b"Via",
            b"SIP/2.0/TLS ",
            b"h.example:5061",
            b"x",
            b"\xe9",
            b"-",
            b'"',
        ]
    ),
    max_size=24,
).map(b"".join)
try:
    from edge.sip import _scan as native
except ImportError:  # pragma: no cover - a build without a C compiler
    native = None  # type: ignore[assignment]
needs_c = pytest.mark.skipif(native is None, reason="edge.sip._scan not built")


@needs_c
@settings(max_examples=500, deadline=None)
@given(st.one_of(scan_bytes, st.binary(max_size=60), registers().map(lambda d: d.split(b"\r\n\r\n", 1)[0])))
@example(b"\r\n:\r\n:")  # empty names: the C layout dropped the ':' between them (found 2026-11-23)
def test_c_split_head_matches_python(head: bytes) -> None:
    assert native.split_head(head) == fastpath.split_head(head)


@needs_c
@settings(max_examples=500, deadline=None)
@given(
    st.one_of(scan_bytes.map(lambda b: b"SIP/2.0/" + b), st.binary(max_size=40), client_via.map(str.encode))
)
def test_c_match_via_matches_python(value: bytes) -> None:
    assert native.match_via(value) == fastpath.match_via(value)


def test_python_scans_alone_give_the_same_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path without the C extension (a build without a compiler)."""
    monkeypatch.setattr(fastpath, "_scan", None)
    test_the_lab_register_and_its_200_take_the_fast_path_at_every_hop()


# -- the flow adapter: fast path first, the full path when it declines or fails -----------------


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": CLIENT, "sockname": ("192.0.2.10", 5061)}.get(name, default)


@pytest.mark.parametrize("outcome", ["taken", "declined", "raises"])
async def test_sip_flow_tries_the_fast_path_first(outcome: str) -> None:
    from edge.sip_flow import SipFlow

    seen: list[str] = []

    def on_frame(flow: SipFlow, frame: MessageFramed) -> bool:
        assert frame.head is not None and frame.head.data == frame.data  # split by the framer
        seen.append("frame")
        if outcome == "raises":
            raise RuntimeError("a fast-path bug")
        if outcome == "taken":
            flow.send_bytes(frame.data)
        return outcome == "taken"

    def on_message(flow: SipFlow, message: Request | Response) -> None:
        seen.append("message")

    flow = SipFlow(on_message=on_message, on_frame=on_frame, validation=Validation.PROXY)
    transport = _Transport()
    flow.connection_made(transport)  # type: ignore[arg-type]
    data = lab_register()
    flow.data_received(data[:100])
    flow.data_received(data[100:] + data)
    assert seen == (["frame"] * 2 if outcome == "taken" else ["frame", "message"] * 2)
    assert flow.messages_in == 2
    flow.flush()
    assert transport.written == ([data + data] if outcome == "taken" else [])
