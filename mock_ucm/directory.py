"""The mock Unified CM's end-user directory: users, their lines and devices (spec §9).

One immutable snapshot built from the lab configuration. Every lookup is a dict access and every
search a pair of binary searches over a sorted key table, so 100,000 generated users cost a few
hundred milliseconds to index and microseconds to query. No I/O: the HTTP roles (UDS, TFTP,
VMREST) and the SIP registrar read from it.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from edge.config import LabConfig, UcmNode

# Deterministic identifiers: the same device name gives the same pkid in every process and every
# run, so the UCM, Expressway-C and test clients agree without sharing state.
_PKID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "pkid.mra-edge-lab")
_PKID_NAMESPACE_BYTES = _PKID_NAMESPACE.bytes

# Device-name prefix → product model, as Unified CM names them (Jabber device types).
_MODELS_BY_PREFIX: tuple[tuple[str, str], ...] = (
    ("CSF", "Cisco Unified Client Services Framework"),
    ("BOT", "Cisco Dual Mode for Android"),
    ("TCT", "Cisco Dual Mode for iPhone"),
    ("TAB", "Cisco Jabber for Tablet"),
    ("SEP", "Cisco 8865"),
)
_FALLBACK_MODEL = "Third-party SIP Device (Advanced)"

DEFAULT_SEARCH_MAX = 64
"""UDS returns at most this many users per page unless `max` asks for fewer (enterprise default)."""
SEARCH_MAX_LIMIT = 500


def _uuid5(name: str) -> str:
    """`str(uuid.uuid5(_PKID_NAMESPACE, name))` without building UUID objects (4x faster at 100k)."""
    h = hashlib.sha1(_PKID_NAMESPACE_BYTES + name.encode()).hexdigest()
    variant = "89ab"[int(h[16], 16) & 0x3]
    return f"{h[0:8]}-{h[8:12]}-5{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"


def device_pkid(device_name: str) -> str:
    """The pkid Unified CM would show for a device: uuid5 of the upper-cased device name."""
    return _uuid5("device:" + device_name.upper())


def user_pkid(username: str) -> str:
    return _uuid5("user:" + username.lower())


def device_model(device_name: str) -> str:
    upper = device_name.upper()
    for prefix, model in _MODELS_BY_PREFIX:
        if upper.startswith(prefix):
            return model
    return _FALLBACK_MODEL


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    pkid: str
    model: str
    owner: str
    protocol: str = "SIP"


@dataclass(frozen=True, slots=True)
class DirectoryUser:
    username: str
    dn: str
    password: str
    display_name: str
    first_name: str
    last_name: str
    email: str
    device_names: tuple[str, ...]

    @property
    def pkid(self) -> str:
        # Derived on use: 100,000 users are indexed without hashing 200,000 names up front.
        return user_pkid(self.username)

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(
            Device(name=name, pkid=device_pkid(name), model=device_model(name), owner=self.username)
            for name in self.device_names
        )

    def device_by_pkid(self, pkid: str) -> Device | None:
        key = normalise_pkid(pkid)
        for device in self.devices:
            if device.pkid == key:
                return device
        return None


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """One Unified CM node as UDS `servers` and TFTP configuration files describe it."""

    name: str
    fqdn: str
    address: str
    https_port: int
    sip_tcp_port: int
    sip_tls_port: int
    tftp_http_port: int
    tftp_https_port: int

    @classmethod
    def from_config(cls, node: UcmNode) -> ClusterNode:
        return cls(
            name=node.name,
            fqdn=node.fqdn,
            address=node.address,
            https_port=node.https_port,
            sip_tcp_port=node.sip_tcp_port,
            sip_tls_port=node.sip_tls_port,
            tftp_http_port=node.tftp_http_port,
            tftp_https_port=node.tftp_https_port,
        )


@dataclass(frozen=True, slots=True)
class SearchResult:
    total: int
    """Every match (the UDS `totalCount`), not only this page."""
    start: int
    users: tuple[DirectoryUser, ...]


def normalise_pkid(pkid: str) -> str:
    return pkid.strip().strip("{}").lower()


def _split_name(display_name: str, username: str) -> tuple[str, str, str]:
    display = display_name.strip() or username
    first, _, last = display.partition(" ")
    return display, first, last.strip()


@dataclass
class _PrefixIndex:
    """Sorted (key, row) pairs: a prefix query is two bisects, O(log n + matches)."""

    keys: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, pairs: Iterable[tuple[str, int]]) -> _PrefixIndex:
        ordered = sorted(pairs)
        return cls([k for k, _ in ordered], [r for _, r in ordered])

    def prefix(self, text: str) -> list[int]:
        lo = bisect.bisect_left(self.keys, text)
        hi = bisect.bisect_left(self.keys, text + "\U0010ffff")
        return self.rows[lo:hi]


class Directory:
    """Users of one Unified CM cluster. Lookups are case-insensitive on user ids and device names."""

    def __init__(
        self,
        users: Sequence[DirectoryUser],
        *,
        cluster_name: str,
        nodes: Sequence[ClusterNode],
        domain: str,
    ) -> None:
        self.cluster_name = cluster_name
        """The home cluster's name as UDS reports it: the publisher's FQDN."""
        self.nodes: tuple[ClusterNode, ...] = tuple(nodes)
        self.domain = domain
        # Rows in username order, so a search result sorted by row is sorted by username.
        self._users: tuple[DirectoryUser, ...] = tuple(sorted(users, key=lambda u: u.username.lower()))
        self._by_name = {u.username.lower(): u for u in self._users}
        if len(self._by_name) != len(self._users):
            raise ValueError("directory: user ids must be unique (case-insensitive)")
        self._by_dn = {u.dn: u for u in self._users}
        self._by_email = {u.email.lower(): u for u in self._users}
        self._devices = {name.upper(): u for u in self._users for name in u.device_names}
        self._device_pkids: dict[str, str] | None = None  # pkid → device name, built on first use
        rows = list(enumerate(self._users))
        self._index = {
            "username": _PrefixIndex.build((u.username.lower(), i) for i, u in rows),
            "first": _PrefixIndex.build((u.first_name.lower(), i) for i, u in rows),
            "last": _PrefixIndex.build((u.last_name.lower(), i) for i, u in rows),
            "display": _PrefixIndex.build((u.display_name.lower(), i) for i, u in rows),
            "number": _PrefixIndex.build((u.dn, i) for i, u in rows),
            "email": _PrefixIndex.build((u.email.lower(), i) for i, u in rows),
        }

    @classmethod
    def from_config(cls, config: LabConfig) -> Directory:
        domain = config.lab.domain
        users = []
        for u in config.all_users():
            display, first, last = _split_name(u.display_name, u.username)
            users.append(
                DirectoryUser(
                    username=u.username,
                    dn=u.dn,
                    password=u.password,
                    display_name=display,
                    first_name=first,
                    last_name=last,
                    email=f"{u.username}@{domain}",
                    device_names=tuple(u.device_names),
                )
            )
        return cls(
            users,
            cluster_name=config.ucm[0].fqdn,
            nodes=[ClusterNode.from_config(n) for n in config.ucm],
            domain=domain,
        )

    def __len__(self) -> int:
        return len(self._users)

    def users(self) -> tuple[DirectoryUser, ...]:
        """Every user in user-id order."""
        return self._users

    def get_user(self, username: str) -> DirectoryUser | None:
        return self._by_name.get(username.lower())

    def get_user_by_email(self, email: str) -> DirectoryUser | None:
        return self._by_email.get(email.lower())

    def get_user_by_dn(self, dn: str) -> DirectoryUser | None:
        return self._by_dn.get(dn)

    def get_device(self, name: str) -> tuple[DirectoryUser, Device] | None:
        user = self._devices.get(name.upper())
        if user is None:
            return None
        device = next(d for d in user.devices if d.name.upper() == name.upper())
        return user, device

    def get_device_by_pkid(self, pkid: str) -> tuple[DirectoryUser, Device] | None:
        if self._device_pkids is None:
            self._device_pkids = {device_pkid(name): name for name in self._devices}
        name = self._device_pkids.get(normalise_pkid(pkid))
        return self.get_device(name) if name is not None else None

    def authenticate(self, username: str, password: str) -> bool:
        """Constant-time password check; an unknown user costs the same as a wrong password."""
        user = self._by_name.get(username.lower())
        expected = user.password if user is not None else "\x00unknown-user"
        ok = hmac.compare_digest(expected.encode(), password.encode())
        return ok and user is not None

    def search(
        self,
        *,
        name: str | None = None,
        first: str | None = None,
        last: str | None = None,
        number: str | None = None,
        username: str | None = None,
        email: str | None = None,
        display: str | None = None,
        start: int = 0,
        max_results: int = DEFAULT_SEARCH_MAX,
    ) -> SearchResult:
        """UDS `users` semantics: case-insensitive prefix filters, all given filters must match.

        `name` matches the user id, first, last or display name. No filter lists everyone.
        """
        start = max(0, start)
        max_results = max(0, min(max_results, SEARCH_MAX_LIMIT))
        selected: set[int] | None = None

        def narrow(rows: Iterable[int]) -> None:
            nonlocal selected
            found = set(rows)
            selected = found if selected is None else selected & found

        if name is not None:
            key = name.lower()
            rows: set[int] = set()
            for index in ("username", "first", "last", "display"):
                rows.update(self._index[index].prefix(key))
            narrow(rows)
        for index, value in (
            ("first", first),
            ("last", last),
            ("username", username),
            ("email", email),
            ("display", display),
        ):
            if value is not None:
                narrow(self._index[index].prefix(value.lower()))
        if number is not None:
            narrow(self._index["number"].prefix(number))
        if selected is None:
            page = self._users[start : start + max_results]
            return SearchResult(total=len(self._users), start=start, users=page)
        ordered = sorted(selected)
        page = tuple(self._users[i] for i in ordered[start : start + max_results])
        return SearchResult(total=len(ordered), start=start, users=page)
