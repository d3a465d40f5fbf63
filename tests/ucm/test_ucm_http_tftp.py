"""TFTP over HTTP: generated device configs, the service profile, jabber-config, refusals."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.config import LabConfig
from mock_ucm.directory import Directory, device_pkid
from mock_ucm.tftp import TftpFiles, UnsafeFileName

from .conftest import UcmApps


async def fetch(apps: UcmApps, path: str) -> ET.Element:
    resp = await apps.tftp.get(path)
    body = await resp.read()
    assert resp.status == 200, body
    assert resp.headers["Content-Type"] == "application/xml"
    return ET.fromstring(body)


async def test_device_config_has_the_sip_settings(ucm: UcmApps) -> None:
    device = await fetch(ucm, "/CSFALICE.cnf.xml")
    assert device.tag == "device"
    assert device.get("uuid") == "{" + device_pkid("CSFALICE") + "}"
    assert device.findtext("deviceProtocol") == "SIP"
    member = device.find("devicePool/callManagerGroup/members/member")
    assert member is not None and member.get("priority") == "0"
    assert member.findtext("callManager/processNodeName") == "ucm1.example.com"
    assert member.findtext("callManager/ports/sipPort") == "5060"
    assert member.findtext("callManager/ports/securedSipPort") == "5061"
    line = device.find("sipProfile/sipLines/line")
    assert line is not None and line.get("button") == "1"
    assert line.findtext("name") == "1001"
    assert line.findtext("displayName") == "Alice Example"
    assert line.findtext("authName") == "alice"
    user_id = device.find("userId")
    assert user_id is not None and user_id.text == "alice"
    assert user_id.get("serviceProfileFile") == "SPDefault.cnf.xml"
    # Device names are matched case-insensitively, like the TFTP server's file lookup.
    lower = await fetch(ucm, "/csfbob.cnf.xml")
    assert lower.findtext("sipProfile/sipLines/line/name") == "1002"
    android = await fetch(ucm, "/BOTBOB.cnf.xml")
    assert android.findtext("model") == "Cisco Dual Mode for Android"


async def test_service_profile_and_jabber_config(ucm: UcmApps) -> None:
    profile = await fetch(ucm, "/SPDefault.cnf.xml")
    services = {s.get("type"): s for s in profile.findall("Services/Service")}
    assert services["IMAndPresence"].findtext("Address") == "imp1.example.com"
    assert services["Voicemail"].findtext("Address") == "cuc1.example.com"
    assert services["Voicemail"].findtext("Port") == "443"
    assert services["Directory"].findtext("Product") == "UDS"

    config = await fetch(ucm, "/jabber-config.xml")
    assert config.tag == "config" and config.get("version") == "1.0"
    assert config.findtext("Presence/PresenceServerAddress") == "imp1.example.com"
    assert config.findtext("Voicemail/VoicemailPrimaryServer") == "cuc1.example.com"
    assert config.findtext("Phone/TftpServer1") == "ucm1.example.com"
    assert config.findtext("Options/VoiceServicesDomain") == "example.com"


@pytest.mark.parametrize(
    ("path", "statuses"),
    [
        ("/CSFNOBODY.cnf.xml", {404}),
        ("/SEP001122334455.cnf.xml", {404}),
        ("/CSFALICE.cnf", {404}),
        ("/", {404}),
        ("/etc/passwd", {404}),
        ("/../../etc/passwd", {404}),
        ("/..%2F..%2Fetc%2Fpasswd", {400}),
        ("/%2e%2e", {400, 404}),  # the client may normalise this to "/"
        ("/.hidden", {400}),
        ("/CSFALICE.cnf.xml%00.txt", {400}),
        ("/a%5Cb.cnf.xml", {400}),
        ("/" + "A" * 200 + ".cnf.xml", {400}),
    ],
)
async def test_unknown_files_and_traversal_are_refused(ucm: UcmApps, path: str, statuses: set[int]) -> None:
    resp = await ucm.tftp.get(path)
    assert resp.status in statuses
    assert b"root:" not in await resp.read()


@pytest.mark.parametrize(
    "raw_path",
    ["/../../etc/passwd", "/..%2f..%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd", "/..\\..\\etc\\passwd"],
)
async def test_raw_traversal_requests(ucm: UcmApps, raw_path: str) -> None:
    """Bytes on the wire exactly as an attacker sends them, no client-side normalisation."""
    host, port = ucm.tftp.host, ucm.tftp.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {raw_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(65536), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    status = int(response.split(b" ", 2)[1])
    assert status in (400, 404)
    assert b"root:" not in response


async def test_only_get(ucm: UcmApps) -> None:
    resp = await ucm.tftp.post("/jabber-config.xml")
    assert resp.status == 405


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_file_lookup_never_raises_anything_else(name: str) -> None:
    # Built per example: hypothesis and function-scoped fixtures do not mix.
    files = _FILES
    try:
        body = files.get(name)
    except UnsafeFileName:
        return
    assert body is None or body.startswith(b"<?xml")
    assert "/" not in name and "\\" not in name and ".." not in name


_FILES = TftpFiles(LabConfig(), LabConfig().ucm[0], Directory.from_config(LabConfig()))
