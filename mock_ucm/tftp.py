"""TFTP over HTTP (6970) and HTTPS (6972): the configuration files Unified CM's TFTP service builds.

Nothing is read from disk: every file is generated from the directory, so a crafted name can at
worst be refused. Names with path separators, `..`, control characters or an unknown form are a
400; well-formed names of files that do not exist are a 404 (spec §2, §4).

Files:
* ``<DEVICE>.cnf.xml``: the device's configuration: its CallManager group (this node first as
  ``processNodeName`` with its SIP ports), its line (DN, auth name) and service profile.
* ``SPDefault.cnf.xml``: the default UC service profile ([lab] structure; the services it lists
  are IM and Presence, voicemail and the UDS directory of this cluster).
* ``jabber-config.xml``: a small Jabber client configuration (real parameter names from the
  Jabber parameters reference: ``PresenceServerAddress``, ``VoicemailPrimaryServer``, ``TftpServer1``…).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from aiohttp import web

from edge.config import LabConfig, UcmNode
from mock_ucm.directory import Device, Directory, DirectoryUser
from mock_ucm.http_common import element, sub, xml_bytes

SERVICE_PROFILE_FILE = "SPDefault.cnf.xml"
JABBER_CONFIG_FILE = "jabber-config.xml"
MAX_FILENAME_CHARS = 128
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_TRANSPORT_TCP = "2"
"""`transportLayerProtocol` in a SIP device file: 1 UDP, 2 TCP, 3 TLS, 4 TCP with UDP fallback."""


class UnsafeFileName(ValueError):
    """A requested name that could escape a TFTP root on a real server: refused before any lookup."""


def check_file_name(name: str) -> str:
    if not name or len(name) > MAX_FILENAME_CHARS or ".." in name or not _SAFE_NAME.match(name):
        raise UnsafeFileName(f"refused file name {name[:MAX_FILENAME_CHARS]!r}")
    return name


class TftpFiles:
    """The node's generated TFTP files; `get(name)` is the only entry point."""

    def __init__(self, config: LabConfig, node: UcmNode, directory: Directory) -> None:
        self.config = config
        self.node = node
        self.directory = directory
        # Static files are built once; device files on demand (100,000 users, few fetched).
        self._static = {
            SERVICE_PROFILE_FILE.lower(): xml_bytes(self._service_profile()),
            JABBER_CONFIG_FILE.lower(): xml_bytes(self._jabber_config()),
        }

    def get(self, name: str) -> bytes | None:
        """The file's bytes, None if there is no such file; UnsafeFileName for a suspicious name."""
        check_file_name(name)
        lower = name.lower()
        static = self._static.get(lower)
        if static is not None:
            return static
        if lower.endswith(".cnf.xml"):
            found = self.directory.get_device(name[: -len(".cnf.xml")])
            if found is not None:
                return xml_bytes(self._device_config(*found))
        return None

    # -- device configuration file ----------------------------------------------------------

    def _device_config(self, user: DirectoryUser, device: Device) -> ET.Element:
        root = element("device", attrs={"uuid": "{" + device.pkid + "}"})
        sub(root, "fullConfig", "true")
        sub(root, "deviceProtocol", device.protocol)
        sub(root, "deviceSecurityMode", "1")  # 1 non-secure, 2 authenticated, 3 encrypted
        sub(root, "transportLayerProtocol", _TRANSPORT_TCP)
        sub(root, "name", device.name)
        sub(root, "model", device.model)
        pool = sub(root, "devicePool")
        sub(pool, "name", "Default")
        dts = sub(pool, "dateTimeSetting")
        sub(dts, "name", "CMLocal")
        sub(dts, "dateTemplate", "M/D/Y")
        sub(dts, "timeZone", "Greenwich Standard Time")
        group = sub(pool, "callManagerGroup")
        sub(group, "name", "Default")
        sub(group, "tftpDefault", "true")
        members = sub(group, "members")
        # This node first: it is the one the device registers to; the rest are backups.
        ordered = sorted(self.directory.nodes, key=lambda n: n.name != self.node.name)
        for priority, node in enumerate(ordered):
            member = sub(members, "member", attrs={"priority": str(priority)})
            cm = sub(member, "callManager")
            sub(cm, "name", node.fqdn)
            sub(cm, "description", node.name)
            ports = sub(cm, "ports")
            sub(ports, "ethernetPhonePort", "2000")
            sub(ports, "sipPort", str(node.sip_tcp_port))
            sub(ports, "securedSipPort", str(node.sip_tls_port))
            sub(cm, "processNodeName", node.fqdn)
        self._sip_profile(root, user)
        sub(root, "userId", user.username, {"serviceProfileFile": SERVICE_PROFILE_FILE})
        sub(root, "ownerId", user.username)
        sub(root, "dialToneSetting", "1")
        return root

    def _sip_profile(self, root: ET.Element, user: DirectoryUser) -> None:
        profile = sub(root, "sipProfile")
        proxies = sub(profile, "sipProxies")
        sub(proxies, "registerWithProxy", "true")
        stack = sub(profile, "sipStack")
        sub(stack, "sipInviteRetx", "6")
        sub(stack, "sipRetx", "10")
        sub(stack, "timerRegisterExpires", "3600")
        sub(stack, "timerKeepAliveExpires", "120")
        sub(stack, "timerSubscribeExpires", "120")
        sub(profile, "phoneLabel", user.display_name)
        lines = sub(profile, "sipLines")
        line = sub(lines, "line", attrs={"button": "1", "lineIndex": "1"})
        sub(line, "featureID", "9")
        sub(line, "featureLabel", user.dn)
        sub(line, "proxy", "USECALLMANAGER")
        sub(line, "port", str(self.node.sip_tcp_port))
        sub(line, "name", user.dn)
        sub(line, "displayName", user.display_name)
        sub(line, "contact", user.dn)
        sub(line, "authName", user.username)
        sub(line, "authPassword")
        sub(line, "sharedLine", "false")
        sub(line, "messageWaitingLampPolicy", "3")
        sub(line, "messagesNumber")
        sub(profile, "voipControlPort", str(self.node.sip_tcp_port))
        sub(profile, "startMediaPort", "16384")
        sub(profile, "stopMediaPort", "32766")
        sub(profile, "dscpForAudio", "184")
        sub(profile, "dialTemplate", "dialplan.xml")

    # -- profiles ---------------------------------------------------------------------------

    def _service_profile(self) -> ET.Element:
        root = element("ServiceProfile", attrs={"name": "Default", "isDefault": "true"})
        services = sub(root, "Services")
        for imp in self.config.imp:
            svc = sub(services, "Service", attrs={"type": "IMAndPresence"})
            sub(svc, "Product", "Unified CM (IM and Presence Service)")
            sub(svc, "Address", imp.fqdn)
        for cuc in self.config.cuc:
            svc = sub(services, "Service", attrs={"type": "Voicemail"})
            sub(svc, "Product", "Unity Connection")
            sub(svc, "Address", cuc.fqdn)
            sub(svc, "Port", str(cuc.https_port))
            sub(svc, "Protocol", "HTTPS")
            sub(svc, "CredentialsSource", "Unified CM - IM and Presence Service")
        svc = sub(services, "Service", attrs={"type": "Directory"})
        sub(svc, "Product", "UDS")
        sub(svc, "Address", self.directory.cluster_name)
        sub(svc, "Port", str(self.config.ucm[0].https_port))
        return root

    def _jabber_config(self) -> ET.Element:
        root = element("config", attrs={"version": "1.0"})
        options = sub(root, "Options")
        sub(options, "VoiceServicesDomain", self.config.lab.domain)
        presence = sub(root, "Presence")
        if self.config.imp:
            sub(presence, "PresenceServerAddress", self.config.imp[0].fqdn)
        sub(presence, "PresenceDomain", self.config.lab.domain)
        if self.config.cuc:
            voicemail = sub(root, "Voicemail")
            sub(voicemail, "VoicemailPrimaryServer", self.config.cuc[0].fqdn)
            sub(voicemail, "VoiceMailService_UseCredentialsFrom", "phone")
        phone = sub(root, "Phone")
        for i, node in enumerate(self.directory.nodes[:3], start=1):
            sub(phone, f"TftpServer{i}", node.fqdn)
        directory = sub(root, "Directory")
        sub(directory, "DirectoryServerType", "UDS")
        return root


class TftpHandlers:
    def __init__(self, files: TftpFiles) -> None:
        self.files = files
        self.served = 0

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/{filename}", self._handle_file)

    async def _handle_file(self, request: web.Request) -> web.Response:
        try:
            body = self.files.get(request.match_info["filename"])
        except UnsafeFileName:
            raise web.HTTPBadRequest(text="400 Bad Request: invalid file name") from None
        if body is None:
            raise web.HTTPNotFound(text="404 Not Found")
        self.served += 1
        return web.Response(body=body, headers={"Content-Type": "application/xml"})
