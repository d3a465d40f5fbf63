"""A minimal AXL (SOAP over HTTPS, ``POST /axl/``) on the mock IM&P node: `listProcessNode` only.

Expressway-C's "refresh servers" asks each configured IM&P publisher over AXL for its cluster's
nodes. The lab's stand-in answers one operation:

* request: a SOAP envelope whose body holds ``<ns:listProcessNode>`` (any AXL namespace version;
  the search criteria and returned tags are ignored);
* answer: ``<ns:listProcessNodeResponse><return><processNode uuid="…"><name>fqdn</name>
  <processNodeRole>CUCM IM and Presence</processNodeRole></processNode>…</return>``, with the
  ``EnterpriseWideData`` pseudo-node first (role ``CUCM Voice/Video``) as on a real cluster;
  the members are every `imp` node of the lab (the lab's IM&P nodes form one cluster) plus the
  node's ``cluster_extra`` FQDNs;
* anything else: 500 with a SOAP ``Fault``, as AXL does.

Authentication: HTTP Basic with the lab's admin credentials (``lab.admin_username`` /
``lab.admin_password``, standing in for the AXL application user); otherwise 401.
"""

from __future__ import annotations

import hmac
import uuid
import xml.etree.ElementTree as ET

from aiohttp import web

from edge.config import ImpNode, LabConfig
from mock_ucm.http_common import RequestStats, new_app, parse_authorization

SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
AXL_NS = "http://www.cisco.com/AXL/API/14.0"
IMP_ROLE = "CUCM IM and Presence"
AXL_REALM = "AXL API"
MAX_AXL_REQUEST_BYTES = 16 * 1024
_NODE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "axl.mra-edge-lab")
ET.register_namespace("soapenv", SOAP_NS)
ET.register_namespace("ns", AXL_NS)


def cluster_members(config: LabConfig, node: ImpNode) -> list[str]:
    """The FQDNs the node lists as its cluster: the lab's IM&P nodes, then its extra ones."""
    out: list[str] = []
    for fqdn in [*(n.fqdn for n in config.imp), *node.cluster_extra]:
        if fqdn.lower() not in out:
            out.append(fqdn.lower())
    return out


def _envelope() -> tuple[ET.Element, ET.Element]:
    env = ET.Element(f"{{{SOAP_NS}}}Envelope")
    return env, ET.SubElement(env, f"{{{SOAP_NS}}}Body")


def _soap(env: ET.Element, status: int = 200) -> web.Response:
    body = b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(env)
    return web.Response(body=body, status=status, content_type="text/xml", charset="utf-8")


def _fault(message: str) -> web.Response:
    env, body = _envelope()
    fault = ET.SubElement(body, f"{{{SOAP_NS}}}Fault")
    ET.SubElement(fault, "faultcode").text = "soapenv:Client"
    ET.SubElement(fault, "faultstring").text = message
    return _soap(env, 500)


def list_process_node_response(members: list[str]) -> web.Response:
    env, body = _envelope()
    resp = ET.SubElement(body, f"{{{AXL_NS}}}listProcessNodeResponse")
    ret = ET.SubElement(resp, "return")
    for name, role in [("EnterpriseWideData", "CUCM Voice/Video"), *((m, IMP_ROLE) for m in members)]:
        node = ET.SubElement(
            ret, "processNode", uuid="{" + str(uuid.uuid5(_NODE_NAMESPACE, name)).upper() + "}"
        )
        ET.SubElement(node, "name").text = name
        ET.SubElement(node, "processNodeRole").text = role
    return _soap(env)


def _operation(body: bytes) -> str:
    """The local name of the SOAP body's first element ('' if the request is no SOAP envelope)."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        return ""
    try:
        env = ET.fromstring(body)
    except ET.ParseError:
        return ""
    soap_body = env.find(f"{{{SOAP_NS}}}Body")
    if env.tag != f"{{{SOAP_NS}}}Envelope" or soap_body is None or len(soap_body) == 0:
        return ""
    return soap_body[0].tag.rsplit("}", 1)[-1]


def build_axl_app(config: LabConfig, node: ImpNode, *, stats: RequestStats | None = None) -> web.Application:
    """The IM&P node's HTTPS application (mounted on its https_port by ImpComponent)."""
    app = new_app(stats or RequestStats("axl"), max_request_bytes=MAX_AXL_REQUEST_BYTES)
    user, password = config.lab.admin_username, config.lab.admin_password

    async def handle(request: web.Request) -> web.Response:
        creds = parse_authorization(request.headers.get("Authorization"))
        if (
            creds is None
            or creds.scheme != "basic"
            or not hmac.compare_digest(creds.username.encode(), user.encode())
            or not hmac.compare_digest(creds.password.encode(), password.encode())
        ):
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": f'Basic realm="{AXL_REALM}"'})
        operation = _operation(await request.read())
        if operation != "listProcessNode":
            return _fault(f"unsupported request {operation[:40]!r}" if operation else "not a SOAP request")
        return list_process_node_response(cluster_members(config, node))

    app.router.add_post("/axl/", handle)
    return app
