"""The mock UCM's lean REGISTER path (mock_ucm/sip/fastpath.py) against the general path.

Parity: two cores see the same messages at the same times; one answers what it can from the
bytes (`answer_register`), the other always parses and goes through the transaction layer and
`Registrar.handle_register`. Whenever the fast path answers, the general path must answer the
same bytes and leave the same registrar state (the To tag is made deterministic for both).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Iterator
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.config import LabConfig, load_config
from edge.sip.errors import SipParseError
from edge.sip.events import FramingError, MessageFramed, MessageReceived
from edge.sip.framing import StreamFramer
from edge.sip.message import Response, Validation, parse_message
from mock_ucm.sip.calls import LocalNode
from mock_ucm.sip.core import UcmSipCore
from mock_ucm.sip.events import OutgoingResponse
from mock_ucm.sip.registrar import AR_SK_SUPPORTED
from mock_ucm.sip.service import UcmSipService
from tests.ucm.conftest import T0
from tests.ucm.sip_helpers import FakeEchoPorts

C_HOST = "127.10.3.10"
TAG = "fixedtag0001"


@functools.cache
def lab() -> LabConfig:
    return load_config(
        None,
        overrides=[
            "lab.demo=false",
            'users=[{username="alice", dn="1001"}, {username="bob", dn="1002", devices=["CSFBOB", "BOTBOB"]},'
            ' {username="dave", dn="1004", digest_auth=true}]',
        ],
        environ={},
    )


def new_core() -> UcmSipCore:
    node = lab().ucm[0]
    local = LocalNode(node.name, node.address, "example.com")
    return UcmSipCore(lab(), node, local, echo_ports=FakeEchoPorts(), digest_secret=b"k" * 32)


@contextlib.contextmanager
def fixed_tags() -> Iterator[None]:
    with (
        mock.patch("edge.sip.message.new_tag", return_value=TAG),
        mock.patch("mock_ucm.sip.fastpath.new_tag", return_value=TAG),
    ):
        yield


def contact(dn: str, device: str | None = "CSFALICE", *, extra: str = "") -> str:
    dev = f';+u.sip!devicename.ccm.cisco.com="{device}"' if device else ""
    return (
        f"<sip:{dn}@{C_HOST}:5060;transport=tcp;orig-hostport=198.51.100.7:51000>"
        f';+sip.instance="<urn:uuid:00000000-0000-4000-8000-00000000{dn}>"{dev}'
        f';+u.sip!model.ccm.cisco.com="503";x-cisco-mra-ha=AR_SK{extra}'
    )


def register(
    user: str = "1001",
    contact_value: str | None = None,
    *,
    headers: list[tuple[str, str]] | None = None,
    to_params: str = "",
    branch: str = "z9hG4bKc1",
    body: bytes = b"",
) -> bytes:
    """A REGISTER as Expressway-C forwards it (benchmarks/sip/hops.py shows one)."""
    lines = [
        ("Via", f"SIP/2.0/TCP {C_HOST}:5060;branch={branch};egress-zone=CEtcp-ucm1;x-c-flow=f3;rport"),
        ("Via", "SIP/2.0/TLS 198.51.100.7:51000;branch=z9hG4bK-1;rport=51000;received=198.51.100.7"),
        ("Max-Forwards", "14"),
        ("From", f"<sip:{user}@example.com>;tag=1SIPpTag001"),
        ("To", f"<sip:{user}@example.com>{to_params}"),
        ("Call-ID", "1-4242@198.51.100.7"),
        ("CSeq", "1 REGISTER"),
        ("Expires", "120"),
        ("Supported", "X-cisco-supports-AR_SK, path"),
        ("Content-Length", str(len(body))),
        ("Contact", contact_value if contact_value is not None else contact(user)),
    ]
    if headers is not None:
        lines = headers
    head = "".join(f"{n}: {v}\r\n" for n, v in lines)
    return f"REGISTER sip:example.com SIP/2.0\r\n{head}\r\n".encode() + body


def slow_answer(core: UcmSipCore, data: bytes, now: float) -> list[bytes | tuple[int, str]]:
    """The general path as the adapter takes it: parse, then the core (or a parse error)."""
    [framed] = StreamFramer(validation=Validation.PROXY).receive_frames(data)
    assert isinstance(framed, MessageFramed)
    parsed = StreamFramer(validation=Validation.PROXY).parse_frame(framed)
    if isinstance(parsed, FramingError):
        return [(parsed.status_code, parsed.reason)]
    assert isinstance(parsed, MessageReceived)
    try:
        outs = core.receive_message(parsed.message, 7, now)
    except SipParseError as exc:  # the adapter answers these (service._on_message)
        return [(exc.status_code, exc.reason)]
    return [bytes(o.response) for o in outs if isinstance(o, OutgoingResponse)]


def fast_answer(core: UcmSipCore, data: bytes, now: float) -> bytes | None:
    """As the adapter does it: the framer splits the head (every other message here lets the
    fast path split it itself, the way callers without split_heads do)."""
    split = len(data) % 2 == 0
    [framed] = StreamFramer(validation=Validation.PROXY, split_heads=split).receive_frames(data)
    assert isinstance(framed, MessageFramed)
    return core.answer_register(framed.data, framed.head_end, 7, now, framed.head)


def state(core: UcmSipCore, now: float) -> object:
    reg = core.registrar
    bindings = [
        (b.as_dict(now), b.uri, b.flow, b.expires_at, b.registered_at, b.contact_base) for b in reg.bindings()
    ]
    return bindings, reg.counters, reg.registered, reg.get_timer(), core.counters.requests_in


def check_parity(messages: list[tuple[bytes, float]]) -> int:
    """Feed both cores; returns how many messages the fast path answered."""
    fast, slow = new_core(), new_core()
    answered = 0
    with fixed_tags():
        for data, now in messages:
            expected = slow_answer(slow, data, now)
            got = fast_answer(fast, data, now)
            if got is None:
                assert slow_answer(fast, data, now) == expected
            else:
                answered += 1
                assert expected == [got], (data, expected, got)
            assert state(fast, now) == state(slow, now)
    return answered


# -- the usual messages ----------------------------------------------------------------------


def test_benchmark_register_is_answered_by_the_fast_path_like_the_general_one() -> None:
    data = register()
    assert check_parity([(data, T0), (data, T0 + 30), (data, T0 + 200)]) == 3
    core = new_core()
    with fixed_tags():
        ok = fast_answer(core, data, T0)
    assert ok is not None
    resp = parse_message(ok)
    assert resp.headers.get("expires") == "120" and resp.headers.get("supported") == AR_SK_SUPPORTED
    assert resp.headers.get_all("contact") == [contact("1001") + ";expires=120"]
    assert resp.headers.get("to") == f"<sip:1001@example.com>;tag={TAG}"
    assert [v for v in resp.headers.get_all("via")] == parse_message(data).headers.get_all("via")
    assert core.registrar.counters.registrations == 1 and core.counters.requests_in == 1


def test_refresh_unregister_and_several_devices() -> None:
    bob = "1002"
    msgs = [
        (register(bob, contact(bob, "CSFBOB")), T0),
        (register(bob, contact(bob, "BOTBOB")), T0 + 10),  # a second binding: both listed
        (register(bob, contact(bob, "CSFBOB")), T0 + 20),  # refresh in place
        (register(bob, contact(bob, "BOTBOB", extra=";expires=0")), T0 + 30),  # unregister one
        (register(bob, contact(bob, "CSFBOB"), headers=None), T0 + 40),
    ]
    assert check_parity(msgs) == 5
    core = new_core()
    for data, now in msgs[:3]:
        last = fast_answer(core, data, now)
    assert last is not None
    contacts = parse_message(last).headers.get_all("contact")
    assert contacts == [contact(bob, "CSFBOB") + ";expires=120", contact(bob, "BOTBOB") + ";expires=110"]
    assert core.registrar.counters.refreshes == 1 and core.registrar.registered == 2


def test_declined_messages_get_the_general_answers() -> None:
    core = new_core()
    cases = {
        register("7777"): 404,  # unknown user (Warning)
        register("1001", contact("1001", "CSFBOB")): 403,  # device not associated (Warning)
        register("1004", contact("1004", "CSFDAVE")): 401,  # digest user: challenge
        register("1001", to_params=";tag=abc"): 481,  # in-dialog
        register("1001", "*"): 400,  # * needs Expires: 0
        register("1001", contact("1001") + ", " + contact("1001", "CSFX")): 403,
        register("1001", branch="legacy1"): 200,  # RFC 2543 transaction key
        register("1001", body=b"x"): 200,
    }
    for data, status in cases.items():
        assert fast_answer(core, data, T0) is None, data
        [answer] = slow_answer(core, data, T0)
        assert isinstance(answer, bytes)
        resp = parse_message(answer)
        assert isinstance(resp, Response) and resp.status_code == status
    assert check_parity([(data, T0 + i) for i, data in enumerate(cases)]) == 0


def test_refresh_needs_no_heap_work_and_expiry_stays_exact() -> None:
    core = new_core()
    reg = core.registrar
    for i in range(50):
        assert fast_answer(core, register(), T0 + i) is not None
    assert len(reg._heap) == 1  # one entry per binding, not one per refresh
    assert reg.get_timer() == T0 + 49 + 120  # the entry moved to the latest deadline lazily
    assert reg.handle_timer(T0 + 168) == [] and reg.registered == 1
    [expired] = reg.handle_timer(T0 + 169)
    assert expired.username == "alice" and reg.registered == 0 and reg.get_timer() is None


def test_a_clock_going_back_still_expires_on_time() -> None:
    core = new_core()
    reg = core.registrar
    fast_answer(core, register(), T0 + 100)
    fast_answer(core, register(), T0)  # earlier than before: the deadline moves earlier
    assert reg.get_timer() == T0 + 120
    assert [b.username for b in reg.handle_timer(T0 + 120)] == ["alice"]
    assert reg.get_timer() is None


# -- generated messages -------------------------------------------------------------------------

NAME_FORMS = {
    "Via": ["Via", "v", "VIA", "Via "],
    "To": ["To", "t", "TO", "To\t"],
    "From": ["From", "f"],
    "Call-ID": ["Call-ID", "i", "call-id"],
    "Contact": ["Contact", "m", "CONTACT"],
    "Expires": ["Expires", "expires"],
    "Supported": ["Supported", "k"],
    "Content-Length": ["Content-Length", "l"],
}


@st.composite
def registers(draw: st.DrawFn) -> bytes:
    """A REGISTER as C forwards it, each part usual most of the time (so the fast path answers
    often) and one of many unusual or broken variants otherwise."""

    def pick(usual: list[str], unusual: list[str]) -> str:
        if unusual and draw(st.integers(0, 7)) == 0:
            return draw(st.sampled_from(unusual))
        return draw(st.sampled_from(usual))

    def name(n: str) -> str:
        forms = NAME_FORMS.get(n, [n])
        return pick(forms[:1], forms[1:])

    user = pick(["1001", "alice", "1002", "bob"], ["ALICE", "1004", "7777", "", "1001;x=y"])
    dn = user if user.isdigit() else "1001"
    device = draw(st.sampled_from(["CSFALICE", "CSFBOB", "BOTBOB", None]))
    value = pick(
        [
            contact(dn, device),
            contact(dn, device, extra=";expires=0"),
            contact(dn, device, extra=";expires=60"),
        ],
        [
            contact(dn, device, extra=";expires=abc"),
            contact(dn, device, extra=";EXPIRES = 30"),
            f'"Disp <x>" {contact(dn, device)}',
            f"<sip:{dn}@{C_HOST}:5070;transport=tcp>",
            f'sip:{dn}@{C_HOST}:5070;+sip.instance="<urn:uuid:1>"',
            "*",
            "",
            f"{contact(dn, device)}, <sip:{dn}@{C_HOST}:5071>",
            f"<sip:{dn}@{C_HOST}:5060;transport=tcp>\x0b",
            "<sip:bad host>",
        ],
    )
    body = pick([""], ["v=0\r\n"]).encode()
    lines: list[tuple[str, str]] = []
    branch = pick(["z9hG4bKc1", "z9hG4bKc2"], ["abc", "z9hG4bK", '"q"', "z9hG4bKc1,x", "z9hG4bKc1;branch=x"])
    lines.append((name("Via"), f"SIP/2.0/TCP {C_HOST}:5060;branch={branch};rport"))
    if draw(st.booleans()):
        lines.append((name("Via"), pick(["SIP/2.0/TLS 198.51.100.7:51000;branch=z9hG4bK-1"], ["junk"])))
    if draw(st.booleans()):
        lines.append(("Max-Forwards", pick(["70", "0", "255"], ["256", "x", "", " 9 ", "0255"])))
    lines.append((name("From"), pick([f"<sip:{dn}@example.com>;tag=f1"], ["", "junk<"])))
    to_params = pick([""], [";tag=abc", ";tag", ";x=1", ";TAG=b"])
    to_uri = pick([f"<sip:{user}@example.com>"], [f"sip:{user}@example.com", f'"U" <sip:{user}@example.com>'])
    lines.append((name("To"), to_uri + to_params))
    lines.append((name("Call-ID"), pick(["c1@h", "c2"], [""])))
    lines.append(
        (
            "CSeq",
            pick(
                ["1 REGISTER", "2 REGISTER"], ["1 INVITE", "x REGISTER", "1  REGISTER", "9999999999 REGISTER"]
            ),
        )
    )
    for _ in range(draw(st.integers(0, 1)) + (draw(st.integers(0, 7)) == 0)):
        lines.append((name("Expires"), pick(["120", "0", "3600"], ["abc", "", " 60 "])))
    for _ in range(draw(st.integers(0, 2))):
        lines.append((name("Supported"), pick(["path", "X-cisco-supports-AR_SK, path"], ["ar_sk", ""])))
    for _ in range(draw(st.integers(0, 2))):
        lines.append(
            ("Path", pick([f"<sip:{C_HOST}:5060;lr>", "<sip:p2;lr>"], ["<sip:p1;lr>, <sip:p2;lr>", ""]))
        )
    if draw(st.booleans()):
        lines.append(("X-Cisco-Opaque", "keep me"))
    if draw(st.integers(0, 7)) == 0:
        lines.append(("Authorization", 'Digest username="dave", realm="ccmsipline", nonce="n", response="r"'))
    for _ in range(1 + (draw(st.integers(0, 7)) == 0)):
        lines.append((name("Contact"), value))
    if body:
        lines.append(("Content-Type", "application/sdp"))
    lines.append((name("Content-Length"), str(len(body))))
    if draw(st.booleans()):  # any order: the 200 copies lines in the order received either way
        lines = draw(st.permutations(lines))
    ruri = pick(["sip:example.com", "sips:example.com"], ["tel:+1", "http:x", "SIP:example.com"])
    head = "".join(f"{n}: {v}\r\n" for n, v in lines)
    return f"REGISTER {ruri} SIP/2.0\r\n{head}\r\n".encode() + body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(registers(), st.floats(0, 300)), min_size=1, max_size=5))
def test_fast_and_general_paths_agree(messages: list[tuple[bytes, float]]) -> None:
    check_parity([(data, T0 + dt) for data, dt in messages])


def test_generated_messages_do_reach_the_fast_path() -> None:
    """The generator is not so wild that the fast path never answers (parity would be vacuous).
    Derandomized: a fixed example sequence, so the count is the same every run (with random
    draws it once came out at 9 of 200, under the bar, in a CI run)."""
    answered = 0

    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(registers())
    def count(data: bytes) -> None:
        nonlocal answered
        answered += check_parity([(data, T0)])

    count()
    assert answered >= 10


# -- through the adapter ---------------------------------------------------------------------


async def test_pipelined_messages_are_answered_in_order_by_both_paths() -> None:
    """One TCP write holding a ping, fast and general REGISTERs and an OPTIONS: the answers
    come back in order (one write per loop turn), the expiry timer is armed, /status counts."""
    node = lab().ucm[0].model_copy(update={"address": "127.0.0.1", "sip_tcp_port": 0, "sip_tls_port": 0})
    service = UcmSipService(lab(), node, ssl_context=None)
    await service.start()
    try:
        [(_, _, host, port)] = service.listeners
        reader, writer = await asyncio.open_connection(host, port)
        options = (
            f"OPTIONS sip:{host}:{port} SIP/2.0\r\nVia: SIP/2.0/TCP {C_HOST}:5060;branch=z9hG4bKo1\r\n"
            f"From: <sip:{C_HOST}>;tag=o\r\nTo: <sip:{host}>\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
        writer.write(
            b"\r\n\r\n"
            + register()
            + register("7777")
            + options
            + register("1002", contact("1002", "CSFBOB"))
        )
        framer = StreamFramer()
        got: list[object] = []
        while len(got) < 5:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "UCM closed the connection"
            for ev in framer.receive_data(data):
                if isinstance(ev, MessageReceived) and isinstance(ev.message, Response):
                    got.append(ev.message.status_code)
                else:
                    got.append(type(ev).__name__)
        assert got == ["KeepaliveReceived", 200, 404, 200, 200]
        status = service.status()
        assert status["registrations"]["current"] == 2 and status["registrations"]["failures"] == 1
        assert status["counters"]["messages_in"] == 4 and status["counters"]["messages_out"] == 5
        assert service._timer is not None  # the fast path armed the expiry timer
        writer.close()
        await writer.wait_closed()
    finally:
        await service.stop()
