"""SIP header list (RFC 3261 §7.3): ordered, byte-exact, case-insensitive with compact forms.

A parsed header section keeps the bytes it came from. Each field knows its canonical key at once
(lookups are a C-level scan of the key list); its name and value are cut out of the line on first
use. Serializing splices: runs of fields that were not changed are copied as slices of the
received bytes, and only added or changed lines are encoded (`encode()`), so everything a hop did
not touch, folded lines included, passes through byte-exact.

Structured values parsed from headers (Via, Contact, ...) are cached per header key and dropped
when a field with that key changes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate, repeat
from operator import add
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
_WSP = " \t"

_TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
# quoted-string with backslash escapes, written as an unrolled loop: `"(?:[^"\\]|\\.)*"` is
# the same language but runs ~4x slower in `re` (one alternation per character).
QUOTED = r'"[^"\\]*(?:\\.[^"\\]*)*"'
_TOKEN_RE = re.compile(_TOKEN)
# RFC 3261 §25.1 uri-parameter values may also hold param-unreserved characters ("[" "]" "/" ":"
# "&" "+" "$"), e.g. `orig-hostport=198.51.100.7:51000` (spec §5) or an IPv6 `maddr`; header
# parameter values may be quoted strings (`+sip.instance="<urn:uuid:...>"`).
_PARAM_VALUE = rf"""[A-Za-z0-9\-.!%*_+`'~\[\]/:&$]+|{QUOTED}|\[[^\]]*\]"""
# One parameter and what ends it (";" or the end), LWS allowed around ";" and "=" (RFC 4475 wsinv).
_PARAM_AT = re.compile(rf"\s*({_TOKEN})\s*(?:=\s*({_PARAM_VALUE})\s*)?(;|\Z)")
# The common case, no LWS and no escapes, ';' or '=' inside quoted values (+sip.instance=
# "<urn:uuid:…>"): one C-level check, then split on ';' and at the first '='.
_SIMPLE = rf"""{_TOKEN}(?:=(?:[A-Za-z0-9\-.!%*_+`'~\[\]/:&$]+|"[^"\\;=\r\n]*"))?"""
_SIMPLE_PARAMS = re.compile(rf"{_SIMPLE}(?:;{_SIMPLE})*\Z")
SIMPLE_PARAMS = _SIMPLE_PARAMS
_KEY_CACHE: dict[str, str] = {}
_MISSING = object()
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


_WIRE_KEYS: dict[str, str] = {}  # a header name as written before ':' (validated) → its key


def wire_key(written: str) -> str:
    """Key of a header name as it appears before the colon (trailing LWS allowed); raises
    SipParseError(400) unless the name is a token. Memoized: the same few names repeat."""
    key = _WIRE_KEYS.get(written)
    if key is None:
        name = written.rstrip(_WSP)
        if not is_token(name):
            raise SipParseError(400, "Malformed header name")
        key = header_key(name)
        if len(_WIRE_KEYS) < _KEY_CACHE_MAX:
            _WIRE_KEYS[written] = key
    return key


def wire_keys(names: list[str]) -> list[str]:
    """wire_key of each name: one C-level pass when every name was seen before (the rule)."""
    try:
        return list(map(_WIRE_KEYS.__getitem__, names))
    except KeyError:
        return [wire_key(n) for n in names]


def is_token(s: str) -> bool:
    return _TOKEN_RE.fullmatch(s) is not None


class Field(NamedTuple):
    name: str
    key: str
    value: str
    raw: str | None  # the original line when unmodified, else None


_SPLITTERS = {sep: re.compile(QUOTED + "|<[^>]*>|" + re.escape(sep)) for sep in ",;"}


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
    splitter = _SPLITTERS.get(sep) or re.compile(QUOTED + "|<[^>]*>|" + re.escape(sep))
    for m in splitter.finditer(value):
        if m.end() - m.start() == 1 and value[m.start()] == sep:
            parts.append(value[start : m.start()])
            start = m.end()
    parts.append(value[start:])
    return parts


def split_values(key: str, lines: list[str]) -> list[str]:
    """Values of header lines with comma lists split (not inside quotes or <...>), empty ones
    dropped; lines of a header whose grammar is no comma list (`key` in _NO_SPLIT) as they are."""
    if not lines or key in _NO_SPLIT:
        return lines
    out: list[str] = []
    for value in lines:
        if "," not in value:
            if value:
                out.append(value)
            continue
        out.extend(p.strip() for p in split_quoted(value, ",") if p.strip())
    return out


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
        if _SIMPLE_PARAMS.match(text):
            return cls.split_simple(text)
        p = cls.__new__(cls)
        items: list[tuple[str, str | None]] = []
        p._items = items
        match = _PARAM_AT.match
        pos = 0
        while True:
            m = match(text, pos)
            if m is None:
                raise SipParseError(400, f"Malformed {what}")
            name, value, sep = m.groups()
            items.append((name, value))
            if not sep:
                break
            pos = m.end()
        return p

    @classmethod
    def split_simple(cls, text: str) -> Params:
        """Parse text already known to match SIMPLE_PARAMS (no LWS, plain quoted values)."""
        p = cls.__new__(cls)
        items: list[tuple[str, str | None]] = []
        p._items = items
        for part in text.split(";"):
            if "=" in part:
                name, _, value = part.partition("=")
                items.append((name, value))
            else:
                items.append((part, None))
        return p

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        low = name.lower()
        return any(k == name or k.lower() == low for k, _ in self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Params) and self._items == other._items

    def __hash__(self) -> int:
        return hash(tuple(self._items))

    def __repr__(self) -> str:
        return f"Params({self._items!r})"

    def __str__(self) -> str:
        return "".join([f";{k}" if v is None else f";{k}={v}" for k, v in self._items])

    def get(self, name: str, default: str | None = None) -> str | None:
        low = name.lower()
        for k, v in self._items:
            if k == name or k.lower() == low:
                return v
        return default

    def set(self, name: str, value: str | None) -> None:
        """Replace the value in place (keeping position) or append."""
        low = name.lower()
        for i, (k, _) in enumerate(self._items):
            if k == name or k.lower() == low:
                self._items[i] = (k, value)
                return
        self._items.append((name, value))

    def remove(self, name: str) -> None:
        low = name.lower()
        self._items = [(k, v) for k, v in self._items if k.lower() != low]

    def copy(self) -> Params:
        p = Params.__new__(Params)
        p._items = self._items.copy()
        return p


class Origin:
    """The received bytes a parsed header section refers to: `raw` is the whole framed message,
    `phys` its head's physical lines (start line first), `folds` the fields that span several
    physical lines (first line → count). Shared by copies; never changed."""

    __slots__ = ("_offsets", "ascii", "folds", "phys", "raw")

    def __init__(self, raw: bytes, phys: list[str], ascii_only: bool, folds: dict[int, int] | None) -> None:
        self.raw = raw
        self.phys = phys
        self.ascii = ascii_only
        self.folds = folds
        self._offsets: list[int] | None = None

    def offsets(self) -> list[int]:
        """Byte offset of each physical line in `raw`, plus the offset just past the last one."""
        if self._offsets is None:
            if self.ascii:
                lens: Iterable[int] = map(len, self.phys)
            else:
                lens = (len(p.encode("utf-8", "surrogateescape")) for p in self.phys)
            # each line plus its CRLF, summed up (all in C for the ASCII case)
            self._offsets = list(accumulate(map(add, lens, repeat(2)), initial=0))
        return self._offsets


def _encode_lines(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


class Headers:
    """Ordered header fields. Mutations keep order; lookups are case-insensitive and compact-aware.

    Internally five parallel lists, one entry per field: canonical key, line text ("Name: value",
    unfolded), name and value (None until first needed), and the physical line the field starts
    on in `_origin` (-1 for fields added or changed here, which are encoded from their text).
    """

    __slots__ = ("_cache", "_edited", "_keys", "_lines", "_names", "_origin", "_src", "_vals")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._keys: list[str] = []
        self._lines: list[str] = []
        self._names: list[str | None] = []
        self._vals: list[str | None] = []
        self._src: list[int] = []
        self._cache: dict[str, Any] = {}
        self._origin: Origin | None = None
        self._edited = True
        for name, value in items:
            self._keys.append(header_key(name))
            self._lines.append(f"{name}: {value}")
            self._names.append(name)
            self._vals.append(value)
            self._src.append(-1)

    @classmethod
    def _parsed(cls, keys: list[str], lines: list[str], src: list[int], origin: Origin) -> Headers:
        """Fields straight from a received head (see message.parse_message)."""
        h = cls.__new__(cls)
        n = len(keys)
        h._keys = keys
        h._lines = lines
        h._names = [None] * n
        h._vals = [None] * n
        h._src = src
        h._cache = {}
        h._origin = origin
        h._edited = False
        return h

    @classmethod
    def _from_fields(cls, fields: list[Field]) -> Headers:
        h = cls()
        for f in fields:
            h._keys.append(f.key)
            h._lines.append(f.raw if f.raw is not None else f"{f.name}: {f.value}")
            h._names.append(f.name)
            h._vals.append(f.value)
            h._src.append(-1)
        return h

    def _select(self, indices: Iterable[int]) -> Headers:
        """A new header list of some of these fields, still spliced from the same bytes."""
        h = Headers.__new__(Headers)
        idx = list(indices)
        h._keys = [self._keys[i] for i in idx]
        h._lines = [self._lines[i] for i in idx]
        h._names = [self._names[i] for i in idx]
        h._vals = [self._vals[i] for i in idx]
        h._src = [self._src[i] for i in idx]
        h._cache = {}
        h._origin = self._origin
        h._edited = True
        return h

    # -- per-field access ----------------------------------------------------------------
    def _value(self, i: int) -> str:
        v = self._vals[i]
        if v is None:
            line = self._lines[i]
            v = self._vals[i] = line[line.index(":") + 1 :].strip(_WSP)
        return v

    def _name(self, i: int) -> str:
        n = self._names[i]
        if n is None:
            line = self._lines[i]
            n = self._names[i] = line[: line.index(":")].rstrip(_WSP)
        return n

    def _field(self, i: int) -> Field:
        src = self._src[i]
        folds = self._origin.folds if self._origin is not None else None
        unchanged = src >= 0 and not (folds and src in folds)
        return Field(self._name(i), self._keys[i], self._value(i), self._lines[i] if unchanged else None)

    # -- read ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((self._name(i), self._value(i)) for i in range(len(self._keys)))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (_KEY_CACHE.get(name) or header_key(name)) in self._keys

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({list(self)!r})"

    def get(self, name: str, default: str | None = None) -> str | None:
        """The whole value of the first field with this name (not comma-split)."""
        key = _KEY_CACHE.get(name) or header_key(name)
        keys = self._keys
        if key not in keys:
            return default
        i = keys.index(key)
        v = self._vals[i]
        if v is None:
            line = self._lines[i]
            v = self._vals[i] = line[line.index(":") + 1 :].strip(_WSP)
        return v

    def get_lines(self, name: str) -> list[str]:
        """Values of every field with this name, one per header line, unsplit."""
        key = _KEY_CACHE.get(name) or header_key(name)
        keys = self._keys
        if key not in keys:
            return []
        return [self._value(i) for i, k in enumerate(keys) if k == key]

    def get_all(self, name: str) -> list[str]:
        """All values, comma-separated lists split (not inside quotes or <...>)."""
        return split_values(header_key(name), self.get_lines(name))

    def first_value(self, name: str) -> str | None:
        """The first of get_all(name) without splitting every line (top Via, top Route)."""
        key = header_key(name)
        keys = self._keys
        for i, k in enumerate(keys):
            if k != key:
                continue
            value = self._value(i)
            if key in _NO_SPLIT or "," not in value:
                if value:
                    return value
                continue
            for part in split_quoted(value, ","):
                if part.strip():
                    return part.strip()
        return None

    def count(self, name: str) -> int:
        return self._keys.count(header_key(name))

    def key_list(self) -> list[str]:
        """Canonical keys in order (read-only view for validation)."""
        return self._keys

    def fields(self) -> list[Field]:
        return [self._field(i) for i in range(len(self._keys))]

    def cached(self, key: str, build: Callable[[], T], first: bool = False) -> T:
        """Structured value cache: computed once per header key (and once for its first value
        alone, `first=True`) until a field with that key changes."""
        slot = key + "#1" if first else key
        cache = self._cache
        value = cache.get(slot, _MISSING)
        if value is _MISSING:
            value = cache[slot] = build()
        return value  # type: ignore[no-any-return]

    def cache_put(self, key: str, value: object, first: bool = False) -> None:
        """Seed the cache after a change whose structured result the caller already has."""
        self._cache[key + "#1" if first else key] = value

    # -- write ---------------------------------------------------------------------------
    def _changed(self, key: str) -> None:
        self._edited = True
        cache = self._cache
        if cache:
            cache.pop(key, None)
            cache.pop(key + "#1", None)

    def _insert(self, i: int, name: str, key: str, value: str) -> None:
        self._keys.insert(i, key)
        self._lines.insert(i, f"{name}: {value}")
        self._names.insert(i, name)
        self._vals.insert(i, value)
        self._src.insert(i, -1)

    def _set(self, i: int, name: str, value: str) -> None:
        self._lines[i] = f"{name}: {value}"
        self._names[i] = name
        self._vals[i] = value
        self._src[i] = -1

    def _delete(self, i: int) -> None:
        del self._keys[i], self._lines[i], self._names[i], self._vals[i], self._src[i]

    def add(self, name: str, value: str) -> None:
        key = header_key(name)
        self._insert(len(self._keys), name, key, value)
        self._changed(key)

    def prepend(self, name: str, value: str) -> None:
        """Insert as the very first field (Via, Record-Route: the newest goes on top)."""
        key = header_key(name)
        self._insert(0, name, key, value)
        self._changed(key)

    def insert_before(self, name: str, value: str) -> None:
        """Insert just before the first field of the same name (or append if none)."""
        key = header_key(name)
        try:
            i = self._keys.index(key)
        except ValueError:
            i = len(self._keys)
        self._insert(i, name, key, value)
        self._changed(key)

    def replace(self, name: str, value: str) -> None:
        """Set a single field: replaces the first (keeping its position and spelling), drops the rest."""
        key = header_key(name)
        keys = self._keys
        try:
            first = keys.index(key)
        except ValueError:
            self._insert(len(keys), name, key, value)
            self._changed(key)
            return
        self._set(first, self._name(first), value)
        i = len(keys) - 1
        while i > first:
            if keys[i] == key:
                self._delete(i)
            i -= 1
        self._changed(key)

    def replace_first_value(self, name: str, value: str) -> None:
        """Replace the first *value* of `name` in place (the top Via after stamping it): a
        comma-list line keeps its other values on a line of their own just below."""
        key = header_key(name)
        try:
            i = self._keys.index(key)
        except ValueError:
            self._insert(0, name, key, value)
            self._changed(key)
            return
        current = self._value(i)
        field_name = self._name(i)
        rest = ""
        if key not in _NO_SPLIT and "," in current:
            parts = split_quoted(current, ",")
            rest = ",".join(parts[1:]).strip()
        self._set(i, field_name, value)
        if rest:
            self._insert(i + 1, field_name, key, rest)
        self._changed(key)

    def remove(self, name: str) -> int:
        key = header_key(name)
        keys = self._keys
        removed = 0
        i = len(keys) - 1
        while i >= 0:
            if keys[i] == key:
                self._delete(i)
                removed += 1
            i -= 1
        self._changed(key)
        return removed

    def remove_first(self, name: str) -> str | None:
        """Remove the first *value* (top Via, top Route): splits a comma-list line if needed."""
        key = header_key(name)
        try:
            i = self._keys.index(key)
        except ValueError:
            return None
        value = self._value(i)
        parts = [value] if key in _NO_SPLIT or "," not in value else split_quoted(value, ",")
        first = parts[0].strip()
        rest = ",".join(parts[1:]).strip()
        if rest:
            self._set(i, self._name(i), rest)
        else:
            self._delete(i)
        self._changed(key)
        return first

    def copy(self) -> Headers:
        h = Headers.__new__(Headers)
        h._keys = self._keys.copy()
        h._lines = self._lines.copy()
        h._names = self._names.copy()
        h._vals = self._vals.copy()
        h._src = self._src.copy()
        h._cache = {}
        h._origin = self._origin
        h._edited = self._edited
        return h

    def lines(self) -> Iterator[str]:
        """Each field as text (unfolded)."""
        return iter(self._lines)

    # -- serialization -------------------------------------------------------------------
    def encode(self) -> bytes:
        """Every field line with its CRLF, byte-exact for every line not changed here: untouched
        it is the received slice; folded fields are spliced in as received; changed or added
        lines are encoded (UTF-8; bytes that were not UTF-8 come back as they were)."""
        origin = self._origin
        if origin is None:
            return _encode_lines(self._lines) if self._lines else b""
        raw = origin.raw
        if not self._edited:
            offs = origin.offsets()
            return raw[offs[1] : offs[-1]]
        folds = origin.folds
        if not folds:
            # Every unchanged line's text is the lossless decode of its received bytes, so one
            # C-level join + encode gives the same bytes as slicing, and is cheaper than a
            # Python loop over the lines for the usual 1 KB head (valgrind: 17 k vs 24 k instr).
            return _encode_lines(self._lines) if self._lines else b""
        offs = origin.offsets()
        parts: list[bytes] = []
        fresh: list[str] = []
        run_start = run_end = -1
        for line, src in zip(self._lines, self._src, strict=True):
            if src < 0:
                if run_end >= 0:
                    parts.append(raw[run_start:run_end])
                    run_start = run_end = -1
                fresh.append(line)
                continue
            a = offs[src]
            b = offs[src + folds.get(src, 1)] if folds else offs[src + 1]
            if a == run_end:
                run_end = b
                continue
            if fresh:
                parts.append(_encode_lines(fresh))
                fresh = []
            elif run_end >= 0:
                parts.append(raw[run_start:run_end])
            run_start, run_end = a, b
        if fresh:
            parts.append(_encode_lines(fresh))
        elif run_end >= 0:
            parts.append(raw[run_start:run_end])
        return b"".join(parts)
