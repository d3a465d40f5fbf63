"""Expressway-C's HTTP allow list, sans-IO (shared/spec/MRA.md §4 "HTTP allow list").

C proxies a remote client's HTTPS request to an internal server only if a rule permits the
scheme, host, port, method and path. This module is pure: rules are values, the list is an
indexed table, `AllowList.check()` is a function of its arguments. No sockets, no clocks.

Choices where the real product is undocumented (documented here, tested in tests/test_allowlist.py):

* Default method set (a rule given no methods): GET, POST, PUT, DELETE, HEAD, i.e. every method a
  rule may name. The real product lets the admin pick "default methods"; allowing the full set keeps
  a bare URL rule useful and a CSV line with an empty HttpMethods column meaningful.
* Request methods are compared case-sensitively (RFC 9110 §9.1): `get` is not `GET`. Rule methods
  are upper-cased when the rule is built, since admins type them.
* Prefix match is a plain string prefix of the normalised path. A rule path ending in "/" therefore
  only ever matches on a segment boundary (`/cucm-uds/` matches `/cucm-uds/user/alice`, not
  `/cucm-uds-evil`); a rule path without one also matches longer names (`/foo` matches `/foobar`),
  which is how the real list behaves.
* Path normalisation never resolves anything: it decodes percent-encoded *unreserved* characters
  (RFC 3986 §2.3) and upper-cases the hex of the rest, then **blocks** (with a reason) encoded
  slash/backslash/control bytes, double encoding (`%25xx`), invalid UTF-8 in escapes (overlong
  `%c0%ae`), raw backslashes, dot segments (`.`, `..`, also `%2e%2e` and Tomcat's `..;`) and empty
  interior segments (`//`). Blocking rather than collapsing `//` keeps the path we matched identical
  to the path the backend sees; `Decision.path` is that path, for the proxy to forward.
* The query string and fragment are ignored for matching.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443}
KNOWN_METHODS: tuple[str, ...] = ("GET", "POST", "PUT", "DELETE", "HEAD")
"""The methods a rule may name (the real product's checkboxes), in display order."""
DEFAULT_METHODS: frozenset[str] = frozenset(KNOWN_METHODS)
MATCH_TYPES: tuple[str, ...] = ("exact", "prefix")
MAX_PATH_CHARS = 8192
"""Bound on the request target we look at; longer ones are blocked, keeping check() O(bounded)."""

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# RFC 3986 pchar plus "/" and "%": anything else (space, quotes, "\", "^", "{", non-ASCII...) is refused.
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DOUBLE_PCT = re.compile(r"%25[0-9A-Fa-f]{2}")
_URL = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<authority>[^/?#]*)(?P<path>[^?#]*)(?P<rest>.*)"
)
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_\-]{0,61}[a-z0-9_])?")


class RuleError(ValueError):
    """A rule that cannot be built: which field is wrong and why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class PathBlocked(ValueError):
    """A request path that is refused before any rule is consulted (a normalisation trick)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _decode_escape(match: re.Match[str]) -> str:
    byte = int(match.group(1), 16)
    if byte in (0x2F, 0x5C):
        raise PathBlocked(f"encoded {'slash' if byte == 0x2F else 'backslash'} {match.group(0)}")
    if byte < 0x20 or byte == 0x7F:
        raise PathBlocked(f"encoded control character {match.group(0)}")
    char = chr(byte)
    return char if char in _UNRESERVED else f"%{byte:02X}"


def normalise_path(raw_target: str) -> str:
    """The path of a request target as the matcher sees it, or PathBlocked(reason).

    `raw_target` is the origin-form request target (path and optional query), as received.
    """
    if len(raw_target) > MAX_PATH_CHARS:
        raise PathBlocked(f"request target longer than {MAX_PATH_CHARS} characters")
    path = raw_target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        raise PathBlocked("path must start with '/'")
    if "\\" in path:
        raise PathBlocked("backslash in path")
    if _PATH_CHARS.fullmatch(path) is None:
        raise PathBlocked("invalid character in path")
    if "%" in path:
        path = _decode_path(path)
    _check_segments(path)
    return path


def _decode_path(path: str) -> str:
    if _BAD_PCT.search(path):
        raise PathBlocked("malformed percent-encoding")
    if _DOUBLE_PCT.search(path):
        raise PathBlocked("double percent-encoding (%25xx)")
    decoded = _PCT.sub(_decode_escape, path)
    # Escapes of non-ASCII bytes must spell valid UTF-8: overlong forms such as %c0%ae ('.') and
    # %c0%af ('/') are how legacy servers were tricked into seeing dot segments and slashes.
    raw = bytes(int(h, 16) for h in _PCT.findall(decoded))
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PathBlocked("invalid UTF-8 in percent-encoding") from None
    return decoded


