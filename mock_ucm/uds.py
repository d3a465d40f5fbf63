"""User Data Services (UDS) on the Unified CM node's HTTPS port, under ``/cucm-uds/``.

Element and attribute names follow Cisco's UDS API reference (system resources `version`,
`servers`, `clusterUser`, `users`; user resources `user`, `devices`, `device`). Expressway-C
uses `clusterUser` to find a user's home cluster and `user/<id>` to check the user's credentials
(spec §4); MRA clients reach the rest through C's HTTP proxy.

Authentication as real UDS: `version`, `servers`, `clusterUser` and `users` are anonymous; a user
resource needs Basic credentials of that user (or an OAuth access token issued to that user).
No or bad credentials: 401 with ``WWW-Authenticate: Basic realm="Cisco UDS"``; another user's
valid credentials: 403; an unknown user id with valid credentials: 404.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from aiohttp import web

from edge.config import LabConfig, UcmNode
from mock_ucm.directory import DEFAULT_SEARCH_MAX, SEARCH_MAX_LIMIT, Device, Directory, DirectoryUser
from mock_ucm.http_common import (
    Authenticator,
    bool_text,
    element,
    query_int,
    query_text,
    sub,
    unauthorized,
    xml_response,
)

UDS_VERSION = "14.0.1"
UDS_REALM = "Cisco UDS"
MAX_USERID_CHARS = 128


class UdsHandlers:
    def __init__(self, config: LabConfig, node: UcmNode, directory: Directory, auth: Authenticator) -> None:
        self.config = config
        self.node = node
        self.directory = directory
        self.auth = auth
        self.base = f"https://{node.fqdn}:{node.https_port}/cucm-uds"
        self.imp_servers = [n.fqdn for n in config.imp]

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/cucm-uds/version", self._handle_version)
        r.add_get("/cucm-uds/servers", self._handle_servers)
        r.add_get("/cucm-uds/clusterUser", self._handle_cluster_user)
        r.add_get("/cucm-uds/users", self._handle_users)
        r.add_get("/cucm-uds/user/{userid}", self._handle_user)
        r.add_get("/cucm-uds/user/{userid}/devices", self._handle_devices)
        r.add_get("/cucm-uds/user/{userid}/device/{pkid}", self._handle_device)

    def _root(self, tag: str, path: str, **attrs: str) -> ET.Element:
        return element(tag, attrs={"version": UDS_VERSION, "uri": f"{self.base}/{path}", **attrs})

    # -- anonymous system resources ---------------------------------------------------------

    async def _handle_version(self, request: web.Request) -> web.Response:
        root = self._root("versionInformation", "version")
        sub(root, "version", UDS_VERSION)
        caps = sub(root, "capabilities")
        sub(caps, "usersResourceAuthEnabled", "false")
        return xml_response(root)

    async def _handle_servers(self, request: web.Request) -> web.Response:
        root = self._root("servers", "servers")
        for node in self.directory.nodes:
            sub(root, "server", node.fqdn)
        return xml_response(root)

    async def _handle_cluster_user(self, request: web.Request) -> web.Response:
        username = query_text(request, "username")
        email = query_text(request, "email")
        identifier = query_text(request, "useridentifier")
        if not (username or email or identifier):
            raise web.HTTPBadRequest(text="clusterUser needs username, email or useridentifier")
        if username:
            user, path = self.directory.get_user(username), f"clusterUser?username={username}"
        elif email:
            user, path = self.directory.get_user_by_email(email), f"clusterUser?email={email}"
        else:
            assert identifier is not None
            user = self.directory.get_user_by_email(identifier) or self.directory.get_user(identifier)
            path = f"clusterUser?useridentifier={identifier}"
        root = self._root("clusterUser", path)
        if user is None:
            sub(root, "result", attrs={"found": "false"})
            return xml_response(root)
        sub(
            root,
            "result",
            attrs={"found": "true", "uri": f"{self.base}/user/{user.username}", "version": UDS_VERSION},
        )
        sub(root, "userName", user.username)
        sub(root, "homeCluster", self.directory.cluster_name, {"serversUri": f"{self.base}/servers"})
        details = sub(root, "homeClusterDetails")
        sub(details, "selfProvisioningSecureMode", "true")
        sub(details, "adminProvisionMode", "false")
        return xml_response(root)

    async def _handle_users(self, request: web.Request) -> web.Response:
        filters = {
            key: query_text(request, key) for key in ("name", "first", "last", "number", "username", "email")
        }
        start = query_int(request, "start", 0, low=0, high=10**9)
        count = query_int(request, "max", DEFAULT_SEARCH_MAX, low=0, high=SEARCH_MAX_LIMIT)
        result = self.directory.search(
            name=filters["name"],
            first=filters["first"],
            last=filters["last"],
            number=filters["number"],
            username=filters["username"],
            email=filters["email"],
            start=start,
            max_results=count,
        )
        root = self._root(
            "users",
            f"users?{request.query_string}" if request.query_string else "users",
            start=str(start),
            requestedCount=str(count),
            returnedCount=str(len(result.users)),
            totalCount=str(result.total),
        )
        for user in result.users:
            entry = sub(root, "user", attrs={"uri": f"{self.base}/user/{user.username}"})
            self._user_summary(entry, user)
        return xml_response(root)

    # -- authenticated user resources -------------------------------------------------------

    def _authorised_user(self, request: web.Request) -> DirectoryUser:
        userid = request.match_info["userid"]
        if len(userid) > MAX_USERID_CHARS:
            raise web.HTTPBadRequest(text="user id too long")
        caller = self.auth.username(request)
        if caller is None:
            raise unauthorized(UDS_REALM)
        user = self.directory.get_user(userid)
        if user is None:
            raise web.HTTPNotFound(text=f"user {userid} not found")
        if user.username != caller:
            raise web.HTTPForbidden(text="credentials do not belong to this user")
        return user

    async def _handle_user(self, request: web.Request) -> web.Response:
        user = self._authorised_user(request)
        root = self._root("user", f"user/{user.username}")
        self._user_summary(root, user)
        sub(root, "mobileConnect", "false")
        sub(root, "remoteDestinationLimit", "4")
        sub(
            root,
            "userLocale",
            "English, United States",
            {"uri": f"{self.base}/options/installedLocales", "value": "", "appliesToAllDevices": "true"},
        )
        sub(root, "department")
        sub(root, "manager")
        sub(root, "title")
        sub(root, "pager")
        sub(root, "accountType", "local", {"useLdapAuth": "false"})
        sub(
            root,
            "homeCluster",
            "true",
            {"enableImAndPresence": bool_text(bool(self.imp_servers)), "enableCalendarPresence": "false"},
        )
        imp = sub(root, "imAndPresence")
        for server in self.imp_servers:
            sub(imp, "server", server)
        sub(
            root,
            "serviceProfile",
            attrs={"uri": f"http://{self.node.fqdn}:{self.node.tftp_http_port}/SPDefault.cnf.xml"},
        )
        sub(root, "devices", attrs={"uri": f"{self.base}/user/{user.username}/devices"})
        sub(root, "extensions", attrs={"uri": f"{self.base}/user/{user.username}/extensions"})
        return xml_response(root)

    async def _handle_devices(self, request: web.Request) -> web.Response:
        user = self._authorised_user(request)
        count = len(user.devices)
        root = self._root(
            "devices",
            f"user/{user.username}/devices",
            start="0",
            requestedCount=str(count),
            returnedCount=str(count),
            totalCount=str(count),
        )
        for device in user.devices:
            entry = sub(root, "device", attrs={"uri": self._device_uri(user, device)})
            self._device_summary(entry, device)
        return xml_response(root)

    async def _handle_device(self, request: web.Request) -> web.Response:
        user = self._authorised_user(request)
        device = user.device_by_pkid(request.match_info["pkid"])
        if device is None:
            raise web.HTTPNotFound(text="no such device for this user")
        root = self._root("device", f"user/{user.username}/device/{device.pkid}", hasPrimaryNumber="true")
        self._device_summary(root, device)
        sub(root, "requireCerLocation", "false")
        sub(root, "doNotDisturb", "false", {"appliesToAllDevices": "false"})
        lines = sub(root, "lines")
        # [lab] one line per device: the user's DN (UDS shows it under the device's extensions).
        line = sub(lines, "line", attrs={"index": "1"})
        sub(line, "directoryNumber", user.dn)
        sub(line, "partition")
        sub(line, "label", user.display_name)
        return xml_response(root)

    # -- element builders -------------------------------------------------------------------

    def _device_uri(self, user: DirectoryUser, device: Device) -> str:
        return f"{self.base}/user/{user.username}/device/{device.pkid}"

    @staticmethod
    def _user_summary(parent: ET.Element, user: DirectoryUser) -> None:
        sub(parent, "id", user.pkid)
        sub(parent, "userName", user.username)
        sub(parent, "firstName", user.first_name)
        sub(parent, "lastName", user.last_name)
        sub(parent, "middleName")
        sub(parent, "nickName")
        sub(parent, "displayName", user.display_name)
        sub(parent, "phoneNumber", user.dn)
        sub(parent, "homeNumber")
        sub(parent, "mobileNumber")
        sub(parent, "email", user.email)
        sub(parent, "directoryUri", user.email)
        sub(parent, "msUri")

    @staticmethod
    def _device_summary(parent: ET.Element, device: Device) -> None:
        sub(parent, "id", device.pkid)
        sub(parent, "name", device.name)
        sub(parent, "type", "Phone")
        sub(parent, "description", f"{device.owner} {device.model}", {"editable": "true"})
        sub(parent, "model", device.model)
        sub(parent, "protocol", device.protocol)
