"""Registrar of the mock Unified CM (RFC 3261 §10.3, RFC 3327 Path; spec shared/spec/MRA.md §5).

Bindings are keyed by (user, device): one live Contact per device, as UCM does for its phones and
Jabber softphones. The device comes from `+u.sip!devicename.ccm.cisco.com` (else `+sip.instance`,
else the contact URI). The Contact header value is stored byte-exact, `orig-hostport` and every
MRA marker included, because UCM later sends INVITE/NOTIFY/OPTIONS to exactly that URI (i.e. to
Expressway-C, which maps it back to the client). Every registration is granted 120 s whatever
the client asked (UCM behind MRA answers `Expires: 120`) unless it asked 0 (unregister).

Two front ends share the state and every decision taken here: `handle_register` (a parsed
Request, any shape) and `fastpath.RegisterFastPath` (the usual REGISTER, from its bytes). Both
parse a Contact or To value with `contact_info` / `to_info` (memoized: a refresh carries the
same values again) and take their 200's extra header lines from `ok_headers`.

Expiry: one heap entry per binding, not one per refresh. A refresh only moves `expires_at`; when
an entry comes up whose binding was refreshed since, it is pushed again at the new deadline
(lazy rescheduling), so a refresh costs no heap operation and the heap stays O(bindings).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from edge.config import User
from edge.sip.address import NameAddr, split_name_addr
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
_MEMO_MAX = 4096  # parsed To/Contact values kept; the text comes from the network, so bounded


@dataclass(slots=True)
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
    # `contact` without its expires parameter: a 200 lists it with `;expires=<left>` appended
    # (RFC 3261 §10.3 step 8), kept so no refresh has to cut it out again.
    contact_base: str = ""

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


@dataclass(frozen=True, slots=True)
class ContactInfo:
    """What the registrar needs of one Contact value; a pure function of its text."""

    raw: str  # the value, stripped: what is stored byte-exact
    device: str  # `dev:<name>`, `instance:<urn>` or `uri:<uri>`
    uri: str  # the URI inside, as written
    base: str  # raw without any expires parameter
    expires: int | None  # its expires parameter
    ar_sk: bool  # x-cisco-mra-ha asks for AR_SK


@dataclass(frozen=True, slots=True)
class ToInfo:
    user: str | None  # the user part of the To URI (a DN or a username)
    aor: str  # the URI as the codec writes it back (str(Uri))
    tagged: bool  # a To tag: in-dialog, not a registration


_CONTACTS: dict[str, ContactInfo] = {}
_TOS: dict[str, ToInfo] = {}


def contact_info(raw: str) -> ContactInfo:
    """Parse one Contact value (already split off its list and stripped); raises SipParseError."""
    info = _CONTACTS.get(raw)
    if info is None:
        addr = NameAddr.parse(raw)
        exp_text = addr.params.get("expires")
        if exp_text is not None and not exp_text.isdigit():
            raise SipParseError(400, "Malformed expires parameter")
        mra = addr.params.get(MRA_HA_PARAM) or ""
        uri, base = _split_contact(raw)
        info = ContactInfo(
            raw,
            _device_of(addr),
            uri,
            base,
            int(exp_text) if exp_text is not None else None,
            AR_SK.lower() in mra.lower(),
        )
        if len(_CONTACTS) >= _MEMO_MAX:
            _CONTACTS.clear()
        _CONTACTS[raw] = info
    return info


def to_info(value: str) -> ToInfo:
    """Parse a To value as the registrar reads it; raises SipParseError."""
    info = _TOS.get(value)
    if info is None:
        addr = NameAddr.parse(value)
        # any `tag` parameter, valued or not: make_response then adds none (see _has_tag)
        info = ToInfo(addr.uri.user, str(addr.uri), "tag" in addr.params)
        if len(_TOS) >= _MEMO_MAX:
            _TOS.clear()
        _TOS[value] = info
    return info


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
        self._heap: list[tuple[float, int, Binding]] = []  # one entry per binding (see module doc)
        self._seq = 0
        self._devices: dict[str, frozenset[str]] = {}  # username -> device names (filled on use)
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

    def device_allowed(self, user: User, device: str) -> bool:
        """A Cisco device name (`dev:`) must be one of the user's devices; other keys are free."""
        if not device.startswith("dev:"):
            return True
        names = self._devices.get(user.username)
        if names is None:
            names = self._devices[user.username] = frozenset(user.device_names)
        return device[4:] in names

    def needs_auth(self, user: User) -> bool:
        return user.digest_auth and self._verifier is not None

    # -- timers ----------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        heap = self._heap
        while heap:
            when, _, b = heap[0]
            live = self._live(b)
            if live and b.expires_at == when:
                return when
            heapq.heappop(heap)
            if live and b.expires_at > when:  # refreshed since it was pushed: reschedule
                self._push(b)
            # else removed, or an earlier entry was pushed when its deadline moved earlier
        return None

    def handle_timer(self, now: float) -> list[Binding]:
        """Purge bindings whose expiry has passed; returns them."""
        expired: list[Binding] = []
        while (when := self.get_timer()) is not None and when <= now:
            _, _, b = heapq.heappop(self._heap)
            self._remove(b.username, b.device)
            expired.append(b)
            self.counters.expirations += 1
        return expired

    def _push(self, b: Binding) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (b.expires_at, self._seq, b))

    def _live(self, b: Binding) -> bool:
        devices = self._bindings.get(b.username)
        return devices is not None and devices.get(b.device) is b

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
        for c, _ in contacts:
            if not self.device_allowed(user, c.device):
                return self._reject(request, 403, "Device not associated")
        if self.needs_auth(user):
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
        mra_ha = any(c.ar_sk for c, _ in contacts) or any(
            AR_SK.lower() in v.lower() for v in request.headers.get_all("supported")
        )
        aor = str(request.to.uri)
        paths = tuple(request.headers.get_all("path"))
        for c, expires in contacts:
            self.apply(user, aor, c, expires, paths, now, flow, mra_ha)
        resp = make_response(request, 200)
        for name, value in self.ok_headers(user, now, granted=bool(contacts), mra_ha=mra_ha):
            resp.headers.add(name, value)
        return resp

    def _contacts(self, request: Request) -> list[tuple[ContactInfo, int]]:
        """Each Contact with the expiry it asks for (its parameter, else Expires, else 3600)."""
        header_expires = request.expires
        default = DEFAULT_REQUESTED_EXPIRES_S if header_expires is None else header_expires
        out: list[tuple[ContactInfo, int]] = []
        for line in request.headers.get_lines("contact"):
            for raw in split_quoted(line, ","):
                c = contact_info(raw.strip())
                out.append((c, default if c.expires is None else c.expires))
        return out

    def apply(
        self,
        user: User,
        aor: str,
        c: ContactInfo,
        expires: int,
        paths: tuple[str, ...],
        now: float,
        flow: int | None,
        mra_ha: bool,
    ) -> None:
        """Add, refresh (in place: O(1), no heap work) or remove (`expires == 0`) one binding."""
        name = user.username
        devices = self._bindings.get(name)
        existing = devices.get(c.device) if devices is not None else None
        if expires == 0:
            if existing is not None:
                self._remove(name, c.device)
                self.counters.unregistrations += 1
            return
        expires_at = now + self.max_expires_s
        if existing is None:
            b = Binding(name, aor, c.device, c.raw, c.uri, paths, expires_at, now, mra_ha, flow, c.base)
            if devices is None:
                devices = self._bindings[name] = {}
            devices[c.device] = b
            self._count += 1
            counters = self.counters
            counters.registrations += 1
            if self._count > counters.peak:
                counters.peak = self._count
            self._push(b)
            return
        self.counters.refreshes += 1
        if existing.contact != c.raw:
            existing.contact = c.raw
            existing.uri = c.uri
            existing.contact_base = c.base
        existing.aor = aor
        existing.paths = paths
        existing.mra_ha = mra_ha
        existing.flow = flow
        if expires_at < existing.expires_at:  # only if the clock or the grant went backwards
            existing.expires_at = expires_at
            self._push(existing)
        else:
            existing.expires_at = expires_at

    def _remove(self, name: str, device: str) -> Binding | None:
        devices = self._bindings.get(name)
        if devices is None or device not in devices:
            return None
        b = devices.pop(device)
        if not devices:
            del self._bindings[name]
        self._count -= 1
        return b

    def ok_headers(self, user: User, now: float, *, granted: bool, mra_ha: bool) -> list[tuple[str, str]]:
        """The header fields a 200 to a REGISTER adds after the copied Via/From/To/Call-ID/CSeq:
        every current binding with its time left (§10.3 step 8), the stored Path (RFC 3327
        §5.3), the grant, and the MRA HA marker (spec §5)."""
        out: list[tuple[str, str]] = []
        devices = self._bindings.get(user.username)
        if devices:
            for b in devices.values():
                out.append(("Contact", f"{b.contact_base};expires={b.remaining_s(now)}"))
            if granted:
                for path in next(reversed(devices.values())).paths:
                    out.append(("Path", path))
        if granted:
            out.append(("Expires", str(self.max_expires_s)))
        if mra_ha:
            out.append(("Supported", AR_SK_SUPPORTED))
        return out

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


def _split_contact(raw: str) -> tuple[str, str]:
    """The URI inside a Contact value as written (no re-serialisation), and the value without
    its expires parameter (the 200 sets its own, §10.3 step 8). A quoted display name may hold
    '<' or '>' (RFC 3261 §25.1), hence split_name_addr rather than a plain find."""
    pre, uri, post = split_name_addr(raw)
    if pre:  # name-addr: post is ">" and the header parameters
        return uri, pre + uri + ">" + _EXPIRES_PARAM_RE.sub("", post[1:])
    cut = raw.find(";")  # addr-spec: parameters after the first ';' are header parameters
    if cut < 0:
        return raw.strip(), raw
    return raw[:cut].strip(), raw[:cut] + _EXPIRES_PARAM_RE.sub("", raw[cut:])