def _check_segments(path: str) -> None:
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        # Tomcat (UCM, IM&P, Unity) drops ";params" before resolving, so "..;x" is "..".
        bare = segment.split(";", 1)[0]
        if bare in (".", ".."):
            raise PathBlocked(f"dot segment {segment!r} in path")
        if not segment and i < len(segments) - 1:
            raise PathBlocked("empty path segment ('//')")


def normalise_host(host: str) -> str:
    """Case-folded host without IPv6 brackets or one trailing dot (for index keys)."""
    host = host.lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return host
    return host[:-1] if host.endswith(".") else host


def _parse_host(text: str) -> str:
    if not text:
        raise RuleError("url", "empty host")
    if text.startswith("["):
        try:
            return str(ipaddress.IPv6Address(text.strip("[]")))
        except ValueError:
            raise RuleError("url", f"bad IPv6 host {text!r}") from None
    host = normalise_host(text)
    if not host:
        raise RuleError("url", "empty host")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise RuleError("url", f"bad host {text!r}")
    return host


def _split_authority(authority: str) -> tuple[str, str | None]:
    if "@" in authority:
        raise RuleError("url", "user info is not allowed in a rule URL")
    if authority.startswith("["):
        host, _, tail = authority.partition("]")
        if tail and not tail.startswith(":"):
            raise RuleError("url", f"bad host {authority!r}")
        return host + "]", (tail[1:] if tail else None)
    host, sep, port = authority.rpartition(":")
    return (host, port) if sep else (authority, None)


