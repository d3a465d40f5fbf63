"""A SIP user agent as a Jabber client runs it over MRA (spec §5): one TLS flow to Expressway-E,
REGISTER with the `sipRequest` route preloaded, MRA markers in the Contact, STUN keepalives on
the flow, and calls."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from edge.sip.address import Via
from edge.sip.auth import compute_authorization
from edge.sip.events import FramingError, KeepaliveReceived, MessageReceived, StunReceived
from edge.sip.framing import StreamFramer
from edge.sip.message import Request, Response, make_response, new_branch, new_call_id, new_tag
from edge.stun import Class, StunError, binding_request
from edge.stun import parse_message as parse_stun
from mra_client.edge_http import StepError


@dataclass
class Registration:
    status: int
    expires: int
    supported: str
    elapsed_ms: float
    contact: str


@dataclass
class SipUaStats:
    requests_sent: int = 0
    responses: dict[int, int] = field(default_factory=dict)
    stun_sent: int = 0
    stun_answered: int = 0


class MraSipUa:
    def __init__(
        self,
        *,
        dn: str,
        username: str,
        password: str,
        domain: str,
        device: str,
        route: str | None,
        edge_host: str,
        edge_address: str,
        edge_port: int,
        ca_file: str,
        local_address: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.dn = dn
        self.username = username
        self.password = password
        self.domain = domain
        self.device = device
        self.route = route
        self.edge_host = edge_host
        self.edge_address = edge_address
        self.edge_port = edge_port
        self.ssl = ssl_context or ssl.create_default_context(cafile=ca_file)
        self.local_address = local_address
        self.instance = f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_DNS, device)}>"
        self.call_id = new_call_id()
        self.from_tag = new_tag()
        self.cseq = 0
        self.framer = StreamFramer()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.local: tuple[str, int] = ("", 0)
        self._pending: dict[str, asyncio.Future[Response]] = {}
        self._stun: dict[bytes, asyncio.Future[tuple[str, int]]] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self.incoming: asyncio.Queue[Request] = asyncio.Queue()
        self.on_request: Callable[[Request], None] | None = None
        """When set, incoming requests (other than OPTIONS) go here instead of `incoming`."""
        self.on_closed: Callable[[str], None] | None = None
        """Called once with the reason when the flow to E ends (not after `close()`)."""
        self._closing = False
        self.stats = SipUaStats()
        self.closed_reason: str | None = None

    # -- connection -----------------------------------------------------------------------

    async def connect(self, timeout_s: float = 10.0) -> None:
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.edge_address,
                    self.edge_port,
                    ssl=self.ssl,
                    server_hostname=self.edge_host,
                    local_addr=(self.local_address, 0) if self.local_address else None,
                ),
                timeout_s,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise StepError("SIP connect", f"{self.edge_host}:{self.edge_port}: {exc}") from exc
        assert self.writer is not None
        sock = self.writer.get_extra_info("sockname")
        self.local = (str(sock[0]), int(sock[1]))
        self._reader_task = asyncio.ensure_future(self._read_loop())

    async def close(self) -> None:
        self._closing = True
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task

    async def _read_loop(self) -> None:
        assert self.reader is not None
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    self.closed_reason = "closed by edge"
                    break
                for event in self.framer.receive_data(data):
                    if isinstance(event, MessageReceived):
                        self._dispatch(event.message)
                    elif isinstance(event, StunReceived):
                        self._stun_response(event.data)
                    elif isinstance(event, KeepaliveReceived):
                        if event.pong_needed:
                            self._write(b"\r\n")
                    elif isinstance(event, FramingError) and event.fatal:
                        self.closed_reason = f"framing error: {event.reason}"
                        return
        except (ConnectionError, OSError) as exc:
            self.closed_reason = str(exc)
        except Exception as exc:  # a bug in parsing: name it in every pending request's error
            self.closed_reason = f"client error {type(exc).__name__}: {exc}"
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(self.closed_reason or "flow closed"))
            if self.on_closed is not None and not self._closing:
                self.on_closed(self.closed_reason or "flow closed")

    def _dispatch(self, msg: Request | Response) -> None:
        if isinstance(msg, Response):
            self.stats.responses[msg.status_code] = self.stats.responses.get(msg.status_code, 0) + 1
            branch = msg.top_via.branch if msg.top_via else None
            fut = self._pending.get(branch or "")
            if fut is not None and not fut.done() and msg.status_code >= 200:
                fut.set_result(msg)
            return
        if msg.method == "OPTIONS":
            self.send(make_response(msg, 200, "OK"))
            return
        if self.on_request is not None:
            self.on_request(msg)
            return
        self.incoming.put_nowait(msg)

    def _write(self, data: bytes) -> None:
        if self.writer is None or self.writer.is_closing():
            raise ConnectionError("SIP flow is closed")
        self.writer.write(data)

    def send(self, msg: Request | Response) -> None:
        self._write(msg.serialize())

    # -- requests -------------------------------------------------------------------------

    def contact(self) -> str:
        return (
            f"<sip:{self.dn}@{self.local[0]}:{self.local[1]};transport=tls>"
            f';+sip.instance="{self.instance}"'
            f';+u.sip!devicename.ccm.cisco.com="{self.device}"'
            ';+u.sip!model.ccm.cisco.com="503";x-cisco-mra-ha=AR_SK'
        )

    def _request(
        self,
        method: str,
        uri: str,
        *,
        to: str | None = None,
        call_id: str | None = None,
        from_tag: str | None = None,
        body: bytes = b"",
        content_type: str | None = None,
    ) -> Request:
        self.cseq += 1
        req = Request(method, uri, [], body)
        via = Via(self.local[0], self.local[1], "TLS")
        via.params.set("branch", new_branch())
        via.params.set("rport", None)
        req.headers.add("Via", str(via))
        if self.route:
            req.headers.add("Route", self.route)
        req.headers.add("Max-Forwards", "70")
        req.headers.add("From", f"<sip:{self.dn}@{self.domain}>;tag={from_tag or self.from_tag}")
        req.headers.add("To", to or f"<sip:{self.dn}@{self.domain}>")
        req.headers.add("Call-ID", call_id or self.call_id)
        req.headers.add("CSeq", f"{self.cseq} {method}")
        req.headers.add("User-Agent", "mra-edge-lab client")
        if content_type:
            req.headers.add("Content-Type", content_type)
        req.headers.add("Content-Length", str(len(body)))
        return req

    async def transact(self, req: Request, timeout_s: float = 32.0) -> Response:
        branch = req.top_via.branch if req.top_via else ""
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[branch or ""] = fut
        try:
            self.send(req)
            self.stats.requests_sent += 1
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._pending.pop(branch or "", None)

    async def register(self, expires: int = 3600, timeout_s: float = 32.0) -> Registration:
        started = time.perf_counter()
        req = self._register_request(expires)
        try:
            resp = await self.transact(req, timeout_s)
            if resp.status_code in (401, 407):
                header = "WWW-Authenticate" if resp.status_code == 401 else "Proxy-Authenticate"
                challenge = resp.headers.get(header) or ""
                retry = self._register_request(expires)
                name = "Authorization" if resp.status_code == 401 else "Proxy-Authorization"
                retry.headers.add(
                    name, compute_authorization(challenge, "REGISTER", retry.uri, self.device, self.password)
                )
                resp = await self.transact(retry, timeout_s)
        except (TimeoutError, ConnectionError) as exc:
            raise StepError("REGISTER", f"no answer: {exc or 'timeout'}") from exc
        if resp.status_code != 200:
            warning = resp.headers.get("Warning") or ""
            raise StepError("REGISTER", f"{resp.status_code} {resp.reason} {warning}".strip())
        granted = resp.expires or 0
        for c in resp.contacts:
            value = c.params.get("expires")
            if value and value.isdigit():
                granted = int(value)
        return Registration(
            200,
            granted,
            resp.headers.get("Supported") or "",
            round((time.perf_counter() - started) * 1000, 2),
            resp.headers.get("Contact") or "",
        )

    def _register_request(self, expires: int) -> Request:
        req = self._request("REGISTER", f"sip:{self.domain}")
        req.headers.add("Contact", self.contact())
        req.headers.add("Expires", str(expires))
        req.headers.add("Supported", "X-cisco-supports-AR_SK, path, outbound")
        return req

    async def stun_keepalive(self, timeout_s: float = 3.0) -> tuple[str, int] | None:
        """MRA HA (spec §5): a Binding request on the SIP flow; None when E does not answer."""
        msg = binding_request(software="mra-edge-lab")
        fut: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self._stun[msg.transaction_id] = fut
        self._write(msg.serialize(fingerprint=True))
        self.stats.stun_sent += 1
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            return None
        finally:
            self._stun.pop(msg.transaction_id, None)

    def _stun_response(self, data: bytes) -> None:
        try:
            msg = parse_stun(data)
        except StunError:
            return
        fut = self._stun.get(msg.transaction_id)
        if fut is None or fut.done() or msg.message_class != Class.SUCCESS:
            return
        addr = msg.xor_mapped_address
        if addr is not None:
            self.stats.stun_answered += 1
            fut.set_result(addr)
