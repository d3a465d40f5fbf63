"""The MRA URL shapes on E:8443 (spec §4), shared by E (first check) and C (authoritative).

``/<b64(domain)>/get_edge_config[/]``, ``/<b64(domain)>/get_edge_sso`` and the descriptor lane
``/<b64("domain/scheme/host/port")>/<path>``. Base64 is standard base64 of the lowercase
string with ``=`` padding removed; the URL-safe alphabet is accepted too.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

_B64_CHARS = re.compile(r"^[A-Za-z0-9+/_=-]+$")
_HOST = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$|^\[[0-9a-f:.]+\]$")


def b64_token(text: str) -> str:
    """The token a client puts in the first path segment: lowercase, standard b64, no padding."""
    return base64.b64encode(text.lower().encode()).decode().rstrip("=")


def decode_token(token: str) -> str | None:
    if not token or len(token) > 1024 or not _B64_CHARS.match(token):
        return None
    padded = token.replace("-", "+").replace("_", "/").rstrip("=")
    padded += "=" * (-len(padded) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    if not text.isprintable():
        return None
    return text.lower()


@dataclass(frozen=True)
class EdgeConfigPath:
    domain: str


@dataclass(frozen=True)
class EdgeSsoPath:
    domain: str


@dataclass(frozen=True)
class DescriptorPath:
    domain: str
    scheme: str
    host: str
    port: int
    path: str
    """The path on the internal server, still percent-encoded as the client sent it."""


@dataclass(frozen=True)
class BadPath:
    status: int
    reason: str


MraPath = EdgeConfigPath | EdgeSsoPath | DescriptorPath | BadPath


def classify(raw_path: str) -> MraPath:
    """Classify a raw (still percent-encoded) request path without its query string."""
    if not raw_path.startswith("/"):
        return BadPath(400, "path must start with /")
    token, _, rest = raw_path[1:].partition("/")
    decoded = decode_token(token)
    if decoded is None:
        return BadPath(404, "first path segment is not an MRA token")
    parts = decoded.split("/")
    if len(parts) == 1:
        domain = parts[0]
        if rest in ("get_edge_config", "get_edge_config/"):
            return EdgeConfigPath(domain)
        if rest in ("get_edge_sso", "get_edge_sso/"):
            return EdgeSsoPath(domain)
        return BadPath(404, "unknown edge service")
    if len(parts) != 4:
        return BadPath(404, "descriptor must be domain/scheme/host/port")
    domain, scheme, host, port_text = parts
    if scheme not in ("http", "https"):
        return BadPath(400, f"descriptor scheme {scheme!r} is not http or https")
    if not _HOST.match(host):
        return BadPath(400, "descriptor host is not a host name")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return BadPath(400, "descriptor port is not a port number")
    return DescriptorPath(domain, scheme, host, int(port_text), "/" + rest)