def _parse_port(text: str | None, scheme: str) -> int:
    if text is None:
        return DEFAULT_PORTS[scheme]
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise RuleError("url", f"port must be 1-65535, got {text!r}")
    return int(text)


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class Rule:
    """One inbound allow-list rule. Built from text and validated at construction (RuleError).

    After construction `url` is canonical (`scheme://host:port/path`, lower-case host, explicit
    port), `methods` upper-case (empty → DEFAULT_METHODS) and `match` lower-case, so two rules
    that mean the same thing compare equal and CSV export/import round-trips.
    """

    url: str
    methods: frozenset[str] = frozenset()
    match: str = "prefix"
    deployment: str = ""
    description: str = ""
    automatic: bool = False
    origin: str = ""
    """For automatic rules: which discovered node made it (`ucm:ucm1.example.com`)."""
    scheme: str = field(init=False, compare=False, repr=False)
    host: str = field(init=False, compare=False, repr=False)
    port: int = field(init=False, compare=False, repr=False)
    path: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        m = _URL.fullmatch(self.url)
        if m is None:
            raise RuleError("url", f"not an http(s)://host[:port][/path] URL: {self.url[:80]!r}")
        scheme = m["scheme"].lower()
        if scheme not in DEFAULT_PORTS:
            raise RuleError("url", f"scheme must be http or https, got {m['scheme']!r}")
        if m["rest"].startswith("?"):
            raise RuleError("url", "a rule URL may not have a query")
        if m["rest"]:
            raise RuleError("url", "a rule URL may not have a fragment")
        host_text, port_text = _split_authority(m["authority"])
        host = _parse_host(host_text)
        port = _parse_port(port_text, scheme)
        try:
            path = normalise_path(m["path"] or "/")
        except PathBlocked as exc:
            raise RuleError("url", f"path: {exc.reason}") from None
        methods = frozenset(str(x).strip().upper() for x in self.methods) or DEFAULT_METHODS
        unknown = sorted(methods - DEFAULT_METHODS)
        if unknown:
            raise RuleError("methods", f"unknown method {unknown[0]!r} (allowed: {', '.join(KNOWN_METHODS)})")
        match = str(self.match).strip().lower()
        if match not in MATCH_TYPES:
            raise RuleError("match", f"match must be exact or prefix, got {self.match!r}")
        for name, value in (
            ("url", f"{scheme}://{_format_host(host)}:{port}{path}"),
            ("methods", methods),
            ("match", match),
            ("deployment", self.deployment.strip()),
            ("scheme", scheme),
            ("host", host),
            ("port", port),
            ("path", path),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def parse(
        cls,
        url: str,
        methods: Iterable[str] = (),
        match: str = "prefix",
        deployment: str = "",
        description: str = "",
    ) -> Rule:
        """An editable rule from configuration or form text (any iterable of methods)."""
        return cls(url, frozenset(methods), match, deployment, description)

    def method_list(self) -> list[str]:
        """Methods in display order (for CSV export and status pages)."""
        return [m for m in KNOWN_METHODS if m in self.methods]


@dataclass(frozen=True)
class Decision:
    """The answer to one request: allowed or not, by which rule, and why (for logs and 403 bodies)."""

    allowed: bool
    rule_id: str | None
    reason: str
    path: str = ""
    """The normalised path that was matched; the proxy forwards this, not the raw one."""


@dataclass(frozen=True)
class Entry:
    rule_id: str
    rule: Rule


# ---- automatic rules ---------------------------------------------------------------------------


UcmNodeRef = tuple[str] | tuple[str, int, int, int]
"""`(fqdn,)` or `(fqdn, https_port, tftp_http_port, tftp_https_port)`; defaults 8443, 6970, 6972."""
ImpNodeRef = tuple[str] | tuple[str, int] | tuple[str, int, int]
"""`(fqdn[, https_port[, file_transfer_port]])`; defaults 8443 and 7336 (managed file transfer)."""
CucNodeRef = tuple[str] | tuple[str, int] | tuple[str, int, int]
"""`(fqdn[, https_port...])`: a /vmrest/ rule per port given; `(fqdn,)` means 443 and 8443."""


def automatic_rules(
    ucm_nodes: Iterable[UcmNodeRef] = (),
    imp_nodes: Iterable[ImpNodeRef] = (),
    cuc_nodes: Iterable[CucNodeRef] = (),
) -> list[Rule]:
    """The read-only inbound rules C adds for every discovered node (spec §4).

    UCM: UDS (`/cucm-uds/`, GET) and OAuth (`/ssp/oauth/`, GET+POST) on HTTPS, and TFTP
    configuration files over HTTP and HTTPS (`/`, GET). AXL is deliberately absent: MRA
    clients never use it, and the real product does not open it. IM&P: EPAS SOAP
    (`/EPASSoap/`, POST) and managed file transfer (`/`, GET+POST). Unity: `/vmrest/`.
    """
    rules: list[Rule] = []

    def add(origin: str, url: str, *methods: str) -> None:
        rules.append(Rule(url, frozenset(methods), "prefix", automatic=True, origin=origin))

    for ucm in ucm_nodes:
        fqdn, https, tftp_http, tftp_https = ucm if len(ucm) == 4 else (ucm[0], 8443, 6970, 6972)
        o, h = f"ucm:{fqdn}", _format_host(fqdn)
        add(o, f"https://{h}:{https}/cucm-uds/", "GET")
        add(o, f"https://{h}:{https}/ssp/oauth/", "GET", "POST")
        add(o, f"http://{h}:{tftp_http}/", "GET")
        add(o, f"https://{h}:{tftp_https}/", "GET")
    for imp in imp_nodes:
        fqdn, *ports = imp
        https = ports[0] if ports else 8443
        mft = ports[1] if len(ports) > 1 else 7336
        o, h = f"imp:{fqdn}", _format_host(fqdn)
        add(o, f"https://{h}:{https}/EPASSoap/", "POST")
        add(o, f"https://{h}:{mft}/", "GET", "POST")
    for cuc in cuc_nodes:
        fqdn, *ports = cuc
        for port in ports or (443, 8443):
            add(f"cuc:{fqdn}", f"https://{_format_host(fqdn)}:{port}/vmrest/", "GET", "POST", "PUT", "DELETE")
    return rules


def _automatic_id(rule: Rule) -> str:
    # Content-derived so the same node gets the same ids after every "refresh servers".
    key = f"{rule.url} {','.join(rule.method_list())} {rule.match} {rule.deployment}"
    return "auto-" + hashlib.sha256(key.encode()).hexdigest()[:12]


# ---- the list ----------------------------------------------------------------------------------

_Key = tuple[str, str, int]


class _Bucket:
    """All rules of one (scheme, host, port), indexed by path."""

    def __init__(self) -> None:
        self.exact: dict[str, list[Entry]] = {}
        self.prefix: dict[str, list[Entry]] = {}
        self._lengths: list[int] | None = []

    def add(self, entry: Entry) -> None:
        table = self.exact if entry.rule.match == "exact" else self.prefix
        table.setdefault(entry.rule.path, []).append(entry)
        self._lengths = None

    def remove(self, entry: Entry) -> None:
        table = self.exact if entry.rule.match == "exact" else self.prefix
        table[entry.rule.path].remove(entry)
        if not table[entry.rule.path]:
            del table[entry.rule.path]
        self._lengths = None

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefix)

    def candidates(self, path: str) -> Iterator[Entry]:
        """Matching-path entries, most specific first: exact, then longest prefix first."""
        yield from self.exact.get(path, ())
        if self._lengths is None:
            self._lengths = sorted({len(p) for p in self.prefix}, reverse=True)
        for n in self._lengths:
            if n <= len(path):
                yield from self.prefix.get(path[:n], ())


