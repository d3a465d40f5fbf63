"""Unity Connection's REST interfaces, the subset Jabber and MRA tests use (VMREST: CUPI + CUMI).

* ``GET /vmrest/version`` → ``<VersionInfo>``
* ``GET /vmrest/users[?query=(alias is alice)][&rowsPerPage=&pageNumber=]`` → ``<Users total="…">``
  (CUPI query operators ``is`` and ``startswith`` on alias, dtmfaccessid, firstname, lastname,
  displayname)
* ``GET /vmrest/mailbox`` → ``<MailboxInfo>`` of the authenticated user
* ``GET /vmrest/mailbox/folders/{inbox|sent|deleted}/messages`` → ``<Messages total="…">``
* ``GET /vmrest/messages/{MsgId}`` → one ``<Message>`` of the authenticated user
* ``GET /vmrest/cluster`` → ``<Servers total="n"><Server><URI>/vmrest/cluster/1</URI><Key>1</Key>
  <HostName>cuc1.example.com</HostName><ServerState>Primary</ServerState></Server>…</Servers>``:
  the lab's stand-in for the cluster listing Expressway-C's "refresh servers" reads (the publisher
  first, state ``Primary``; the other members ``Secondary``). It needs the lab's admin credentials
  (Basic, ``lab.admin_username``/``lab.admin_password``), not a user's; anonymous when the app is
  built without them

Every other request needs the caller's Basic credentials (checked against the lab directory) or an
OAuth access token of the cluster; otherwise 401 with a Basic challenge. Bad input is a 400 with
CUPI's ``<ErrorDetails>`` body.

Each user's inbox holds two seeded voice messages, deterministic from the directory (the senders
are the next users in user-id order) and the server's start time, built on demand.
"""

from __future__ import annotations

import hmac
import re
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from aiohttp import web

from edge.config import CucNode
from mock_ucm.directory import SEARCH_MAX_LIMIT, Directory, DirectoryUser, SearchResult
from mock_ucm.http_common import (
    Authenticator,
    HttpError,
    RequestStats,
    bool_text,
    element,
    new_app,
    parse_authorization,
    query_int,
    query_text,
    sub,
    unauthorized,
    xml_response,
)
from mock_ucm.oauth import Clock, TokenVerifier

CUC_VERSION = "14.0.1.10000-117"
CUC_REALM = "Cisco Unity Connection"
SEEDED_MESSAGES = 2
MAX_ROWS_PER_PAGE = SEARCH_MAX_LIMIT
FOLDERS = ("inbox", "sent", "deleted")
_MSG_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "vmrest.mra-edge-lab")
_QUERY = re.compile(r"^\(\s*(\w+)\s+(is|startswith)\s+(.*?)\s*\)$", re.IGNORECASE)
_QUERY_COLUMNS = ("alias", "dtmfaccessid", "firstname", "lastname", "displayname")
_EXTERNAL_CALLER = ("+14085550100", "Wireless Caller")


@dataclass(frozen=True, slots=True)
class VoiceMessage:
    msg_id: str
    owner: str
    sender_name: str
    sender_number: str
    sender_email: str
    from_subscriber: bool
    arrival_ms: int
    duration_ms: int
    read: bool


def _bad_request(code: str, message: str) -> HttpError:
    root = element("ErrorDetails")
    errors = sub(root, "errors")
    sub(errors, "code", code)
    sub(errors, "message", message)
    return HttpError(xml_response(root, status=400))


class Mailboxes:
    """Seeded voice messages per user, derived on demand (no per-user state for 100,000 users)."""

    def __init__(self, directory: Directory, seeded_at_s: float) -> None:
        self.directory = directory
        self.seeded_at_ms = int(seeded_at_s * 1000)
        self._row = {u.username: i for i, u in enumerate(directory.users())}

    def inbox(self, user: DirectoryUser) -> list[VoiceMessage]:
        users = self.directory.users()
        row = self._row[user.username]
        messages = []
        for n in range(SEEDED_MESSAGES):
            others = len(users) - 1
            if others > 0:
                sender = users[(row + 1 + n % others) % len(users)]
                name, number, email, internal = sender.display_name, sender.dn, sender.email, True
            else:
                (number, name), email, internal = _EXTERNAL_CALLER, "", False
            messages.append(
                VoiceMessage(
                    msg_id=f"0:{uuid.uuid5(_MSG_NAMESPACE, f'{user.username}/{n}')}",
                    owner=user.username,
                    sender_name=name,
                    sender_number=number,
                    sender_email=email,
                    from_subscriber=internal,
                    arrival_ms=self.seeded_at_ms - (n + 1) * 3_600_000,
                    duration_ms=8_000 + 4_000 * n,
                    read=n > 0,
                )
            )
        return messages

    def folder(self, user: DirectoryUser, folder: str) -> list[VoiceMessage]:
        return self.inbox(user) if folder == "inbox" else []

    def find(self, user: DirectoryUser, msg_id: str) -> VoiceMessage | None:
        for message in self.inbox(user):
            if message.msg_id == msg_id:
                return message
        return None


