"""UDS on the Unified CM HTTPS app: anonymous system resources, authenticated user resources."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, generate_latest

from edge.config import LabConfig
from mock_ucm.directory import Directory, device_pkid
from mock_ucm.http_apps import build_ucm_http_apps
from mock_ucm.http_common import STATS_KEY
from mock_ucm.oauth import OAuthIssuer

from .conftest import UcmApps, basic, bearer

BASE = "https://ucm1.example.com:8443/cucm-uds"


async def get_xml(apps: UcmApps, path: str, status: int = 200, **kwargs: object) -> ET.Element:
    resp = await apps.https.get(path, **kwargs)  # type: ignore[arg-type]
    body = await resp.read()
    assert resp.status == status, body
    assert resp.headers["Content-Type"] == "application/xml"
    return ET.fromstring(body)


async def test_version_and_servers_are_anonymous(ucm: UcmApps) -> None:
    version = await get_xml(ucm, "/cucm-uds/version")
    assert version.tag == "versionInformation"
    assert version.get("uri") == f"{BASE}/version"
    assert version.findtext("version") == version.get("version")
    servers = await get_xml(ucm, "/cucm-uds/servers")
    assert [s.text for s in servers.findall("server")] == ["ucm1.example.com"]


async def test_cluster_user_found_and_not_found(ucm: UcmApps) -> None:
    found = await get_xml(ucm, "/cucm-uds/clusterUser?username=alice")
    result = found.find("result")
    assert result is not None and result.get("found") == "true"
    assert result.get("uri") == f"{BASE}/user/alice"
    home = found.find("homeCluster")
    assert home is not None and home.text == "ucm1.example.com"
    assert home.get("serversUri") == f"{BASE}/servers"
    by_email = await get_xml(ucm, "/cucm-uds/clusterUser?email=bob@example.com")
    assert by_email.findtext("userName") == "bob"

    missing = await get_xml(ucm, "/cucm-uds/clusterUser?username=mallory")
    assert missing.tag == "clusterUser"
    result = missing.find("result")
    assert result is not None and result.get("found") == "false"
    assert missing.find("homeCluster") is None

    resp = await ucm.https.get("/cucm-uds/clusterUser")
    assert resp.status == 400


async def test_user_needs_that_users_basic_credentials(ucm: UcmApps) -> None:
    user = await get_xml(ucm, "/cucm-uds/user/alice", headers=basic("alice", "lab-pass"))
    assert user.tag == "user"
    assert user.findtext("userName") == "alice"
    assert user.findtext("phoneNumber") == "1001"
    assert user.findtext("displayName") == "Alice Example"
    assert user.findtext("imAndPresence/server") == "imp1.example.com"
    profile = user.find("serviceProfile")
    assert profile is not None and profile.get("uri") == "http://ucm1.example.com:6970/SPDefault.cnf.xml"

    for headers in ({}, basic("alice", "wrong"), basic("nobody", "lab-pass"), {"Authorization": "Basic !!"}):
        resp = await ucm.https.get("/cucm-uds/user/alice", headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="Cisco UDS"'

    resp = await ucm.https.get("/cucm-uds/user/alice", headers=basic("bob", "lab-pass"))
    assert resp.status == 403
    resp = await ucm.https.get("/cucm-uds/user/nobody", headers=basic("bob", "lab-pass"))
    assert resp.status == 404
    resp = await ucm.https.post("/cucm-uds/user/alice", headers=basic("alice", "lab-pass"))
    assert resp.status == 405


async def test_user_accepts_an_oauth_access_token(ucm: UcmApps, issuer: OAuthIssuer) -> None:
    grant = issuer.issue("alice")
    user = await get_xml(ucm, "/cucm-uds/user/alice", headers=bearer(grant.access_token))
    assert user.findtext("userName") == "alice"
    resp = await ucm.https.get("/cucm-uds/user/bob", headers=bearer(grant.access_token))
    assert resp.status == 403
    for token in (grant.refresh_token, grant.access_token[:-4] + "AAAA", "not-a-jwt"):
        resp = await ucm.https.get("/cucm-uds/user/alice", headers=bearer(token))
        assert resp.status == 401


async def test_devices_and_device(ucm: UcmApps) -> None:
    auth = basic("bob", "lab-pass")
    devices = await get_xml(ucm, "/cucm-uds/user/bob/devices", headers=auth)
    assert devices.get("totalCount") == "2"
    entries = devices.findall("device")
    assert [d.findtext("name") for d in entries] == ["CSFBOB", "BOTBOB"]
    assert entries[0].findtext("model") == "Cisco Unified Client Services Framework"
    assert entries[0].findtext("id") == device_pkid("CSFBOB")
    assert entries[0].get("uri") == f"{BASE}/user/bob/device/{device_pkid('CSFBOB')}"

    device = await get_xml(ucm, f"/cucm-uds/user/bob/device/{device_pkid('CSFBOB')}", headers=auth)
    assert device.tag == "device"
    assert device.findtext("name") == "CSFBOB"
    assert device.findtext("protocol") == "SIP"
    assert device.findtext("lines/line/directoryNumber") == "1002"

    resp = await ucm.https.get(f"/cucm-uds/user/bob/device/{device_pkid('CSFALICE')}", headers=auth)
    assert resp.status == 404  # alice's device is not bob's
    resp = await ucm.https.get(f"/cucm-uds/user/alice/device/{device_pkid('CSFALICE')}", headers=auth)
    assert resp.status == 403
    resp = await ucm.https.get("/cucm-uds/user/bob/devices")
    assert resp.status == 401


async def test_users_search_and_paging(ucm: UcmApps, directory: Directory) -> None:
    found = await get_xml(ucm, "/cucm-uds/users?last=Exam")
    assert found.get("totalCount") == "2"
    assert [u.findtext("userName") for u in found.findall("user")] == ["alice", "bob"]
    first = found.find("user")
    assert first is not None and first.get("uri") == f"{BASE}/user/alice"
    assert first.findtext("phoneNumber") == "1001"

    by_number = await get_xml(ucm, "/cucm-uds/users?number=1003")
    assert [u.findtext("userName") for u in by_number.findall("user")] == ["carol"]
    by_name = await get_xml(ucm, "/cucm-uds/users?name=car")
    assert by_name.get("totalCount") == "1"

    page = await get_xml(ucm, "/cucm-uds/users?name=load&start=25&max=10")
    assert page.get("totalCount") == "30"
    assert page.get("start") == "25"
    assert page.get("requestedCount") == "10"
    assert page.get("returnedCount") == "5"
    assert [u.findtext("userName") for u in page.findall("user")] == [f"load{i:05d}" for i in range(26, 31)]

    everyone = await get_xml(ucm, "/cucm-uds/users")
    assert everyone.get("totalCount") == str(len(directory))
    for bad in ("max=ten", "start=-x", "name=" + "x" * 300):
        resp = await ucm.https.get(f"/cucm-uds/users?{bad}")
        assert resp.status == 400, bad


async def test_unknown_routes_and_stats(ucm: UcmApps) -> None:
    resp = await ucm.https.get("/cucm-uds/nothing")
    assert resp.status == 404
    await ucm.https.get("/cucm-uds/version")
    stats = ucm.https_app[STATS_KEY].snapshot()
    assert stats["requests_total"] == 2
    assert stats["by_status"] == {"200": 1, "404": 1}
    assert stats["by_route"]["/cucm-uds/version"] == 1


async def test_a_handler_failure_is_a_bare_500(
    ucm: UcmApps, directory: Directory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(**kwargs: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(directory, "search", broken)
    resp = await ucm.https.get("/cucm-uds/users?name=a")
    assert resp.status == 500
    body = await resp.text()
    assert "secret internals" not in body and "Traceback" not in body
    assert ucm.https_app[STATS_KEY].internal_errors == 1
    assert "secret internals" in caplog.text  # logged server-side, with the traceback


async def test_prometheus_counters(config: LabConfig, directory: Directory, issuer: OAuthIssuer) -> None:
    registry = CollectorRegistry()
    https_app, _tftp_app = build_ucm_http_apps(config, config.ucm[0], directory, issuer, registry=registry)
    async with TestClient(TestServer(https_app, host="127.0.0.1")) as client:
        assert (await client.get("/cucm-uds/clusterUser?username=alice")).status == 200
        assert (await client.get("/cucm-uds/user/alice")).status == 401
    text = generate_latest(registry).decode()
    assert 'ucm_http_requests_total{app="https",route="/cucm-uds/clusterUser",status="200"} 1.0' in text
    assert 'ucm_http_requests_total{app="https",route="/cucm-uds/user/{userid}",status="401"} 1.0' in text
