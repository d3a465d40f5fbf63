"""UcmSipService over real loopback TCP: two raw SIP UAs register, call, cancel, reach the echo."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from edge.config import LabConfig
from edge.sip.events import MessageReceived
from edge.sip.framing import StreamFramer
from edge.sip.message import Request, Response, make_response, new_tag
from media_relay.sdp import SessionDescription
from mock_ucm.sip.service import UcmSipService
from tests.ucm.conftest import ThrowawayTls
from tests.ucm.sip_helpers import (
    SDP_AVP,
    SipUA,
    build,
    cancel_for,
    in_dialog,
    invite,
    mra_contact,
    register,
    reverse_in_dialog,
)


@pytest.fixture
async def service(config: LabConfig) -> AsyncIterator[UcmSipService]:
    node = config.ucm[0].model_copy(update={"address": "127.0.0.1", "sip_tcp_port": 0, "sip_tls_port": 0})
    svc = UcmSipService(config, node, ssl_context=None)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


@pytest.fixture
async def uas(service: UcmSipService) -> AsyncIterator[tuple[SipUA, SipUA]]:
    [(name, transport, host, port)] = service.listeners
    assert (name, transport) == ("sip-tcp", "tcp") and port > 0
    alice, bob = SipUA("1001", "CSFALICE"), SipUA("1002", "CSFBOB")
    await alice.start(host, port)
    await bob.start(host, port)
    try:
        assert (await alice.register()).status_code == 200
        reg = await bob.register()
        assert reg.status_code == 200 and reg.headers.get("expires") == "120"
        yield alice, bob
    finally:
        await alice.close()
        await bob.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        self.queue.put_nowait(data)


async def test_call_between_two_uas_with_bye_both_ways(
    service: UcmSipService, uas: tuple[SipUA, SipUA]
) -> None:
    alice, bob = uas
    for bye_from_caller in (True, False):
        inv = invite("1001", "1002", alice.contact)
        await alice.send(inv)
        b_inv, b_conn = await bob.request("INVITE")  # UCM dialled bob's Contact (his listener)
        assert b_inv.uri.startswith(f"sip:1002@127.0.0.1:{bob.port};transport=tcp;orig-hostport=")
        assert b_inv.body == SDP_AVP
        await bob.answer(b_inv, 180, b_conn, tag="b" + new_tag())
        assert (await alice.response()).status_code == 180
        ok = await bob.answer(b_inv, 200, b_conn, tag=b_inv.to_tag or "bt", body=b"v=0\r\nbob\r\n")
        a_ok = await alice.response()
        assert a_ok.status_code == 200 and a_ok.body == b"v=0\r\nbob\r\n"
        await alice.send(in_dialog("ACK", inv, a_ok, 1))
        ack, _ = await bob.request("ACK")
        assert ack.call_id == b_inv.call_id
        if bye_from_caller:
            await alice.send(in_dialog("BYE", inv, a_ok, 2))
            bye, conn = await bob.request("BYE")
            await bob.answer(bye, 200, conn)
            assert (await alice.response()).status_code == 200
        else:
            await bob.send(reverse_in_dialog("BYE", b_inv, ok, 1), b_conn)
            bye, conn = await alice.request("BYE")  # on a connection UCM opened to alice's Contact
            assert bye.call_id == inv.call_id
            await alice.answer(bye, 200, conn)
            assert (await bob.response()).status_code == 200
        assert service.status()["calls"]["active"] == 0
    assert service.status()["calls"]["answered"] == 2


async def test_echo_returns_rtp(service: UcmSipService, uas: tuple[SipUA, SipUA]) -> None:
    alice, _ = uas
    inv = invite("1001", "9999", alice.contact)
    await alice.send(inv)
    ok = await alice.response()
    assert ok.status_code == 200
    sdp = SessionDescription.parse(ok.body)
    assert sdp.connection is not None
    echo_addr = (sdp.connection.address, sdp.media[0].port)
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Udp, local_addr=("127.0.0.1", 0))
    try:
        for seq in range(3):
            rtp = bytes([0x80, 0x00, 0, seq]) + b"\x00\x00\x00\xa0" + b"\x12\x34\x56\x78" + bytes(160)
            transport.sendto(rtp, echo_addr)
            assert await asyncio.wait_for(proto.queue.get(), 5) == rtp
    finally:
        transport.close()
    assert service.status()["echo"] == {"packets": 3, "sockets": 1}
    await alice.send(in_dialog("ACK", inv, ok, 1))
    await alice.send(in_dialog("BYE", inv, ok, 2))
    assert (await alice.response()).status_code == 200
    assert service.status()["echo"] == {"packets": 3, "sockets": 0}


async def test_cancel_unknown_unregistered(service: UcmSipService, uas: tuple[SipUA, SipUA]) -> None:
    alice, bob = uas
    inv = invite("1001", "1002", alice.contact)
    await alice.send(inv)
    b_inv, b_conn = await bob.request("INVITE")
    await bob.answer(b_inv, 180, b_conn)
    assert (await alice.response()).status_code == 180
    await alice.send(cancel_for(inv))
    got = {(r.cseq.method, r.status_code) for r in [await alice.response(), await alice.response()]}
    assert got == {("CANCEL", 200), ("INVITE", 487)}
    b_cancel, conn = await bob.request("CANCEL")
    await bob.answer(b_cancel, 200, conn)
    await bob.answer(b_inv, 487, conn)
    ack, _ = await bob.request("ACK")
    assert ack.cseq.seq == b_inv.cseq.seq

    for dialled, status in (("7777", 404), ("1003", 480)):
        await alice.send(invite("1001", dialled, alice.contact))
        assert (await alice.response()).status_code == status


async def test_garbage_gets_400_or_close_and_others_keep_working(
    service: UcmSipService, uas: tuple[SipUA, SipUA]
) -> None:
    alice, _ = uas
    [(_, _, host, port)] = service.listeners
    # A framed but invalid request (CSeq method mismatch) is answered 400, the flow survives.
    bad = build("INVITE", "sip:1002@example.com", from_="<sip:a>;tag=1", to="<sip:b>")
    bad.headers.replace("CSeq", "1 BYE")
    await alice.send(bad)
    resp = await alice.response()
    assert resp.status_code == 400
    # A CRLFCRLF ping is answered with CRLF; unframeable bytes close that connection only.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\r\n\r\n")
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\r\n"
    writer.write(b"HELLO WORLD\r\n\r\n")
    assert await asyncio.wait_for(reader.read(100), 5) == b""
    writer.close()
    await writer.wait_closed()
    await alice.send(build("OPTIONS", f"sip:{host}:{port}", from_="<sip:a>;tag=2", to=f"<sip:{host}>"))
    ok: Response = await alice.response()
    assert ok.status_code == 200
    assert service.parse_errors == 2 and service.keepalives == 1


async def test_tls_listener_and_tls_contact(config: LabConfig, tls: ThrowawayTls) -> None:
    node = config.ucm[0].model_copy(update={"address": "127.0.0.1", "sip_tcp_port": 0, "sip_tls_port": 0})
    svc = UcmSipService(config, node, ssl_context=tls.server, client_ssl_context=tls.client)
    await svc.start()
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def device(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = StreamFramer()
        while data := await reader.read(65536):
            for ev in framer.receive_data(data):
                if isinstance(ev, MessageReceived) and isinstance(ev.message, Request):
                    got.put_nowait(ev.message.method.encode())
                    writer.write(bytes(make_response(ev.message, 200)))

    device_server = await asyncio.start_server(device, "127.0.0.1", 0, ssl=tls.server)
    device_port = device_server.sockets[0].getsockname()[1]
    try:
        [tls_port] = [p for n, t, _, p in svc.listeners if t == "tls"]
        reader, writer = await asyncio.open_connection("127.0.0.1", tls_port, ssl=tls.client)
        contact = (
            f'<sip:1001@127.0.0.1:{device_port};transport=tls>;+u.sip!devicename.ccm.cisco.com="CSFALICE"'
        )
        writer.write(bytes(register("1001", contact)))
        framer = StreamFramer()
        events = framer.receive_data(await asyncio.wait_for(reader.read(65536), 5))
        assert isinstance(events[0], MessageReceived) and isinstance(events[0].message, Response)
        assert events[0].message.status_code == 200
        [binding] = svc.core.registrar.bindings_for("alice")
        svc._deliver(svc.core.request_binding(binding, "OPTIONS", svc._clock()))  # UCM pings the device
        assert await asyncio.wait_for(got.get(), 5) == b"OPTIONS"
        assert svc.connections_opened == 1  # a new TLS connection to the device's Contact
        writer.close()
        await writer.wait_closed()
    finally:
        await svc.stop()
        device_server.close()
        await device_server.wait_closed()


async def test_a_peer_that_reads_slowly_gets_backpressure_not_a_cut(service: UcmSipService) -> None:
    """C under overload reads UCM's answers late: UCM stops reading that flow's requests until the
    answers drain (TCP backpressure) instead of cutting C off with every binding behind it."""
    import socket

    [(_, _, host, port)] = service.listeners
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: answers back up
    sock.connect((host, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    count = 20000  # ~9 MB of 200 OKs: past the kernel buffers (tcp_wmem max 4 MiB) + the 1 MiB mark
    batch = b"".join(
        bytes(register("1001", mra_contact("1001", "127.0.0.1", 5070, "CSFALICE"), call_id=f"bp{i}"))
        for i in range(count)
    )
    writer.write(batch)
    for _ in range(200):  # until UCM has paused this flow (bounded: 10 s)
        if service.backpressure_pauses:
            break
        await asyncio.sleep(0.05)
    assert service.backpressure_pauses >= 1
    framer = StreamFramer()
    ok = 0
    while ok < count:  # every REGISTER is answered once we read: nothing was dropped or cut
        data = await asyncio.wait_for(reader.read(65536), 10)
        assert data, f"UCM closed the flow after {ok} answers"
        for ev in framer.receive_data(data):
            assert isinstance(ev, MessageReceived) and isinstance(ev.message, Response)
            assert ev.message.status_code == 200
            ok += 1
    assert service.status()["registrations"]["current"] == 1
    writer.close()
