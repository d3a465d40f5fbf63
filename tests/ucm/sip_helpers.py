"""Helpers for the mock UCM SIP tests: message builders, a fake echo-port allocator for the
sans-IO cores, and a tiny SIP UA over asyncio streams for loopback tests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field

from edge.sip.events import FramingError, MessageReceived
from edge.sip.framing import StreamFramer
from edge.sip.message import Request, Response, make_response, new_branch, new_call_id, new_tag, parse_message
from mock_ucm.sip.echo import EchoSession

DOMAIN = "example.com"
WAIT_S = 5.0  # an upper bound for a loopback answer, not a sleep
SDP_AVP = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    b"a=x-cisco-opaque:keep\r\na=sendrecv\r\n"
)
CRYPTO_KEY = "inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"
SDP_SAVP = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 " + CRYPTO_KEY.encode() + b"\r\n"
    b"m=video 40002 RTP/AVP 97\r\na=rtpmap:97 H264/90000\r\n"
)
SDP_DTLS = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n"
)


def mra_contact(dn: str, host: str, port: int, device: str, *, transport: str = "tcp") -> str:
    """A Contact as Expressway-C rewrites it (spec §5): C's host:port, the client's in orig-hostport."""
    return (
        f"<sip:{dn}@{host}:{port};transport={transport};orig-hostport=198.51.100.7:51000>"
        f';+sip.instance="<urn:uuid:00000000-0000-0000-0000-00000000{dn}>"'
        f';+u.sip!devicename.ccm.cisco.com="{device}";+u.sip!model.ccm.cisco.com="503"'
        ";x-cisco-mra-ha=AR_SK"
    )


def build(
    method: str,
    uri: str,
    *,
    from_: str,
    to: str,
    call_id: str | None = None,
    cseq: int = 1,
    via_host: str = "127.0.0.1",
    via_port: int = 5060,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    transport: str = "TCP",
) -> Request:
    h = [
        ("Via", f"SIP/2.0/{transport} {via_host}:{via_port};branch={new_branch()}"),
        ("Max-Forwards", "70"),
        ("From", from_),
        ("To", to),
        ("Call-ID", call_id or new_call_id()),
        ("CSeq", f"{cseq} {method}"),
        *(headers or []),
    ]
    return Request(method, uri, h, body)


def register(
    user: str,
    contact: str | None,
    *,
    expires: int | None = 3600,
    call_id: str | None = None,
    cseq: int = 1,
    extra: list[tuple[str, str]] | None = None,
) -> Request:
    headers: list[tuple[str, str]] = []
    if contact is not None:
        headers.append(("Contact", contact))
    if expires is not None:
        headers.append(("Expires", str(expires)))
    headers += extra or []
    aor = f"<sip:{user}@{DOMAIN}>"
    return build(
        "REGISTER",
        f"sip:{DOMAIN}",
        from_=f"{aor};tag={new_tag()}",
        to=aor,
        call_id=call_id,
        cseq=cseq,
        headers=headers,
    )


def invite(
    caller: str, callee: str, contact: str, *, body: bytes = SDP_AVP, call_id: str | None = None
) -> Request:
    headers = [("Contact", contact), ("X-Cisco-Test", "passthrough"), ("Supported", "replaces")]
    if body:
        headers.append(("Content-Type", "application/sdp"))
    return build(
        "INVITE",
        f"sip:{callee}@{DOMAIN}",
        from_=f'"Caller {caller}" <sip:{caller}@{DOMAIN}>;tag={new_tag()}',
        to=f"<sip:{callee}@{DOMAIN}>",
        call_id=call_id,
        headers=headers,
        body=body,
    )


def in_dialog(method: str, request: Request, response: Response, cseq: int, *, body: bytes = b"") -> Request:
    """An in-dialog request from the UAC that sent `request` and got `response` (with To tag)."""
    contact = response.contacts[0].uri
    headers = [("Content-Type", "application/sdp")] if body else []
    if method == "INVITE":
        headers.append(("Contact", request.headers.get("contact") or ""))
    seq = request.cseq.seq if method == "ACK" else cseq
    return build(
        method,
        str(contact),
        from_=request.headers.get("from") or "",
        to=response.headers.get("to") or "",
        call_id=request.call_id,
        cseq=seq,
        headers=headers,
        body=body,
    )


def reverse_in_dialog(method: str, received: Request, sent: Response, cseq: int) -> Request:
    """An in-dialog request from the UAS that received `received` and answered `sent`."""
    return build(
        method,
        str(received.contacts[0].uri),
        from_=sent.headers.get("to") or "",
        to=received.headers.get("from") or "",
        call_id=received.call_id,
        cseq=cseq,
    )


def cancel_for(inv: Request) -> Request:
    h = [
        ("Via", inv.headers.get_all("via")[0]),
        ("Max-Forwards", "70"),
        ("From", inv.headers.get("from") or ""),
        ("To", inv.headers.get("to") or ""),
        ("Call-ID", inv.call_id or ""),
        ("CSeq", f"{inv.cseq.seq} CANCEL"),
    ]
    return Request("CANCEL", inv.uri, h)


@dataclass
class FakeEchoPorts:
    """EchoPorts for the cores: hands out ports, records open/close."""

    ports: itertools.count[int] = field(default_factory=lambda: itertools.count(30000, 2))
    open_sessions: dict[int, EchoSession] = field(default_factory=dict)
    closed: list[int] = field(default_factory=list)

    def open(self, session: EchoSession) -> int:
        port = next(self.ports)
        self.open_sessions[port] = session
        return port

    def close(self, session: EchoSession) -> None:
        for port, s in list(self.open_sessions.items()):
            if s is session:
                del self.open_sessions[port]
                self.closed.append(port)


# -- a tiny SIP UA over asyncio streams -------------------------------------------------------


class SipUA:
    """Connects to UCM, listens for UCM's own connections (its Contact), queues what arrives.

    Every received message remembers the writer it came on so a UAS answer goes back there.
    """

    def __init__(self, dn: str, device: str) -> None:
        self.dn = dn
        self.device = device
        self.queue: asyncio.Queue[tuple[Request | Response, asyncio.StreamWriter]] = asyncio.Queue()
        self.writer: asyncio.StreamWriter | None = None
        self.server: asyncio.Server | None = None
        self.port = 0
        self._readers: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def contact(self) -> str:
        return mra_contact(self.dn, "127.0.0.1", self.port, self.device)

    async def start(self, ucm_host: str, ucm_port: int) -> None:
        self.server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        reader, self.writer = await asyncio.open_connection(ucm_host, ucm_port)
        self._watch(reader, self.writer)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._watch(reader, writer)

    def _watch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        task = asyncio.ensure_future(self._read(reader, writer))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = StreamFramer()
        while data := await reader.read(65536):
            for ev in framer.receive_data(data):
                if isinstance(ev, MessageReceived):
                    self.queue.put_nowait((ev.message, writer))
                elif isinstance(ev, FramingError):
                    raise AssertionError(f"UCM sent something unframeable: {ev}")

    async def send(self, message: Request | Response, writer: asyncio.StreamWriter | None = None) -> None:
        w = writer or self.writer
        assert w is not None
        w.write(bytes(message))
        await w.drain()

    async def send_raw(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def next(self) -> tuple[Request | Response, asyncio.StreamWriter]:
        return await asyncio.wait_for(self.queue.get(), WAIT_S)

    async def response(self, *, skip_100: bool = True) -> Response:
        while True:
            msg, _ = await self.next()
            assert isinstance(msg, Response), f"expected a response, got {msg!r}"
            if not (skip_100 and msg.status_code == 100):
                return msg

    async def request(self, method: str) -> tuple[Request, asyncio.StreamWriter]:
        msg, writer = await self.next()
        assert isinstance(msg, Request) and msg.method == method, f"expected {method}, got {msg!r}"
        return msg, writer

    async def answer(
        self, request: Request, status: int, writer: asyncio.StreamWriter, **kw: object
    ) -> Response:
        resp = make_response(request, status, to_tag=str(kw.get("tag", "uastag")))
        if status < 300 and request.method == "INVITE":
            resp.headers.add("Contact", f"<sip:{self.dn}@127.0.0.1:{self.port};transport=tcp>")
        body = kw.get("body")
        if isinstance(body, bytes):
            resp.headers.add("Content-Type", "application/sdp")
            resp.body = body
        await self.send(resp, writer)
        return resp

    async def register(self, ucm_user: str | None = None) -> Response:
        await self.send(register(ucm_user or self.dn, self.contact, call_id=new_call_id()))
        return await self.response()

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        for w in self._writers:
            with contextlib.suppress(OSError, ConnectionError):
                await w.wait_closed()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for t in list(self._readers):
            t.cancel()
        if self._readers:
            await asyncio.wait(list(self._readers), timeout=5)


def parse(data: bytes) -> Request | Response:
    return parse_message(data)