class VmrestHandlers:
    def __init__(
        self,
        node: CucNode,
        directory: Directory,
        auth: Authenticator,
        mailboxes: Mailboxes,
        *,
        cluster: list[str] | None = None,
        admin: tuple[str, str] | None = None,
    ) -> None:
        self.node = node
        self.directory = directory
        self.auth = auth
        self.mailboxes = mailboxes
        self.cluster = cluster if cluster is not None else [node.fqdn]
        self.admin = admin

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/vmrest/version", self._handle_version)
        r.add_get("/vmrest/users", self._handle_users)
        r.add_get("/vmrest/mailbox", self._handle_mailbox)
        r.add_get("/vmrest/mailbox/folders/{folder}/messages", self._handle_folder)
        r.add_get("/vmrest/messages/{msgid}", self._handle_message)
        r.add_get("/vmrest/cluster", self._handle_cluster)

    def _caller(self, request: web.Request) -> DirectoryUser:
        username = self.auth.username(request)
        user = self.directory.get_user(username) if username is not None else None
        if user is None:
            raise unauthorized(CUC_REALM)
        return user

    async def _handle_version(self, request: web.Request) -> web.Response:
        self._caller(request)
        root = element("VersionInfo")
        sub(root, "name", "vmrest")
        sub(root, "version", CUC_VERSION)
        return xml_response(root)

    async def _handle_cluster(self, request: web.Request) -> web.Response:
        if self.admin is not None:
            creds = parse_authorization(request.headers.get("Authorization"))
            if (
                creds is None
                or creds.scheme != "basic"
                or not (
                    hmac.compare_digest(creds.username.encode(), self.admin[0].encode())
                    and hmac.compare_digest(creds.password.encode(), self.admin[1].encode())
                )
            ):
                raise unauthorized(CUC_REALM)
        root = element("Servers", attrs={"total": str(len(self.cluster))})
        for key, fqdn in enumerate(self.cluster, 1):
            server = sub(root, "Server")
            sub(server, "URI", f"/vmrest/cluster/{key}")
            sub(server, "Key", str(key))
            sub(server, "HostName", fqdn)
            sub(server, "ServerState", "Primary" if fqdn.lower() == self.node.fqdn.lower() else "Secondary")
        return xml_response(root)

    async def _handle_users(self, request: web.Request) -> web.Response:
        self._caller(request)
        rows = query_int(request, "rowsPerPage", MAX_ROWS_PER_PAGE, low=1, high=MAX_ROWS_PER_PAGE)
        page = query_int(request, "pageNumber", 1, low=1, high=10**9)
        start = (page - 1) * rows
        query = query_text(request, "query")
        if query is None:
            total = len(self.directory)
            matches = list(self.directory.users()[start : start + rows])
        else:
            total, matches = self._query_users(query, start, rows)
        root = element("Users", attrs={"total": str(total)})
        for user in matches:
            self._user_element(root, user)
        return xml_response(root)

    def _query_users(self, query: str, start: int, rows: int) -> tuple[int, list[DirectoryUser]]:
        m = _QUERY.match(query.strip())
        if m is None:
            raise _bad_request("INVALID_PARAMETER", f"Invalid query: {query}")
        column, op, value = m.group(1).lower(), m.group(2).lower(), m.group(3)
        if column not in _QUERY_COLUMNS:
            raise _bad_request("INVALID_PARAMETER", f"Unknown column in query: {m.group(1)}")
        if op == "is":
            found = self._exact(column, value)
            return len(found), found[start : start + rows]
        result = self._prefix(column, value, start, rows)
        return result.total, list(result.users)

    def _prefix(self, column: str, value: str, start: int, rows: int) -> SearchResult:
        search = self.directory.search
        if column == "alias":
            return search(username=value, start=start, max_results=rows)
        if column == "dtmfaccessid":
            return search(number=value, start=start, max_results=rows)
        if column == "firstname":
            return search(first=value, start=start, max_results=rows)
        if column == "lastname":
            return search(last=value, start=start, max_results=rows)
        return search(display=value, start=start, max_results=rows)

    def _exact(self, column: str, value: str) -> list[DirectoryUser]:
        if column == "alias":
            user = self.directory.get_user(value)
            return [user] if user is not None else []
        if column == "dtmfaccessid":
            user = self.directory.get_user_by_dn(value)
            return [user] if user is not None else []
        attr = {"firstname": "first_name", "lastname": "last_name", "displayname": "display_name"}[column]
        candidates = self._prefix(column, value, 0, SEARCH_MAX_LIMIT)
        return [u for u in candidates.users if str(getattr(u, attr)).lower() == value.lower()]

    def _user_element(self, parent: ET.Element, user: DirectoryUser) -> None:
        entry = sub(parent, "User")
        sub(entry, "URI", f"/vmrest/users/{user.pkid}")
        sub(entry, "ObjectId", user.pkid)
        sub(entry, "Alias", user.username)
        sub(entry, "DisplayName", user.display_name)
        sub(entry, "FirstName", user.first_name)
        sub(entry, "LastName", user.last_name)
        sub(entry, "DtmfAccessId", user.dn)
        sub(entry, "SmtpAddress", user.email)
        sub(entry, "IsVmEnrolled", "true")
        sub(entry, "ListInDirectory", "true")

    async def _handle_mailbox(self, request: web.Request) -> web.Response:
        user = self._caller(request)
        inbox = self.mailboxes.inbox(user)
        root = element("MailboxInfo")
        sub(root, "DisplayName", user.display_name)
        sub(root, "MaxMessageLength", "300")
        sub(root, "IsPrimary", "true")
        sub(root, "IsSecondary", "false")
        sub(root, "IsMailboxMounted", "true")
        sub(root, "IsReceiveQuotaExceeded", "false")
        sub(root, "IsSendQuotaExceeded", "false")
        sub(root, "IsWarningQuotaExceeded", "false")
        sub(root, "ReceiveQuota", "-2")
        sub(root, "SendQuota", "-2")
        sub(root, "WarningQuota", "-2")
        sub(root, "MailboxSize", str(sum(m.duration_ms * 2 for m in inbox)))
        sub(root, "IsDeletedFolderEnabled", "true")
        sub(root, "InboxCount", str(len(inbox)))
        sub(root, "UnreadCount", str(sum(not m.read for m in inbox)))
        return xml_response(root)

    async def _handle_folder(self, request: web.Request) -> web.Response:
        user = self._caller(request)
        folder = request.match_info["folder"].lower()
        if folder not in FOLDERS:
            raise web.HTTPNotFound(text=f"unknown folder {folder[:32]!r}")
        rows = query_int(request, "rowsPerPage", 50, low=1, high=MAX_ROWS_PER_PAGE)
        page = query_int(request, "pageNumber", 1, low=1, high=10**9)
        messages = self.mailboxes.folder(user, folder)
        root = element("Messages", attrs={"total": str(len(messages))})
        for message in messages[(page - 1) * rows : page * rows]:
            self._fill_message(sub(root, "Message"), user, message)
        return xml_response(root)

    async def _handle_message(self, request: web.Request) -> web.Response:
        user = self._caller(request)
        message = self.mailboxes.find(user, request.match_info["msgid"])
        if message is None:
            raise web.HTTPNotFound(text="no such message")
        return xml_response(self._fill_message(element("Message"), user, message))

    def _fill_message(self, entry: ET.Element, user: DirectoryUser, m: VoiceMessage) -> ET.Element:
        subject = f"Message from {m.sender_name} ({m.sender_number})"
        sub(entry, "Subject", subject)
        sub(entry, "Read", bool_text(m.read))
        sub(entry, "Dispatch", "false")
        sub(entry, "Secure", "false")
        sub(entry, "Priority", "Normal")
        sub(entry, "Sensitivity", "Normal")
        sub(entry, "URI", f"/vmrest/messages/{m.msg_id}")
        sub(entry, "MsgId", m.msg_id)
        sender = sub(entry, "From")
        sub(sender, "DisplayName", m.sender_name)
        sub(sender, "SmtpAddress", m.sender_email)
        sub(sender, "DtmfAccessId", m.sender_number)
        to = sub(entry, "To")
        sub(to, "DisplayName", user.display_name)
        sub(to, "SmtpAddress", user.email)
        sub(to, "DtmfAccessId", user.dn)
        caller = sub(entry, "CallerId")
        sub(caller, "CallerNumber", m.sender_number)
        sub(caller, "CallerName", m.sender_name)
        sub(entry, "ArrivalTime", str(m.arrival_ms))
        sub(entry, "Size", str(m.duration_ms * 2))
        sub(entry, "Duration", str(m.duration_ms))
        sub(entry, "FromSub", bool_text(m.from_subscriber))
        sub(entry, "MsgType", "1")  # 1 voice
        sub(entry, "Flagged", "false")
        sub(entry, "IsDeleted", "false")
        sub(entry, "IsFuture", "false")
        return entry


def build_vmrest_app(
    node: CucNode,
    directory: Directory,
    *,
    verifier: TokenVerifier | None = None,
    stats: RequestStats | None = None,
    clock: Clock = time.time,
    cluster: list[str] | None = None,
    admin: tuple[str, str] | None = None,
) -> web.Application:
    """The Unity Connection node's HTTPS application (mounted on 443 by CucComponent).

    `cluster`: the FQDNs `/vmrest/cluster` lists (default: the node alone); `admin`: the
    (username, password) it requires (default: none, anonymous)."""
    stats = stats or RequestStats("vmrest")
    app = new_app(stats)
    handlers = VmrestHandlers(
        node,
        directory,
        Authenticator(directory, verifier),
        Mailboxes(directory, clock()),
        cluster=cluster,
        admin=admin,
    )
    handlers.add_routes(app)
    return app
