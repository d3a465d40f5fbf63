"""Unity Connection: VMREST routes with auth, and the CUC component on loopback TLS."""

from __future__ import annotations

import ssl
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest

from edge.config import LabConfig
from mock_ucm.cuc import CucComponent
from mock_ucm.directory import Directory
from mock_ucm.oauth import OAuthIssuer, state_verifier
from mock_ucm.vmrest import build_vmrest_app

from .conftest import T0, FakeClock, ThrowawayTls, basic, bearer

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def vmrest(config: LabConfig, directory: Directory, clock: FakeClock) -> AsyncIterator[Client]:
    app = build_vmrest_app(
        config.cuc[0], directory, verifier=state_verifier(config, clock=clock), clock=clock
    )
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def get_xml(client: Client, path: str, user: str = "alice", status: int = 200) -> ET.Element:
    resp = await client.get(path, headers=basic(user, "lab-pass"))
    body = await resp.read()
    assert resp.status == status, body
    assert resp.headers["Content-Type"] == "application/xml"
    return ET.fromstring(body)


async def test_every_route_needs_credentials(vmrest: Client) -> None:
    paths = ["/vmrest/version", "/vmrest/users", "/vmrest/mailbox", "/vmrest/mailbox/folders/inbox/messages"]
    for path in paths:
        for headers in ({}, basic("alice", "bad"), bearer("nope")):
            resp = await vmrest.get(path, headers=headers)
            assert resp.status == 401, path
            assert resp.headers["WWW-Authenticate"] == 'Basic realm="Cisco Unity Connection"'


async def test_version(vmrest: Client) -> None:
    info = await get_xml(vmrest, "/vmrest/version")
    assert info.tag == "VersionInfo"
    assert info.findtext("name") == "vmrest"
    assert (info.findtext("version") or "").startswith("14.")


async def test_users_query(vmrest: Client) -> None:
    users = await get_xml(vmrest, "/vmrest/users?query=(alias%20is%20alice)")
    assert users.tag == "Users" and users.get("total") == "1"
    [user] = users.findall("User")
    assert user.findtext("Alias") == "alice"
    assert user.findtext("DtmfAccessId") == "1001"
    assert user.findtext("URI") == f"/vmrest/users/{user.findtext('ObjectId')}"

    none = await get_xml(vmrest, "/vmrest/users?query=(alias%20is%20mallory)")
    assert none.get("total") == "0" and none.findall("User") == []
    by_dn = await get_xml(vmrest, "/vmrest/users?query=(dtmfaccessid%20is%201002)")
    assert [u.findtext("Alias") for u in by_dn.findall("User")] == ["bob"]
    prefix = await get_xml(
        vmrest, "/vmrest/users?query=(alias%20startswith%20load)&rowsPerPage=10&pageNumber=3"
    )
    assert prefix.get("total") == "30"
    assert [u.findtext("Alias") for u in prefix.findall("User")] == [f"load{i:05d}" for i in range(21, 31)]
    last = await get_xml(vmrest, "/vmrest/users?query=(LastName%20is%20smith)")
    assert [u.findtext("Alias") for u in last.findall("User")] == ["carol"]
    everyone = await get_xml(vmrest, "/vmrest/users?rowsPerPage=2")
    assert everyone.get("total") == "33" and len(everyone.findall("User")) == 2

    for bad in ("(alias%20like%20a)", "alias%20is%20alice", "(password%20is%20x)"):
        error = await get_xml(vmrest, f"/vmrest/users?query={bad}", status=400)
        assert error.tag == "ErrorDetails"
        assert error.findtext("errors/code") == "INVALID_PARAMETER"
    resp = await vmrest.get("/vmrest/users?rowsPerPage=x", headers=basic("alice", "lab-pass"))
    assert resp.status == 400


