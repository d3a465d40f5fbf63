"""SIP header list (RFC 3261 §7.3): ordered, byte-exact, case-insensitive with compact forms.

Each field keeps the name and value exactly as received plus the raw line, so an unmodified
header serializes byte-exact. Folded lines (RFC 3261 §7.3.1) are unfolded on parse: the raw line is
then normalised to ``Name: value`` with each fold replaced by one space (documented limitation).
Structured values parsed from headers are cached per Headers object and dropped on any mutation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, TypeVar

from edge.sip.errors import SipParseError

T = TypeVar("T")

# RFC 3261 §7.3.3 plus the compact forms registered since (RFC 3265, 3515, 3892, 4028, 4474, 3841).
COMPACT_FORMS: dict[str, str] = {
    "i": "call-id",
    "m": "contact",
    "e": "content-encoding",
    "l": "content-length",
    "f": "from",
    "c": "content-type",
    "s": "subject",
    "k": "supported",
    "t": "to",
    "v": "via",
    "o": "event",
    "u": "allow-events",
    "r": "refer-to",
    "b": "referred-by",
    "x": "session-expires",
    "y": "identity",
    "n": "identity-info",
    "a": "accept-contact",
    "d": "request-disposition",
    "j": "reject-contact",
}

# Headers whose grammar is not a comma list (or whose values contain commas, e.g. dates and
# digest credentials), so get_all() must not split them.
_NO_SPLIT = frozenset(
    {
        "www-authenticate",
        "authorization",
        "proxy-authenticate",
        "proxy-authorization",
        "authentication-info",
        "date",
        "retry-after",
        "subject",
        "organization",
        "server",
        "user-agent",
        "call-id",
        "cseq",
        "content-length",
        "max-forwards",
        "expires",
        "min-expires",
        "timestamp",
    }
)

TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")


_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
# RFC 3261 §25.1 uri-parameter values may also hold param-unreserved characters ("[" "]" "/" ":"
# "&" "+" "$"), e.g. `orig-hostport=198.51.100.7:51000` (spec §5) or an IPv6 `maddr`.
_PARAM_VALUE_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~\[\]/:&$]+")
_KEY_CACHE: dict[str, str] = {}
_KEY_CACHE_MAX = 4096  # header names come from the network: keep the memo bounded


def header_key(name: str) -> str:
    """The canonical lookup key: lower-case long form."""
    key = _KEY_CACHE.get(name)
    if key is None:
        low = name.lower()
        key = COMPACT_FORMS.get(low, low)
        if len(_KEY_CACHE) < _KEY_CACHE_MAX:
            _KEY_CACHE[name] = key
    return key


def is_token(s: str) -> bool:
    return _TOKEN_RE.fullmatch(s) is not None


class Field(NamedTuple):
    name: str
    key: str
    value: str
    raw: str | None  # the original line when unmodified, else None


_SPLITTERS = {sep: re.compile(r'"(?:[^"\\]|\\.)*"|<[^>]*>|' + re.escape(sep)) for sep in ",;"}


def split_quoted(value: str, sep: str) -> list[str]:
    """Split on `sep` (',' or ';') outside double quotes (with backslash escapes) and <...>.

    An unbalanced quote or '<' is not diagnosed here; the value parsers that consume the parts
    reject it (RFC 4475 quotbal).
    """
    if sep not in value:
        return [value]
    if '"' not in value and "<" not in value:
        return value.split(sep)
    parts: list[str] = []
    start = 0
    splitter = _SPLITTERS.get(sep) or re.compile(r'"(?:[^"\\]|\\.)*"|<[^>]*>|' + re.escape(sep))
    for m in splitter.finditer(value):
        if m.end() - m.start() == 1 and value[m.start()] == sep:
            parts.append(value[start : m.start()])
            start = m.end()
    parts.append(value[start:])
    return parts


def unquote(value: str) -> str:
    """Decode a quoted-string (RFC 3261 §25.1); a token is returned as is."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner = value[1:-1]
        if "\\" not in inner:
            return inner
        out: list[str] = []
        i = 0
        while i < len(inner):
            if inner[i] == "\\" and i + 1 < len(inner):
                i += 1
            out.append(inner[i])
            i += 1
        return "".join(out)
    return value


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Params:
    """Ordered `;name[=value]` parameters; names case-insensitive, values kept raw (quotes included)."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str | None]] = ()) -> None:
        self._items: list[tuple[str, str | None]] = list(items)

    @classmethod
    def parse(cls, text: str, *, what: str = "parameter") -> Params:
        """Parse the text after the first ';' (LWS allowed around ';' and '=')."""
        items: list[tuple[str, str | None]] = []
        for part in split_quoted(text, ";"):
            name, eq, val = part.partition("=")
            name = name.strip()
            if not is_token(name):
                raise SipParseError(400, f"Malformed {what}")
            if eq:
                v = val.strip()
                if not v or not (_PARAM_VALUE_RE.fullmatch(v) or _is_quoted(v) or _is_bracketed(v)):
                    raise SipParseError(400, f"Malformed {what} value")
                items.append((name, v))
            else:
                items.append((name, None))
        return cls(items)

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(k.lower() == name.lower() for k, _ in self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Params) and self._items == other._items

    def __hash__(self) -> int:
        return hash(tuple(self._items))

    def __repr__(self) -> str:
        return f"Params({self._items!r})"

    def __str__(self) -> str:
        return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self._items)

    def get(self, name: str, default: str | None = None) -> str | None:
        low = name.lower()
        for k, v in self._items:
            if k.lower() == low:
                return v
        return default

    def set(self, name: str, value: str | None) -> None:
        """Replace the value in place (keeping position) or append."""
        low = name.lower()
        for i, (k, _) in enumerate(self._items):
            if k.lower() == low:
                self._items[i] = (k, value)
                return
        self._items.append((name, value))

    def remove(self, name: str) -> None:
        low = name.lower()
        self._items = [(k, v) for k, v in self._items if k.lower() != low]

    def copy(self) -> Params:
        return Params(self._items)


def _is_quoted(v: str) -> bool:
    return len(v) >= 2 and v[0] == '"' and v[-1] == '"'


def _is_bracketed(v: str) -> bool:
    return len(v) >= 2 and v[0] == "[" and v[-1] == "]"


class Headers:
    """Ordered header fields. Mutations keep order; lookups are case-insensitive and compact-aware."""

    __slots__ = ("_cache", "_items")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[Field] = [Field(n, header_key(n), v, None) for n, v in items]
        self._cache: dict[str, Any] = {}

    @classmethod
    def _from_fields(cls, fields: list[Field]) -> Headers:
        h = cls.__new__(cls)
        h._items = fields
        h._cache = {}
        return h

    # -- read ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((f.name, f.value) for f in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = header_key(name)
        return any(f.key == key for f in self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return [(f.name, f.value) for f in self._items] == [(f.name, f.value) for f in other._items]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({list(self)!r})"

    def get(self, name: str, default: str | None = None) -> str | None:
        """The whole value of the first field with this name (not comma-split)."""
        key = header_key(name)
        for f in self._items:
            if f.key == key:
                return f.value
        return default

    def get_lines(self, name: str) -> list[str]:
        """Values of every field with this name, one per header line, unsplit."""
        key = header_key(name)
        return [f.value for f in self._items if f.key == key]

    def get_all(self, name: str) -> list[str]:
        """All values, comma-separated lists split (not inside quotes or <...>)."""
        key = header_key(name)
        out: list[str] = []
        for f in self._items:
            if f.key == key:
                if key in _NO_SPLIT:
                    out.append(f.value)
                else:
                    out.extend(p.strip() for p in split_quoted(f.value, ",") if p.strip())
        return out

    def count(self, name: str) -> int:
        key = header_key(name)
        return sum(1 for f in self._items if f.key == key)

    def fields(self) -> list[Field]:
        return list(self._items)

    def cached(self, key: str, build: Callable[[], T]) -> T:
        """Structured value cache: computed once per key until the headers change."""
        try:
            return self._cache[key]  # type: ignore[no-any-return]
        except KeyError:
            value = self._cache[key] = build()
            return value

    # -- write ---------------------------------------------------------------------------
    def add(self, name: str, value: str) -> None:
        self._items.append(Field(name, header_key(name), value, None))
        self._cache.clear()

    def prepend(self, name: str, value: str) -> None:
        """Insert as the very first field (Via, Record-Route: the newest goes on top)."""
        self._items.insert(0, Field(name, header_key(name), value, None))
        self._cache.clear()

    def insert_before(self, name: str, value: str) -> None:
        """Insert just before the first field of the same name (or append if none)."""
        key = header_key(name)
        for i, f in enumerate(self._items):
            if f.key == key:
                self._items.insert(i, Field(name, key, value, None))
                break
        else:
            self._items.append(Field(name, key, value, None))
        self._cache.clear()

    def replace(self, name: str, value: str) -> None:
        """Set a single field: replaces the first (keeping its position and spelling), drops the rest."""
        key = header_key(name)
        out: list[Field] = []
        done = False
        for f in self._items:
            if f.key == key:
                if not done:
                    out.append(Field(f.name, key, value, None))
                    done = True
            else:
                out.append(f)
        if not done:
            out.append(Field(name, key, value, None))
        self._items = out
        self._cache.clear()

    def remove(self, name: str) -> int:
        key = header_key(name)
        before = len(self._items)
        self._items = [f for f in self._items if f.key != key]
        self._cache.clear()
        return before - len(self._items)

    def remove_first(self, name: str) -> str | None:
        """Remove the first *value* (top Via, top Route): splits a comma-list line if needed."""
        key = header_key(name)
        for i, f in enumerate(self._items):
            if f.key != key:
                continue
            parts = [f.value] if key in _NO_SPLIT else split_quoted(f.value, ",")
            first = parts[0].strip()
            rest = ",".join(parts[1:]).strip()
            if rest:
                self._items[i] = Field(f.name, key, rest, None)
            else:
                del self._items[i]
            self._cache.clear()
            return first
        return None

    def copy(self) -> Headers:
        return Headers._from_fields(list(self._items))

    def lines(self) -> Iterator[str]:
        for f in self._items:
            yield f.raw if f.raw is not None else f"{f.name}: {f.value}"