class AllowList:
    """Automatic (read-only) plus editable rules, indexed by (scheme, host, port).

    A check costs one dict lookup for the host, one per distinct prefix length on that host,
    and a scan of the matching path's few rules: independent of the total number of rules.
    """

    def __init__(self, automatic: Iterable[Rule] = (), editable: Iterable[Rule] = ()) -> None:
        self._entries: dict[str, Entry] = {}
        self._index: dict[_Key, _Bucket] = {}
        self._ids = itertools.count(1)
        self.set_automatic(automatic)
        for rule in editable:
            self.add(rule)

    # -- editing --

    def set_automatic(self, rules: Iterable[Rule]) -> None:
        """Replace the automatic rules (after discovery / "refresh servers")."""
        for entry in self.automatic():
            self._unlink(entry)
        for rule in rules:
            if not rule.automatic:
                raise ValueError(f"not an automatic rule: {rule.url}")
            self._link(Entry(_automatic_id(rule), rule))

    def add(self, rule: Rule, rule_id: str | None = None) -> str:
        """Add an editable rule; returns its id (`rule-<n>`, never reused)."""
        if rule.automatic:
            raise ValueError("automatic rules are set with set_automatic()")
        if rule_id is None:
            rule_id = f"rule-{next(self._ids)}"
            while rule_id in self._entries:
                rule_id = f"rule-{next(self._ids)}"
        elif rule_id in self._entries:
            raise ValueError(f"duplicate rule id {rule_id!r}")
        self._link(Entry(rule_id, rule))
        return rule_id

    def remove(self, rule_id: str) -> Rule:
        """Remove an editable rule by id. KeyError if unknown; ValueError if automatic."""
        entry = self._entries[rule_id]
        if entry.rule.automatic:
            raise ValueError(f"{rule_id} is an automatic rule and cannot be removed")
        self._unlink(entry)
        return entry.rule

    def replace_editable(self, rules: Iterable[Rule]) -> list[str]:
        """Replace every editable rule at once (CSV upload); returns the new ids."""
        new = list(rules)
        if any(r.automatic for r in new):
            raise ValueError("automatic rules are set with set_automatic()")
        for entry in self.editable():
            self._unlink(entry)
        return [self.add(rule) for rule in new]

    def _link(self, entry: Entry) -> None:
        self._entries[entry.rule_id] = entry
        key = (entry.rule.scheme, entry.rule.host, entry.rule.port)
        self._index.setdefault(key, _Bucket()).add(entry)

    def _unlink(self, entry: Entry) -> None:
        del self._entries[entry.rule_id]
        key = (entry.rule.scheme, entry.rule.host, entry.rule.port)
        self._index[key].remove(entry)
        if not self._index[key]:
            del self._index[key]

    # -- reading --

    def entries(self) -> list[Entry]:
        """Automatic rules first, then editable ones in insertion order."""
        return self.automatic() + self.editable()

    def automatic(self) -> list[Entry]:
        return [e for e in self._entries.values() if e.rule.automatic]

    def editable(self) -> list[Entry]:
        return [e for e in self._entries.values() if not e.rule.automatic]

    def rules(self) -> list[Rule]:
        return [e.rule for e in self.entries()]

    def editable_rules(self) -> list[Rule]:
        return [e.rule for e in self.editable()]

    def get(self, rule_id: str) -> Rule:
        return self._entries[rule_id].rule

    def __len__(self) -> int:
        return len(self._entries)

    # -- matching --

    def check(
        self, scheme: str, host: str, port: int, method: str, raw_path: str, deployment: str = ""
    ) -> Decision:
        """May a request for `scheme://host:port<raw_path>` with `method` be proxied?"""
        scheme, host = scheme.lower(), normalise_host(host)
        target = f"{scheme}://{_format_host(host)}:{port}"
        bucket = self._index.get((scheme, host, port))
        if bucket is None:
            return Decision(False, None, f"no rule for {target}")
        try:
            path = normalise_path(raw_path)
        except PathBlocked as exc:
            return Decision(False, None, f"blocked path: {exc.reason}")
        near_miss: str | None = None
        for entry in bucket.candidates(path):
            rule = entry.rule
            if rule.deployment and rule.deployment != deployment:
                near_miss = near_miss or f"{entry.rule_id} applies to deployment {rule.deployment!r} only"
            elif method not in rule.methods:
                near_miss = near_miss or f"method {method!r} not allowed by {entry.rule_id}"
            else:
                return Decision(
                    True, entry.rule_id, f"allowed by {entry.rule_id} ({rule.match} {rule.url})", path
                )
        return Decision(False, None, near_miss or f"no rule for path {path!r} on {target}", path)