async def test_mailbox_and_messages(vmrest: Client) -> None:
    mailbox = await get_xml(vmrest, "/vmrest/mailbox")
    assert mailbox.tag == "MailboxInfo"
    assert mailbox.findtext("DisplayName") == "Alice Example"
    assert mailbox.findtext("IsMailboxMounted") == "true"
    assert (mailbox.findtext("InboxCount"), mailbox.findtext("UnreadCount")) == ("2", "1")

    inbox = await get_xml(vmrest, "/vmrest/mailbox/folders/inbox/messages")
    assert inbox.tag == "Messages" and inbox.get("total") == "2"
    messages = inbox.findall("Message")
    assert [m.findtext("From/DtmfAccessId") for m in messages] == ["1002", "1003"]
    assert [m.findtext("Read") for m in messages] == ["false", "true"]
    assert messages[0].findtext("Subject") == "Message from Bob Example (1002)"
    assert messages[0].findtext("To/DtmfAccessId") == "1001"
    assert messages[0].findtext("ArrivalTime") == str(int(T0 * 1000) - 3_600_000)
    msg_id = messages[0].findtext("MsgId")
    assert msg_id is not None and msg_id.startswith("0:")

    one = await get_xml(vmrest, f"/vmrest/messages/{msg_id}")
    assert one.tag == "Message" and one.findtext("MsgId") == msg_id
    resp = await vmrest.get(f"/vmrest/messages/{msg_id}", headers=basic("bob", "lab-pass"))
    assert resp.status == 404  # alice's message is not in bob's mailbox

    page = await get_xml(vmrest, "/vmrest/mailbox/folders/inbox/messages?rowsPerPage=1&pageNumber=2")
    assert page.get("total") == "2" and len(page.findall("Message")) == 1
    sent = await get_xml(vmrest, "/vmrest/mailbox/folders/sent/messages")
    assert sent.get("total") == "0"
    resp = await vmrest.get("/vmrest/mailbox/folders/secret/messages", headers=basic("alice", "lab-pass"))
    assert resp.status == 404


async def test_bearer_token_of_the_cluster(vmrest: Client, config: LabConfig, clock: FakeClock) -> None:
    issuer = OAuthIssuer.for_node(config, config.ucm[0], clock=clock)  # key appears after CUC started
    grant = issuer.issue("bob")
    resp = await vmrest.get("/vmrest/mailbox", headers=bearer(grant.access_token))
    assert resp.status == 200
    assert ET.fromstring(await resp.read()).findtext("DisplayName") == "Bob Example"
    resp = await vmrest.get("/vmrest/mailbox", headers=bearer(grant.refresh_token))
    assert resp.status == 401


async def test_cuc_component_over_tls(config: LabConfig, tls: ThrowawayTls) -> None:
    config.cuc[0].address = "127.0.0.1"
    component = CucComponent("cuc1", config, ssl_context=tls.server, port=0)
    assert component.role == "cuc"
    await component.start()
    try:
        [listener] = component.listeners()
        assert (listener.name, listener.transport, listener.host) == ("https", "tls", "127.0.0.1")
        assert listener.port > 0
        url = f"https://127.0.0.1:{listener.port}/vmrest/mailbox/folders/inbox/messages"
        async with aiohttp.ClientSession() as session:
            async with session.get(url, ssl=tls.client, headers=basic("carol", "lab-pass")) as resp:
                assert resp.status == 200
                assert ET.fromstring(await resp.read()).get("total") == "2"
            async with session.get(url, ssl=tls.client) as resp:
                assert resp.status == 401
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(url, ssl=ssl.create_default_context())  # untrusted: the lab CA is not in it
        status = component.status()
        assert status["users"] == 33
        assert status["http"]["requests_total"] == 2
        assert status["http"]["by_status"] == {"200": 1, "401": 1}
        metrics = generate_latest(component.registry).decode()
        route = "/vmrest/mailbox/folders/{folder}/messages"
        assert f'cuc_http_requests_total{{app="vmrest",route="{route}",status="200"}} 1.0' in metrics
    finally:
        await component.stop()
    assert component._runner is None


async def test_cuc_component_with_the_lab_pki(config: LabConfig) -> None:
    """No injected context: the component loads its certificate from the lab PKI (spec §3)."""
    from edge.lab_pki import lab_pki
    from edge.pki import client_context

    component = CucComponent("cuc1", config, port=0)
    await component.start()
    try:
        [listener] = component.listeners()
        assert listener.host == config.cuc[0].address
        context = client_context(lab_pki(config), None)
        url = f"https://{listener.host}:{listener.port}/vmrest/version"
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                url, ssl=context, server_hostname="cuc1.example.com", headers=basic("alice", "lab-pass")
            ) as resp,
        ):
            assert resp.status == 200
            assert ET.fromstring(await resp.read()).tag == "VersionInfo"
    finally:
        await component.stop()
