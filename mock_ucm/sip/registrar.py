"""Registrar of the mock Unified CM (RFC 3261 §10.3, RFC 3327 Path; spec shared/spec/MRA.md §5).

Bindings are keyed by (user, device): one live Contact per device, as UCM does for its phones and
Jabber softphones. The device comes from `+u.sip!devicename.ccm.cisco.com` (else `+sip.instance`,
else the contact URI). The Contact header value is stored byte-exact, `orig-hostport` and every
MRA marker included, because UCM later sends INVITE/NOTIFY/OPTIONS to exactly that URI (i.e. to
Expressway-C, which maps it back to the client). Every registration is granted 120 s whatever
the client asked (UCM behind MRA answers `Expires: 120`) unless it asked 0 (unregister).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from edge.config import User
from edge.sip.address import NameAddr
from edge.sip.auth import DigestCredentials, DigestVerdict, DigestVerifier
from edge.sip.errors import SipParseError
from edge.sip.headers import split_quoted, unquote
from edge.sip.message import Request, Response, make_response

REGISTRATION_EXPIRES_S = 120
DEFAULT_REQUESTED_EXPIRES_S = 3600  # RFC 3261 §10.2.1.1 when the client says nothing
DEVICE_PARAM = "+u.sip!devicename.ccm.cisco.com"
INSTANCE_PARAM = "+sip.instance"
MRA_HA_PARAM = "x-cisco-mra-ha"
AR_SK = "AR_SK"
AR_SK_SUPPORTED = "X-cisco-supports-AR_SK"
DIGEST_REALM = "ccmsipline"  # the realm real UCM challenges SIP lines with
_EXPIRES_PARAM_RE = re.compile(r";\s*expires\s*=\s*[^;]*", re.IGNORECASE)


@dataclass
class Binding:
    username: str
    aor: str  # the To URI as registered (sip:1001@example.com or sip:alice@example.com)
    device: str
    contact: str  # the Contact header value, byte-exact
    uri: str  # the contact URI text, byte-exact (the Request-URI of requests to this device)
    paths: tuple[str, ...]  # Path header values, top first (RFC 3327): a preloaded Route later
    expires_at: float
    registered_at: float
    mra_ha: bool
    flow: int | None = None

    def remaining_s(self, now: float) -> int:
        return max(0, round(self.expires_at - now))

    def as_dict(self, now: float) -> dict[str, object]:
        return {
            "user": self.username,
            "aor": self.aor,
            "device": self.device,
            "contact": self.contact,
            "path": list(self.paths),
            "expires_in_s": self.remaining_s(now),
            "mra_ha": self.mra_ha,
        }


@dataclass
class RegistrarCounters:
    peak: int = 0
    registrations: int = 0  # new bindings
    refreshes: int = 0
    unregistrations: int = 0
    expirations: int = 0
    failures: int = 0  # 400/403/404 and bad credentials
    challenges: int = 0


@dataclass
class _Contact:
    raw: str
    addr: NameAddr
    device: str
    expires: int


@dataclass
class Registrar:
    """Sans-IO registrar: `handle_register(request, now)` returns the response to send."""

    users: Iterable[User]
    domain: str
    node_name: str
    digest_secret: bytes | None = None
    max_expires_s: int = REGISTRATION_EXPIRES_S
    counters: RegistrarCounters = field(default_factory=RegistrarCounters)

    def __post_init__(self) -> None:
        self._by_name: dict[str, User] = {}
        self._by_dn: dict[str, User] = {}
        for user in self.users:
            self._by_name[user.username.lower()] = user
            self._by_dn[user.dn] = user
        self._bindings: dict[str, dict[str, Binding]] = {}  # username -> device -> binding
        self._count = 0
        self._heap: list[tuple[float, int, str, str]] = []
        self._seq = 0
        self._verifier = (
            DigestVerifier(DIGEST_REALM, self.digest_secret) if self.digest_secret is not None else None
        )

    # -- lookups ---------------------------------------------------------------------------
    def find_user(self, user_part: str | None) -> User | None:
        """A user by DN or username (case-insensitive), as routing and the registrar need."""
        if not user_part:
            return None
        return self._by_dn.get(user_part) or self._by_name.get(user_part.lower())

    def bindings_for(self, user: User | str) -> list[Binding]:
        name = user if isinstance(user, str) else user.username
        return list(self._bindings.get(name, {}).values())

    def bindings(self) -> Iterator[Binding]:
        for devices in self._bindings.values():
            yield from devices.values()

    @property
    def registered(self) -> int:
        return self._count

    # -- timers ----------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        while self._heap:
            when, _, name, device = self._heap[0]
            b = self._bindings.get(name, {}).get(device)
            if b is not None and b.expires_at == when:
                return when
            heapq.heappop(self._heap)  # lazy deletion: refreshed or removed since
        return None

    def handle_timer(self, now: float) -> list[Binding]:
        """Purge bindings whose expiry has passed; returns them."""
        expired: list[Binding] = []
        while (when := self.get_timer()) is not None and when <= now:
            _, _, name, device = heapq.heappop(self._heap)
            b = self._remove(name, device)
            if b is not None:
                expired.append(b)
                self.counters.expirations += 1
        return expired

    # -- REGISTER --------------------------------------------------------------------------
    def handle_register(self, request: Request, now: float, *, flow: int | None = None) -> Response:
        try:
            return self._register(request, now, flow)
        except SipParseError as exc:
            self.counters.failures += 1
            return make_response(request, exc.status_code, exc.reason)

    def _register(self, request: Request, now: float, flow: int | None) -> Response:
        user = self.find_user(request.to.uri.user)
        if user is None:
            return self._reject(request, 404, "Unknown user")
        star = request.contact_is_star
        contacts = [] if star else self._contacts(request)
        for c in contacts:
            if c.device.startswith("dev:") and c.device[4:] not in user.device_names:
                return self._reject(request, 403, "Device not associated")
        if user.digest_auth and self._verifier is not None:
            denied = self._authenticate(request, user, now)
            if denied is not None:
                return denied
        if star:
            if request.expires != 0:
                return self._reject(request, 400, "Contact * needs Expires: 0")
            for b in self.bindings_for(user):
                self._remove(b.username, b.device)
                self.counters.unregistrations += 1
            return make_response(request, 200)
        mra_ha = _wants_ar_sk(request, contacts)
        for c in contacts:
            self._apply(request, user, c, now, flow, mra_ha)
        return self._ok(request, user, now, granted=bool(contacts), mra_ha=mra_ha)

    def _contacts(self, request: Request) -> list[_Contact]:
        header_expires = request.expires
        out: list[_Contact] = []
        for line in request.headers.get_lines("contact"):
            for raw in split_quoted(line, ","):
                raw = raw.strip()
                addr = NameAddr.parse(raw)
                exp_text = addr.params.get("expires")
                if exp_text is not None and not exp_text.isdigit():
                    raise SipParseError(400, "Malformed expires parameter")
                if exp_text is not None:
                    expires = int(exp_text)
                elif header_expires is not None:
                    expires = header_expires
                else:
                    expires = DEFAULT_REQUESTED_EXPIRES_S
                out.append(_Contact(raw, addr, _device_of(addr), expires))
        return out

    def _apply(
        self, request: Request, user: User, c: _Contact, now: float, flow: int | None, mra_ha: bool
    ) -> None:
        devices = self._bindings.setdefault(user.username, {})
        existing = devices.get(c.device)
        if c.expires == 0:
            if existing is not None:
                self._remove(user.username, c.device)
                self.counters.unregistrations += 1
            return
        binding = Binding(
            username=user.username,
            aor=str(request.to.uri),
            device=c.device,
            contact=c.raw,
            uri=_uri_text(c.raw),
            paths=tuple(request.headers.get_all("path")),
            expires_at=now + self.max_expires_s,
            registered_at=existing.registered_at if existing is not None else now,
            mra_ha=mra_ha,
            flow=flow,
        )
        devices[c.device] = binding
        if existing is None:
            self._count += 1
            self.counters.registrations += 1
            self.counters.peak = max(self.counters.peak, self._count)
        else:
            self.counters.refreshes += 1
        self._seq += 1
        heapq.heappush(self._heap, (binding.expires_at, self._seq, user.username, c.device))

    def _remove(self, name: str, device: str) -> Binding | None:
        devices = self._bindings.get(name)
        if devices is None or device not in devices:
            return None
        b = devices.pop(device)
        if not devices:
            del self._bindings[name]
        self._count -= 1
        return b

    def _ok(self, request: Request, user: User, now: float, *, granted: bool, mra_ha: bool) -> Response:
        resp = make_response(request, 200)
        bindings = self.bindings_for(user)
        for b in bindings:
            resp.headers.add("Contact", _with_expires(b.contact, b.remaining_s(now)))
        for path in bindings[-1].paths if granted and bindings else ():
            resp.headers.add("Path", path)  # RFC 3327 §5.3: echo the Path that was stored
        if granted:
            resp.headers.add("Expires", str(self.max_expires_s))
        if mra_ha:
            resp.headers.add("Supported", AR_SK_SUPPORTED)
        return resp

    def _reject(self, request: Request, status: int, text: str) -> Response:
        self.counters.failures += 1
        resp = make_response(request, status)
        resp.headers.add("Warning", f'399 {self.node_name} "{text}"')
        return resp

    def _authenticate(self, request: Request, user: User, now: float) -> Response | None:
        assert self._verifier is not None
        header = request.headers.get("authorization")
        if header is None:
            self.counters.challenges += 1
            return self._challenge(request, now, stale=False)
        try:
            cred_user = DigestCredentials.parse(header).username
        except ValueError:
            return self._reject(request, 400, "Malformed Authorization")
        if cred_user.lower() not in (user.username.lower(), user.dn):
            return self._reject(request, 403, "Authentication username mismatch")
        verdict = self._verifier.verify(header, request.method, now, password=user.password)
        if verdict is DigestVerdict.OK:
            return None
        if verdict is DigestVerdict.STALE:
            self.counters.challenges += 1
            return self._challenge(request, now, stale=True)
        self.counters.failures += 1
        return self._challenge(request, now, stale=False)

    def _challenge(self, request: Request, now: float, *, stale: bool) -> Response:
        assert self._verifier is not None
        resp = make_response(request, 401)
        resp.headers.add("WWW-Authenticate", self._verifier.challenge(now, stale=stale).to_header())
        return resp


def _device_of(addr: NameAddr) -> str:
    """`dev:<name>` for a Cisco device name (checked against the user), else an opaque key."""
    name = addr.params.get(DEVICE_PARAM)
    if name:
        return "dev:" + unquote(name)
    instance = addr.params.get(INSTANCE_PARAM)
    if instance:
        return "instance:" + unquote(instance)
    return "uri:" + str(addr.uri)


def device_name(binding: Binding) -> str:
    """The human device name of a binding (CSFALICE), or its opaque key."""
    return binding.device[4:] if binding.device.startswith("dev:") else binding.device


def _wants_ar_sk(request: Request, contacts: list[_Contact]) -> bool:
    if any(AR_SK.lower() in (c.addr.params.get(MRA_HA_PARAM) or "").lower() for c in contacts):
        return True
    return any(AR_SK.lower() in v.lower() for v in request.headers.get_all("supported"))


def _uri_text(raw: str) -> str:
    """The URI inside a Contact value, as written (no re-serialisation)."""
    lt = raw.find("<")
    if lt >= 0:
        return raw[lt + 1 : raw.index(">", lt)]
    return raw.split(";", 1)[0].strip()


def _with_expires(raw: str, expires: int) -> str:
    """The stored Contact with its expires parameter set (RFC 3261 §10.3 step 8)."""
    gt = raw.find(">")
    cut = gt + 1 if gt >= 0 else (raw.find(";") if ";" in raw else len(raw))
    head, tail = raw[:cut], raw[cut:]
    return f"{head}{_EXPIRES_PARAM_RE.sub('', tail)};expires={expires}"
