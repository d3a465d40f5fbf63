"""SIP interop through Expressway-E and -C with real third-party peers (shared/spec/MRA.md §5, §9).

* sipp (no TLS build here, shared/TOOLS.md) over a local stunnel4 TLS client that verifies E's
  chain against the lab CA and its name `expe.example.com`: MRA REGISTERs with and without the
  `sipRequest` route from get_edge_config, in the default (Contact rewrite + `orig-hostport`) and
  the Path-header mode of C; calls UAC → E → C → UCM → C → E → UAS where the UAS answers on the
  TLS flow it registered on.
* baresip, a real SIP UA with its own TLS stack, registering through E as its outbound proxy and
  calling the echo number.
* Hostile input on E's client port from a raw TLS socket while a registered client flow keeps
  working.

Every peer is a process we start and stop by PID (tests/sip_tools.py); waits have deadlines.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge.lab import wait_zones_active
from edge.sip.events import FramingError, MessageReceived
from edge.sip.framing import StreamFramer
from edge.sip.message import Response
from mra_client.sip_ua import MraSipUa
from tests.conftest import RunningLab
from tests.media.kernel_tools import require_kernel, require_srtp_kernel
from tests.sip_tools import Baresip, Sipp, SippResult, Stunnel, wait_for

pytestmark = pytest.mark.interop

DEVICE_PARAM = "+u.sip!devicename.ccm.cisco.com"
ALICE_INSTANCE = "00000000-0000-4000-8000-000000001001"
BOB_INSTANCE = "00000000-0000-4000-8000-000000001002"
WAIT_S = 15.0  # an upper bound for a loopback answer, never a sleep


# -- helpers ------------------------------------------------------------------------------------------


def _ready(lab: RunningLab) -> None:
    """The traversal zone is Active and E says the path to UCM is alive (C's keepalive)."""
    status = asyncio.run(wait_zones_active(lab.config, WAIT_S))
    assert all(z["state"] == "Active" for z in status["zones"]), status["zones"]
    wait_for(lambda: lab.component("expe")["sip"]["path_alive"], WAIT_S, "E: path to UCM alive")


def _ip(lab: RunningLab, octet: int) -> str:
    """A loopback address on the lab's external /24, for a peer of one test."""
    return lab.config.expe[0].external_address.rsplit(".", 1)[0] + f".{octet}"


def _e_client(lab: RunningLab) -> tuple[str, int]:
    return lab.listener("expe", "sip")


def _ca(lab: RunningLab) -> Path:
    return lab.state_dir / "certs" / "ca.pem"


def _stunnel(lab: RunningLab, octet: int, workdir: Path) -> Stunnel:
    workdir.mkdir(parents=True, exist_ok=True)
    return Stunnel(
        local_ip=_ip(lab, octet),
        connect=_e_client(lab),
        ca_file=_ca(lab),
        check_host=lab.config.expe[0].fqdn,
        workdir=workdir,
    )


def _sip_route(lab: RunningLab) -> str:
    """The `sipRequest` route a client preloads, as get_edge_config over HTTPS hands it out."""

    async def fetch() -> str:
        async with lab.edge_http() as client:
            config, _ = await client.get_edge_config("alice", "lab-pass")
        assert config.sip_route is not None
        return config.sip_route

    route = asyncio.run(fetch())
    assert route == f"<sip:{lab.config.expc.address}:5061;transport=tls;zone-id=1;directed;lr>"
    return route


def _ucm_sip(lab: RunningLab) -> dict[str, Any]:
    sip: dict[str, Any] = lab.component("ucm1")["sip"]
    return sip


def _binding(lab: RunningLab, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    return next((b for b in _ucm_sip(lab)["bindings"] if match(b)), None)


def _device_binding(lab: RunningLab, device: str, hostport: str) -> dict[str, Any] | None:
    """The device's binding once it names the flow `hostport` (orig-hostport or Path)."""
    b = _binding(lab, lambda b: b["device"] == f"dev:{device}")
    if b is None or not any(f"orig-hostport={hostport}" in v for v in [b["contact"], *b["path"]]):
        return None
    return b


def _e_counter(lab: RunningLab, key: str) -> int:
    return int(lab.component("expe")["sip"]["counters"].get(key, 0))


def _register(lab: RunningLab, workdir: Path, route: str | None, octet: int) -> tuple[SippResult, str, str]:
    """One sipp REGISTER of alice/CSFALICE through a fresh stunnel; returns the result, the
    client address E saw (stunnel's end of the TLS connection) and sipp's own host:port."""
    with _stunnel(lab, octet, workdir) as tunnel:
        sipp = Sipp(
            "register.xml",
            remote=tunnel.accept,
            local_ip=_ip(lab, octet + 1),
            workdir=workdir,
            keys={
                "dn": "1001",
                "domain": lab.config.lab.domain,
                "device": "CSFALICE",
                "instance": ALICE_INSTANCE,
                "expires": "3600",
                "route": f"Route: {route}" if route else "X-Route-Preloaded: no",
            },
        )
        result = sipp.run()
        upstream = tunnel.upstream()
    assert result.returncode == 0, result.explain()
    assert len(upstream) == 1, f"one TLS connection from stunnel to E expected: {upstream}"
    sent = result.traced("sent")[0]
    contact = re.search(r"Contact: <sip:1001@([^;>]+);", sent)
    assert contact is not None, sent
    return result, "{}:{}".format(*upstream[0]), contact.group(1)


def _assert_mra_binding(lab: RunningLab, binding: dict[str, Any], seen_by_e: str) -> None:
    c = lab.config.expc.address
    assert binding["aor"] == "sip:1001@example.com"
    assert binding["user"] == "alice"
    assert binding["contact"].startswith(f"<sip:1001@{c}:5060;transport=tcp;orig-hostport={seen_by_e}>"), (
        binding
    )
    # MRA markers pass through untouched (spec §5).
    for marker in (
        f'{DEVICE_PARAM}="CSFALICE"',
        f'+sip.instance="<urn:uuid:{ALICE_INSTANCE}>"',
        '+u.sip!model.ccm.cisco.com="503"',
        "x-cisco-mra-ha=AR_SK",
    ):
        assert marker in binding["contact"], (marker, binding["contact"])
    assert binding["mra_ha"] is True
    assert binding["path"] == []
    assert 0 < binding["expires_in_s"] <= 120


# -- 1. REGISTER -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preloaded", [True, False], ids=["route", "no-route"])
def test_sipp_register_over_tls_through_e(lab: RunningLab, tmp_path: Path, preloaded: bool) -> None:
    """(a) with the `sipRequest` Route preloaded (zone-id=1); (b) without it: a generic UA using
    E as outbound proxy, routed over the first traversal zone (spec §9)."""
    _ready(lab)
    route = _sip_route(lab) if preloaded else None
    before = _e_counter(lab, "in_register")
    octet = 100 if preloaded else 102
    _, seen_by_e, _ = _register(lab, tmp_path, route, octet)
    assert seen_by_e.startswith(_ip(lab, octet) + ":")
    binding = wait_for(lambda: _device_binding(lab, "CSFALICE", seen_by_e), WAIT_S, "alice's binding")
    _assert_mra_binding(lab, binding, seen_by_e)
    e = lab.component("expe")
    assert _e_counter(lab, "in_register") == before + 1
    assert e["counts"]["registrations"] >= 1 and e["counts"]["registrations_peak"] >= 1
    assert e["sip"]["counters"].get("zone_down", 0) == 0


def test_sipp_register_path_mode(lab_factory: Callable[..., RunningLab], tmp_path: Path) -> None:
    """With "SIP Path headers" on, C adds itself in a Path header (RFC 3327) and leaves the
    Contact as the client wrote it; UCM stores the Path with the binding."""
    lab = lab_factory("expc.sip_path_headers=true")
    _ready(lab)
    _, seen_by_e, sipp_hostport = _register(lab, tmp_path, _sip_route(lab), 100)
    binding = wait_for(lambda: _device_binding(lab, "CSFALICE", seen_by_e), WAIT_S, "alice's binding")
    assert binding["contact"].startswith(f"<sip:1001@{sipp_hostport};transport=tls>"), binding
    assert f'{DEVICE_PARAM}="CSFALICE"' in binding["contact"]
    c = lab.config.expc.address
    assert binding["path"] == [f"<sip:{c}:5060;transport=tcp;lr;orig-hostport={seen_by_e}>"]
    assert lab.component("expe")["counts"]["registrations"] >= 1


# -- 2. calls ------------------------------------------------------------------------------------------


def test_sipp_calls_through_e_and_c(lab: RunningLab, tmp_path: Path) -> None:
    """bob (1002) registers from a sipp UAS on its own TLS flow; a sipp UAC (1001) calls him three
    times: INVITE/100/180/200/ACK/pause/BYE/200. UCM reaches bob through C and E on the flow he
    registered on (connection reuse); the UAS answers there."""
    _ready(lab)
    route = _sip_route(lab)
    calls = 3
    before = _ucm_sip(lab)["calls"]
    with (
        _stunnel(lab, 110, tmp_path / "uas") as uas_tunnel,
        _stunnel(lab, 112, tmp_path / "uac") as uac_tunnel,
    ):
        uas = Sipp(
            "uas_register.xml",
            ooc_scenario="uas_answer.xml",
            remote=uas_tunnel.accept,
            local_ip=_ip(lab, 111),
            workdir=tmp_path / "uas",
            keys={
                "dn": "1002",
                "domain": lab.config.lab.domain,
                "device": "CSFBOB",
                "instance": BOB_INSTANCE,
            },
            timeout_s=60,
            extra=["-set", "wanted", str(calls)],
        ).start()
        try:
            upstream = wait_for(uas_tunnel.upstream, WAIT_S, "the UAS's TLS connection to E")[0]
            bob_flow = "{}:{}".format(*upstream)
            wait_for(lambda: _device_binding(lab, "CSFBOB", bob_flow), WAIT_S, "bob's binding")
            uac = Sipp(
                "uac_call.xml",
                remote=uac_tunnel.accept,
                local_ip=_ip(lab, 113),
                workdir=tmp_path / "uac",
                keys={
                    "dn": "1001",
                    "callee": "1002",
                    "domain": lab.config.lab.domain,
                    "route": f"Route: {route}",
                },
                calls=calls,
                timeout_s=45,
            ).run()
        finally:
            uas_result = uas.wait()
        assert len(uas_tunnel.upstream()) == 1, "the UAS used exactly one TLS connection"
    assert uac.returncode == 0, uac.explain()
    assert uas_result.returncode == 0, uas_result.explain()
    invites = [m for m in uas_result.traced("received") if m.startswith("INVITE ")]
    assert len(invites) == calls, uas_result.explain()
    # E delivered each INVITE to the flow bob registered on: C turned orig-hostport back into the
    # Request-URI, and E found the client's TLS connection by it.
    for invite in invites:
        assert invite.startswith(f"INVITE sip:1002@{bob_flow};transport=tls SIP/2.0"), invite
    assert sum(m.startswith("BYE ") for m in uas_result.traced("received")) == calls
    after = _ucm_sip(lab)["calls"]
    assert after["attempts"] - before["attempts"] == calls
    assert after["answered"] - before["answered"] == calls
    assert after["failed"] == before["failed"]
    assert after["active"] == 0
    assert _binding(lab, lambda b: b["device"] == "dev:CSFBOB") is None, "the UAS unregistered"
    # RFC 3261 §12.1.1: the 200 OK that establishes the dialog carries the Record-Route of the
    # INVITE, so the caller's ACK and BYE follow E → C (a client outside cannot reach UCM).
    ok = next(m for m in uac.traced("received") if m.startswith("SIP/2.0 200") and "CSeq: 1 INVITE" in m)
    e_host, e_port = _e_client(lab)
    assert re.search(rf"^Record-Route:.*{re.escape(e_host)}:{e_port}", ok, re.M | re.I), (
        "UCM's 200 OK to the caller has no Record-Route: in-dialog requests would bypass the edge\n" + ok
    )


# -- 3. baresip ---------------------------------------------------------------------------------------


def test_baresip_registers_and_calls_echo(lab: RunningLab, tmp_path: Path) -> None:
    _baresip_echo_call(lab, tmp_path)


def test_baresip_call_with_e_in_the_kernel_and_c_threads(lab_factory: Any, tmp_path: Path) -> None:
    """The same call with E's established media forwarded in the kernel and C's relay on two
    forwarder threads (both opt-in, root only): baresip's SRTP still goes both ways, E's
    counters still see it, and both modes were really on."""
    require_kernel()
    fast = lab_factory("expe.0.media_kernel_forwarding=true", "expc.media_threads=2")
    _baresip_echo_call(fast, tmp_path)
    e_worker = fast.component("expe")["media"]["worker"]
    assert e_worker["kernel"]["installs"] >= 2, e_worker  # the client's RTP leg and C's
    assert fast.component("expc")["sip"]["media"]["worker"]["native"]["threads"] == 2


def test_baresip_call_with_c_transcoding_in_the_kernel(lab_factory: Any, tmp_path: Path) -> None:
    """The same call with E forwarding and C transcoding established media in the kernel (both
    opt-in, root only): baresip's SDES-SRTP (its own libsrtp, its own keys) is decrypted and
    encrypted by C's eBPF program both ways, and C's relay process saw only the first packets."""
    require_srtp_kernel()
    fast = lab_factory("expe.0.media_kernel_forwarding=true", "expc.media_kernel_srtp=true")
    _baresip_echo_call(fast, tmp_path)
    c_worker = fast.component("expc")["sip"]["media"]["worker"]
    assert c_worker["kernel"]["srtp"] and c_worker["kernel"]["installs"] >= 2, c_worker
    c_totals = fast.component("expc")["sip"]["media"]["totals"]
    assert c_worker["native"]["transcoded"] < c_totals["rx_packets"] / 4, (c_worker, c_totals)


def _baresip_echo_call(lab: RunningLab, tmp_path: Path) -> None:
    """A real UA (baresip 1.0) registers sip:1001@example.com over TLS with E as outbound proxy
    (no `sipRequest` route; UCM asks no digest by default) and dials the echo number 9999.

    Media is SDES-SRTP (`mediaenc=srtp-mand`, spec §7: MRA media is always encrypted): baresip's
    sine tone reaches the echo through E's relay and C's SRTP termination and comes back, which E's
    relay counters show. baresip 1.0 does not verify the server certificate (its `sip_cafile`
    only loads the CA); the verified TLS path is the stunnel one above.
    """
    _ready(lab)
    e_host, e_port = _e_client(lab)
    ucm = lab.config.ucm[0]
    account = (
        f"<sip:1001@{lab.config.lab.domain};transport=tls>"
        f';outbound="sip:{e_host}:{e_port};transport=tls"'
        ";regint=120;mwi=no;audio_codecs=PCMU;answermode=manual;mediaenc=srtp-mand"
    )
    with Baresip(workdir=tmp_path, local_ip=_ip(lab, 130), account=account, ca_file=_ca(lab)) as ua:
        instance = (tmp_path / "uuid").read_text().strip()
        binding = wait_for(
            lambda: _binding(lab, lambda b: instance in b["contact"]), WAIT_S, "baresip's binding at UCM"
        )
        c = lab.config.expc.address
        assert binding["user"] == "alice" and binding["aor"] == "sip:1001@example.com"
        assert re.match(
            rf"<sip:1001[^@]*@{re.escape(c)}:5060;transport=tcp;orig-hostport=", binding["contact"]
        )
        before = _ucm_sip(lab)["calls"]
        relayed_before = lab.component("expe")["media"]["totals"]["tx_packets"]
        echoed_before = _ucm_sip(lab)["echo"]["packets"]
        in_other = _e_counter(lab, "in_other")
        assert ua.command("dial", "9999")["ok"] is True
        established = ua.wait_event("CALL_ESTABLISHED", WAIT_S)
        assert established["peeruri"].startswith("sip:9999@")
        during = _ucm_sip(lab)["calls"]
        assert during["echo_calls"] == before["echo_calls"] + 1
        assert during["answered"] == before["answered"] + 1
        # 50 pps each way: wait for a second's worth through E's relay and the inside echo.
        wait_for(
            lambda: lab.component("expe")["media"]["totals"]["tx_packets"] - relayed_before >= 100,
            WAIT_S,
            "baresip's SRTP relayed by E both ways",
        )
        assert _ucm_sip(lab)["echo"]["packets"] - echoed_before >= 40, "plain RTP reached the inside echo"
        assert ua.command("hangup")["ok"] is True
        closed = ua.wait_event("CALL_CLOSED", WAIT_S)
        assert closed["id"] == established["id"]
        wait_for(lambda: _ucm_sip(lab)["calls"]["active"] == 0, WAIT_S, "the echo call ended at UCM")
        trace = ua.log_text()
        acked_via_e = _e_counter(lab, "in_other") - in_other
    # baresip unregisters when it quits (SIGINT): through E again.
    wait_for(
        lambda: _binding(lab, lambda b: instance in b["contact"]) is None, WAIT_S, "baresip unregistered"
    )
    # The ACK and BYE of the call must follow the recorded route through E (spec §5: C and E are
    # on every MRA call's path); a client outside cannot reach UCM directly.
    direct = re.findall(rf"^(?:TCP|TLS|UDP) \S+ -> {re.escape(ucm.address)}:\d+$", trace, re.M)
    assert not direct and acked_via_e >= 2, (
        f"baresip sent {len(direct)} in-dialog request(s) straight to Unified CM {ucm.address} and "
        f"{acked_via_e} through E: the 200 OK to its INVITE carried no Record-Route"
    )


# -- 4. hostile input -----------------------------------------------------------------------------------


def _request(
    method: str,
    ruri: str,
    *,
    user: str = "1001",
    headers: str = "",
    body: bytes = b"",
    content_length: str | None = None,
    max_forwards: str = "70",
) -> bytes:
    tag = secrets.token_hex(6)
    head = (
        f"{method} {ruri} SIP/2.0\r\n"
        f"Via: SIP/2.0/TLS 192.0.2.99:5061;branch=z9hG4bK{tag};rport\r\n"
        f"Max-Forwards: {max_forwards}\r\n"
        f"From: <sip:{user}@example.com>;tag={tag}\r\n"
        f"To: <sip:{user}@example.com>\r\n"
        f"Call-ID: {tag}@hostile.test\r\n"
        f"CSeq: 1 {method}\r\n"
        f"{headers}"
        f"Content-Length: {len(body) if content_length is None else content_length}\r\n\r\n"
    )
    return head.encode() + body


HOSTILE: dict[str, tuple[bytes, set[int]]] = {
    # name: (bytes, acceptable SIP answers; a clean close is always acceptable when the
    # bytes cannot be framed as a message, empty set: only an answer in the set passes)
    "garbage": (b"\x01\x02 this is not SIP at all\r\n\r\n", {400}),
    "http": (b"GET / HTTP/1.1\r\nHost: expe.example.com\r\n\r\n", {400}),
    "bad_content_length": (_request("OPTIONS", "sip:example.com", content_length="12abc"), {400}),
    "negative_content_length": (_request("OPTIONS", "sip:example.com", content_length="-5"), {400}),
    "oversized_header_70k": (
        _request("OPTIONS", "sip:example.com", headers="X-Pad: " + "a" * 70_000 + "\r\n"),
        {413},
    ),
    "oversized_body_70k": (
        _request(
            "MESSAGE", "sip:1002@example.com", headers="Content-Type: text/plain\r\n", body=b"a" * 70_000
        ),
        {413},
    ),
}
ANSWERED: dict[str, tuple[bytes, set[int]]] = {
    "max_forwards_0": (
        _request(
            "REGISTER",
            "sip:example.com",
            headers="Contact: <sip:1001@192.0.2.99:5061;transport=tls>\r\n",
            max_forwards="0",
        ),
        {483},
    ),
    "unknown_method": (_request("FROBNICATE", "sip:1002@example.com"), {405, 501}),
    "unknown_user": (
        _request(
            "REGISTER",
            "sip:example.com",
            user="7777",
            headers="Contact: <sip:7777@192.0.2.99:5061;transport=tls>\r\n",
        ),
        {404},
    ),
}


async def _poke(lab: RunningLab, data: bytes) -> Response | None:
    """Send `data` on a fresh TLS connection to E; the first SIP answer, or None on a clean close."""
    host, port = _e_client(lab)
    ctx = ssl.create_default_context(cafile=str(_ca(lab)))
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ctx, server_hostname=lab.config.expe[0].fqdn
    )
    framer = StreamFramer()
    try:
        writer.write(data)
        async with asyncio.timeout(WAIT_S):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return None
                for ev in framer.receive_data(chunk):
                    if isinstance(ev, MessageReceived) and isinstance(ev.message, Response):
                        return ev.message
                    if isinstance(ev, FramingError):
                        raise AssertionError(f"E answered with unframeable bytes: {ev.reason}")
    except TimeoutError:
        raise AssertionError("E neither answered nor closed the connection") from None
    except ConnectionResetError:
        raise AssertionError("E reset the connection instead of closing it") from None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def test_hostile_input_on_client_port(lab: RunningLab) -> None:
    """Garbage, bad Content-Length, 70 KB messages, Max-Forwards 0, an unknown method and an
    unknown user: each gets the right SIP error or a clean close, and a registered client's flow
    (the project's MRA UA) keeps working after every one of them."""
    _ready(lab)
    route = _sip_route(lab)
    e = lab.config.expe[0]

    async def flow() -> dict[str, Response | None]:
        ua = MraSipUa(
            dn="1001",
            username="alice",
            password="lab-pass",
            domain=lab.config.lab.domain,
            device="CSFALICE",
            route=route,
            edge_host=e.fqdn,
            edge_address=e.external_address,
            edge_port=e.sip_tls_port,
            ca_file=str(_ca(lab)),
            local_address=_ip(lab, 150),
        )
        await ua.connect()
        seen: dict[str, Response | None] = {}
        try:
            assert (await ua.register(timeout_s=WAIT_S)).status == 200
            for name, (data, _) in {**HOSTILE, **ANSWERED}.items():
                seen[name] = await _poke(lab, data)
                reg = await ua.register(timeout_s=WAIT_S)  # the parallel flow still works
                assert reg.status == 200 and reg.expires == 120, name
            assert await ua.stun_keepalive() is not None, "MRA HA keepalive answered"
            assert ua.closed_reason is None
        finally:
            await ua.close()
        return seen

    seen = asyncio.run(flow())
    for name, (_, codes) in HOSTILE.items():
        resp = seen[name]
        assert resp is None or resp.status_code in codes, (name, resp)
    for name, (_, codes) in ANSWERED.items():
        resp = seen[name]
        assert resp is not None and resp.status_code in codes, (name, resp)
    unknown = seen["unknown_user"]
    assert unknown is not None
    assert 'ucm1 "Unknown user"' in (unknown.headers.get("Warning") or "")
    assert lab.component("expe")["state"] == "ready"
    assert _e_counter(lab, "reply_483") >= 1
