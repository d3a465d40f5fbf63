"""SIP over MRA through the real processes: the client emulator's REGISTER through E and C to the
mock UCM, what UCM stores (spec §5), STUN keepalives tied to the whole path, hop limits."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from edge.lab import pid_alive
from edge.sip.message import Request
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
