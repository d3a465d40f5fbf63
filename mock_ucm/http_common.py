"""What every mock inside-server HTTP app shares: XML answers, credential parsing, request
accounting, and the error boundary that turns any failure into a clean HTTP answer.

STYLE "one error model per layer, converted once at the input boundary": handlers raise aiohttp
HTTP exceptions for client errors; anything else becomes a bare 500 here, logged with the request
id, never a traceback on the wire.
"""

from __future__ import annotations

import base64
import binascii
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from mock_ucm.directory import Directory
from mock_ucm.oauth import TokenVerifier

log = logging.getLogger(__name__)

XML_CONTENT_TYPE = "application/xml"
MAX_REQUEST_BYTES = 64 * 1024
"""Request bodies these servers accept (token requests are a few hundred bytes)."""
MAX_PARAM_CHARS = 256
_XML_DECL = b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'


# -- XML --------------------------------------------------------------------------------------


def element(tag: str, text: str | None = None, attrs: Mapping[str, str] | None = None) -> ET.Element:
    node = ET.Element(tag, dict(attrs or {}))
    if text is not None:
        node.text = text
    return node


def sub(
    parent: ET.Element, tag: str, text: str | None = None, attrs: Mapping[str, str] | None = None
) -> ET.Element:
    """Append a child; `text=None` gives an empty element (`<middleName/>`), as Cisco APIs do."""
    node = ET.SubElement(parent, tag, dict(attrs or {}))
    if text is not None:
        node.text = text
    return node


def xml_bytes(root: ET.Element) -> bytes:
    return _XML_DECL + ET.tostring(root, encoding="unicode").encode()


def xml_response(
    root: ET.Element, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=xml_bytes(root),
        headers={"Content-Type": XML_CONTENT_TYPE, **(headers or {})},
    )


def bool_text(value: bool) -> str:
    return "true" if value else "false"


# -- credentials ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    scheme: Literal["basic", "bearer"]
    username: str = ""
    password: str = ""
    token: str = ""


def parse_authorization(header: str | None) -> Credentials | None:
    """`Authorization: Basic …` or `Bearer …`; anything malformed is the same as no credentials."""
    if not header or len(header) > 8192:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return Credentials("bearer", token=value)
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    username, sep, password = decoded.partition(":")
    if not sep or not username:
        return None
    return Credentials("basic", username=username, password=password)


class Authenticator:
    """Who a request is: Basic credentials checked against the directory, or an OAuth access token."""

    def __init__(self, directory: Directory, verifier: TokenVerifier | None) -> None:
        self.directory = directory
        self.verifier = verifier

    def username(self, request: web.Request) -> str | None:
        """The directory's spelling of the authenticated user id, or None."""
        creds = parse_authorization(request.headers.get("Authorization"))
        if creds is None:
            return None
        if creds.scheme == "basic":
            if not self.directory.authenticate(creds.username, creds.password):
                return None
            user = self.directory.get_user(creds.username)
        else:
            if self.verifier is None:
                return None
            claims = self.verifier.validate_token(creds.token, "access")
            if claims is None:
                return None
            user = self.directory.get_user(str(claims["sub"]))
        return user.username if user is not None else None


class HttpError(Exception):
    """A client error answered with a fully formed response (an XML or JSON error body)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def unauthorized(realm: str) -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(
        headers={"WWW-Authenticate": f'Basic realm="{realm}"'},
        text="401 Unauthorized",
    )


# -- parameters -------------------------------------------------------------------------------


def query_text(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is None:
        return None
    if len(value) > MAX_PARAM_CHARS or "\x00" in value:
        raise web.HTTPBadRequest(text=f"parameter {name!r} is too long or malformed")
    return value


def query_int(request: web.Request, name: str, default: int, *, low: int, high: int) -> int:
    """An integer parameter clamped to [low, high]; non-numbers are a 400."""
    raw = query_text(request, name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise web.HTTPBadRequest(text=f"parameter {name!r} must be an integer") from None
    return max(low, min(high, value))


# -- accounting and the error boundary --------------------------------------------------------


class HttpMetrics:
    """One Prometheus counter per component, labelled by app, route pattern and status."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.requests = PromCounter(
            f"{prefix}_http_requests",
            "HTTP requests answered, by app, route pattern and status",
            ["app", "route", "status"],
            registry=registry,
        )


class RequestStats:
    """Request counters one app keeps for `status()` (and Prometheus, when given metrics)."""

    def __init__(self, app: str, metrics: HttpMetrics | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.total = 0
        self.by_status: Counter[int] = Counter()
        self.by_route: Counter[str] = Counter()
        self.internal_errors = 0

    def record(self, route: str, status: int) -> None:
        self.total += 1
        self.by_status[status] += 1
        self.by_route[route] += 1
        if self.metrics is not None:
            self.metrics.requests.labels(self.app, route, str(status)).inc()

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests_total": self.total,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "by_route": dict(sorted(self.by_route.items())),
            "internal_errors": self.internal_errors,
        }


STATS_KEY = web.AppKey("stats", RequestStats)


def _route_label(request: web.Request) -> str:
    # The route pattern, never the raw path: bounded label cardinality.
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "(unmatched)"


def boundary_middleware(stats: RequestStats) -> Middleware:
    @web.middleware
    async def boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = _route_label(request)
        try:
            response = await handler(request)
        except HttpError as exc:
            stats.record(route, exc.response.status)
            return exc.response
        except web.HTTPException as exc:
            stats.record(route, exc.status)
            raise
        except Exception:
            stats.internal_errors += 1
            stats.record(route, 500)
            log.exception("%s: %s %s failed", stats.app, request.method, route)
            return web.Response(status=500, text="500 Internal Server Error")
        stats.record(route, response.status)
        return response

    return boundary


def new_app(stats: RequestStats, *, max_request_bytes: int = MAX_REQUEST_BYTES) -> web.Application:
    app = web.Application(client_max_size=max_request_bytes, middlewares=[boundary_middleware(stats)])
    app[STATS_KEY] = stats
    return app
