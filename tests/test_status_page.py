"""The status pages (spec §8 "Status > Unified Communications") in a real headless Chromium.

Expressway-C's admin server serves the page at `/`; `edge lab console` serves it for the whole
lab. Both poll JSON without reloading: after Expressway-E is killed the open pages show the zone
Failed with its reason, E crashed, and the derived alarms. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import ARTIFACTS, RunningLab
from tests.web.cdp import Browser, chromium_path

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium")

ZONE_STATE = (
    "(() => { const el = document.querySelector('[data-component=\"expc\"] .zone-state');"
    " return el && el.textContent; })()"
)
ZONE_REASON = (
    "(() => { const el = document.querySelector('[data-component=\"expc\"] .zone-reason');"
    " return el && el.textContent; })()"
)
ALARMS = "Array.from(document.querySelectorAll('.alarm-text')).map(e => e.textContent)"
E_STATE = (
    "(() => { const el = document.querySelector('.component-state[data-name=\"expe\"]');"
    " return el && el.textContent; })()"
)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read().decode()


@pytest.fixture
def console(lab_factory: Any) -> Iterator[tuple[RunningLab, str]]:
    """A lab of its own (E gets killed) and `edge lab console` serving it."""
    lab: RunningLab = lab_factory()
    port = _free_port("127.0.0.1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "lab", "console", "--port", str(port), *lab.args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("EDGE__")},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _get(url + "/api/lab/status")
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("edge lab console did not start") from None
                time.sleep(0.05)
        yield lab, url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_pages_and_assets_are_served(lab: RunningLab) -> None:
    for name in ("expc", "expe"):
        host, port = lab.config.admin_endpoint(name)
        status, ctype, html = _get(f"http://{host}:{port}/")
        assert status == 200 and ctype.startswith("text/html")
        assert 'data-source="/status"' in html and "Unified Communications" in html
        assert _get(f"http://{host}:{port}/ui/app.js")[1].startswith("application/javascript")
        assert _get(f"http://{host}:{port}/ui/style.css")[1].startswith("text/css")
    host, port = lab.config.admin_endpoint("ucm1")
    with pytest.raises(urllib.error.HTTPError):  # the mocks have no status page
        _get(f"http://{host}:{port}/")


def test_zone_failure_shows_without_reload(console: tuple[RunningLab, str]) -> None:
    lab, console_url = console
    c_host, c_port = lab.config.admin_endpoint("expc")
    e_pid = lab.component("expe")["pid"]

    async def flow() -> dict[str, Any]:
        async with Browser() as page, Browser() as lab_page:
            await page.goto(f"http://{c_host}:{c_port}/")
            await lab_page.goto(console_url + "/")
            assert await page.wait_for(ZONE_STATE) == "Active"
            assert await lab_page.wait_for(ZONE_STATE) == "Active"
            assert await lab_page.evaluate(E_STATE) == "ready"
            assert await page.evaluate(ALARMS) == []
            # Paged tables: 25 rows render 10 (plus the header) and a pager.
            rows = await page.evaluate(
                "(() => { const d = document.createElement('div');"
                " d.innerHTML = table('probe', [['n', r => r]], Array.from({length: 25}, (_, i) => i));"
                " return [d.querySelectorAll('tr').length, d.querySelectorAll('button').length]; })()"
            )
            assert rows == [11, 2]
            for p in (page, lab_page):
                await p.evaluate("window.__sameDocument = 'kept'")
            polls_before = await page.evaluate("window.edgePolls")
            await page.screenshot(ARTIFACTS / "status-page-expc-active.png")

            os.kill(e_pid, signal.SIGKILL)

            state = await page.wait_for(f"{ZONE_STATE} === 'Failed' && {ZONE_STATE}", timeout_s=30)
            result = {
                "state": state,
                "reason": await page.wait_for(ZONE_REASON),
                "alarms": await page.evaluate(ALARMS),
                "kept": await page.evaluate("window.__sameDocument"),
                "polls": (polls_before, await page.evaluate("window.edgePolls")),
                "lab_zone": await lab_page.wait_for(f"{ZONE_STATE} === 'Failed' && {ZONE_STATE}"),
                "lab_e": await lab_page.wait_for(f"{E_STATE} === 'crashed' && {E_STATE}"),
                "lab_alarms": await lab_page.evaluate(ALARMS),
                "lab_kept": await lab_page.evaluate("window.__sameDocument"),
            }
            await page.screenshot(ARTIFACTS / "status-page-expc-zone-failed.png")
            await lab_page.screenshot(ARTIFACTS / "lab-console-expe-killed.png")
            return result

    r = asyncio.run(flow())
    assert r["state"] == "Failed"
    assert "expe" in r["reason"], r["reason"]  # "<channel> to expe: <why>"
    assert any(a.startswith("zone CollaborationEdgeZone Failed: ") for a in r["alarms"]), r["alarms"]
    assert r["kept"] == "kept" and r["polls"][1] > r["polls"][0], "updated by polling, not reloading"
    assert (r["lab_zone"], r["lab_e"], r["lab_kept"]) == ("Failed", "crashed", "kept")
    assert "process crashed: process is not running" in r["lab_alarms"]
    assert (ARTIFACTS / "status-page-expc-zone-failed.png").stat().st_size > 10_000


def test_console_serves_the_lab_status(console: tuple[RunningLab, str]) -> None:
    _lab, url = console
    status, ctype, body = _get(url + "/api/lab/status")
    data = json.loads(body)
    assert status == 200 and ctype.startswith("application/json")
    assert data["state"] == "ready"
    assert {c["name"] for c in data["components"]} == {"dns", "ucm1", "imp1", "cuc1", "expc", "expe"}
    status, ctype, html = _get(url + "/")
    assert 'data-source="/api/lab/status"' in html


def _count(component: str, name: str) -> str:
    return (
        f'(() => {{ const el = document.querySelector(\'[data-component="{component}"] '
        f'[data-count="{name}"]\'); return el && el.textContent; }})()'
    )


def test_page_shows_registration_and_live_media(console: tuple[RunningLab, str]) -> None:
    """Spec §8 / issue: a registered client holding a call to 9999; the aggregated page shows the
    registration and a media packet counter that grows between two reads, without a reload."""
    from mra_client.call import place_call
    from mra_client.demo import lab_client_settings
    from mra_client.signin import Ladder, sign_in, sign_out

    lab, console_url = console

    async def flow() -> tuple[str, int, int]:
        session = await sign_in(lab_client_settings(lab.config, "alice"), Ladder())
        assert session.sip is not None
        call = asyncio.ensure_future(place_call(session.sip, "9999", 4.0))
        try:
            async with Browser() as page:
                await page.goto(console_url + "/")
                regs = await page.wait_for(
                    f"(() => {{ const t = {_count('expe', 'MRA registrations')};"
                    " return t && t.includes('MRA registrations: 1 ') && t; })()"
                )
                first = await page.wait_for(_count("expe", "Media packets relayed"))
                n1 = int(str(first).split(":")[1])
                second = await page.wait_for(
                    f"(() => {{ const t = {_count('expe', 'Media packets relayed')};"
                    f" return t && parseInt(t.split(':')[1]) > {n1} && t; }})()"
                )
                await page.screenshot(ARTIFACTS / "status-page-lab-call.png")
                return str(regs), n1, int(str(second).split(":")[1])
        finally:
            report = await call
            assert report.received == report.sent
            await sign_out(session)

    regs, n1, n2 = asyncio.run(flow())
    assert "MRA registrations: 1 " in regs
    assert n2 > n1
