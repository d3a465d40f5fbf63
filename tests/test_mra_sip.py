"""SIP over MRA through the real processes: the client emulator's REGISTER through E and C to the
mock UCM, what UCM stores (spec §5), STUN keepalives tied to the whole path, hop limits."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
import urllib.request
from typing import Any

from edge.lab import pid_alive
from edge.sip.message import Request
from mra_client.call import CallReport, place_call
from mra_client.demo import lab_client_settings
from mra_client.edge_http import StepError
from mra_client.signin import Ladder, SignedIn, sign_in, sign_out
from tests.conftest import RunningLab


async def _signin(lab: RunningLab, user: str) -> SignedIn:
    return await sign_in(lab_client_settings(lab.config, user), Ladder())


def _bindings(lab: RunningLab) -> list[dict[str, Any]]:
    return list(lab.component("ucm1")["sip"]["bindings"])


def test_register_through_e_and_c(lab: RunningLab) -> None:
    asyncio.run(_register_through_e_and_c(lab))


async def _register_through_e_and_c(lab: RunningLab) -> None:
    session = await _signin(lab, "alice")
    assert session.sip is not None
    mapped = await session.sip.stun_keepalive()
    try:
        assert mapped == session.sip.local, "STUN on the SIP flow reflects the client's address"
        bindings = [b for b in _bindings(lab) if b["user"] == "alice"]
        assert len(bindings) == 1
        contact = bindings[0]["contact"]
        c = lab.config.expc
        # Spec §5: Contact host:port rewritten to C, the client's address kept in orig-hostport.
        assert f"@{c.address}:{c.sip_tcp_port};transport=tcp" in contact
        host, port = session.sip.local
        assert f"orig-hostport={host}:{port}" in contact
        assert '+u.sip!devicename.ccm.cisco.com="CSFALICE"' in contact
        assert "x-cisco-mra-ha=AR_SK" in contact
        assert bindings[0]["device"] == "dev:CSFALICE"  # keyed by the devicename marker
        e = lab.component("expe")
        assert e["counts"]["registrations"] >= 1
        assert e["sip"]["counters"]["stun_answered"] >= 2
    finally:
        await sign_out(session)
    assert not [b for b in _bindings(lab) if b["user"] == "alice"], "sign-out unregisters"


def test_hop_limit_and_bad_requests_answered(lab: RunningLab) -> None:
    async def flow() -> dict[str, int]:
        session = await _signin(lab, "bob")
        sip = session.sip
        assert sip is not None
        out: dict[str, int] = {}
        try:
            req = sip._register_request(3600)
            req.headers.replace("Max-Forwards", "0")
            out["mf0"] = (await sip.transact(req, 5)).status_code
            req = sip._register_request(3600)
            req.headers.replace("Max-Forwards", "1")  # E takes it to 0; C refuses beyond its hop limit
            out["mf1"] = (await sip.transact(req, 5)).status_code
            unknown = sip._register_request(3600)
            unknown.headers.replace("To", "<sip:7777@example.com>")
            unknown.headers.replace("From", "<sip:7777@example.com>;tag=x1")
            out["unknown"] = (await sip.transact(unknown, 5)).status_code
            opts: Request = sip._request("OPTIONS", "sip:9999@example.com")
            out["options"] = (await sip.transact(opts, 5)).status_code
            out["still_registered"] = (await sip.register()).status
        finally:
            await sign_out(session)
        return out

    out = asyncio.run(flow())
    assert out["mf0"] == 483
    assert out["mf1"] == 483
    assert out["unknown"] == 404
    assert out["options"] in (200, 405)
    assert out["still_registered"] == 200


def test_stun_keepalive_only_while_path_to_ucm_alive(lab_factory: Any) -> None:
    lab = lab_factory(
        "expc.ucm_keepalive_interval_s=0.5",
        "expc.zone.keepalive_interval_s=0.5",
        "expc.zone.keepalive_timeout_s=3",
    )
    ucm_pid = lab.component("ucm1")["pid"]

    async def flow() -> tuple[tuple[str, int] | None, tuple[str, int] | None, float]:
        session = await _signin(lab, "alice")
        sip = session.sip
        assert sip is not None
        try:
            before = await sip.stun_keepalive()
            os.kill(ucm_pid, signal.SIGKILL)
            started = time.monotonic()
            while pid_alive(ucm_pid) and time.monotonic() - started < 5:  # noqa: ASYNC110 - polling a pid
                await asyncio.sleep(0.05)
            after = None
            answered = True
            while answered and time.monotonic() - started < 10:
                after = await sip.stun_keepalive(timeout_s=1.0)
                answered = after is not None
            return before, after, time.monotonic() - started
        finally:
            try:
                await sign_out(session)
            except StepError:
                pass

    before, after, took = asyncio.run(flow())
    assert before is not None
    assert after is None, "E stops answering STUN once C no longer reaches UCM (spec §5 MRA HA)"
    assert took < 10


def _admin_put(lab: RunningLab, component: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    host, port = lab.config.admin_endpoint(component)
    req = urllib.request.Request(
        f"http://{host}:{port}/api/v1{path}",
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    creds = f"{lab.config.lab.admin_username}:{lab.config.lab.admin_password}".encode()
    req.add_header("Authorization", "Basic " + base64.b64encode(creds).decode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def test_maintenance_mode_drains_calls_and_refuses_new_ones(lab: RunningLab) -> None:
    """Spec §8: in maintenance new calls and registrations get 503; a call in progress goes on."""

    async def flow() -> tuple[CallReport, int, int, int]:
        alice = await _signin(lab, "alice")
        bob = await _signin(lab, "bob")
        assert alice.sip is not None and bob.sip is not None
        try:
            call = asyncio.ensure_future(place_call(alice.sip, "9999", 3.0))
            await asyncio.sleep(0.5)  # the call is up and its media flowing before maintenance starts
            assert await asyncio.to_thread(_admin_put, lab, "expc", "/maintenance", {"enabled": True})
            try:
                refused_register = (await bob.sip.transact(bob.sip._register_request(3600), 5)).status_code
                with_sdp = await _invite_status(bob.sip)
            finally:
                await asyncio.to_thread(_admin_put, lab, "expc", "/maintenance", {"enabled": False})
            report = await call
            restored = (await bob.sip.transact(bob.sip._register_request(3600), 5)).status_code
            return report, refused_register, with_sdp, restored
        finally:
            await sign_out(alice)
            await sign_out(bob)

    report, refused_register, refused_invite, restored = asyncio.run(flow())
    assert refused_register == 503
    assert refused_invite == 503
    assert report.received == report.sent and report.bye_status == 200, "the call in progress survived"
    assert restored == 200


async def _invite_status(sip: Any) -> int:
    from media_relay.srtp import generate_crypto
    from mra_client.call import offer_sdp

    body = offer_sdp(sip.local[0], 40000, generate_crypto(1), 1)
    invite = sip._request(
        "INVITE",
        "sip:9999@example.com",
        to="<sip:9999@example.com>",
        call_id="maint-1",
        from_tag="m1",
        body=body,
        content_type="application/sdp",
    )
    invite.headers.add("Contact", f"<sip:{sip.dn}@{sip.local[0]}:{sip.local[1]};transport=tls>")
    return int((await sip.transact(invite, 5)).status_code)


def test_stun_still_answered_long_after_the_zone_came_up(lab_factory: Any) -> None:
    """C's zone keepalives (OPTIONS to E's FQDN) keep E's path state fresh: STUN is answered
    well past the keepalive timeout, not only in the first seconds after the zone forms."""
    lab = lab_factory("expc.zone.keepalive_interval_s=0.3", "expc.zone.keepalive_timeout_s=1")

    async def flow() -> tuple[tuple[str, int] | None, bool]:
        session = await _signin(lab, "alice")
        assert session.sip is not None
        try:
            await asyncio.sleep(3)  # three keepalive timeouts
            mapped = await session.sip.stun_keepalive(timeout_s=2.0)
            return mapped, bool(lab.component("expe")["sip"]["path_alive"])
        finally:
            await sign_out(session)

    mapped, alive = asyncio.run(flow())
    assert alive, "E's /status says the path E→C→UCM is down although C keeps the zone alive"
    assert mapped is not None, "E stopped answering STUN although the path is alive"
