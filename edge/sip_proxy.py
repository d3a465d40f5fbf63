"""Proxy operations on SIP messages shared by Expressway-E and Expressway-C (RFC 3261 §16).

Pure functions over edge.sip messages: Via stamping and stacking, Max-Forwards, popping our own
Route entries, Record-Route, stateless branch derivation, error answers with a Warning.
"""

from __future__ import annotations

from collections.abc import Callable

from edge.sip import fastpath
from edge.sip.address import Via
from edge.sip.errors import SipParseError
from edge.sip.message import Request, Response, make_response
from edge.sip.uri import Uri

DIALOG_FORMING = frozenset({"INVITE", "SUBSCRIBE", "REFER", "NOTIFY"})


def error_response(
    request: Request, status: int, reason: str, warning: str | None = None, agent: str = "edge"
) -> Response:
    resp = make_response(request, status, reason)
    if warning:
        resp.headers.add("Warning", f'399 {agent} "{warning}"')
    return resp


def stamp_top_via(msg: Request, peer: tuple[str, int], **extra: str | None) -> Via:
    """RFC 3261 §18.2.1 + RFC 3581: record where the request really came from on the top Via.

    The stamped Via replaces the old one where it stands; every other line stays byte-exact."""
    top = msg.top_via
    if top is None:
        raise SipParseError(400, "Missing Via")
    via = top.copy()  # the parsed original may be shared (make_response shares parsed values)
    via.params.set("received", peer[0])
    via.params.set("rport", str(peer[1]))
    for key, value in extra.items():
        via.params.set(key.replace("_", "-"), value)
    msg.set_top_via(via)
    return via


def push_via(msg: Request, via: Via) -> None:
    msg.push_via(via)


def pop_via(resp: Response) -> Via | None:
    via = resp.top_via
    if via is not None:
        resp.headers.remove_first("Via")
    return via


def top_via(msg: Request | Response) -> Via | None:
    return msg.top_via


def nth_via(msg: Request | Response, n: int) -> Via | None:
    """The n-th Via value (0 = top), parsing only that one (C needs the client's, below E's)."""
    if n == 0:
        return msg.top_via
    values = msg.headers.get_all("Via")
    return Via.parse(values[n]) if len(values) > n else None


def decrement_max_forwards(req: Request, cap: int | None = None) -> bool:
    """False when the request must be refused with 483 (RFC 3261 §16.3 step 2, spec §5 hop limit)."""
    mf = req.max_forwards
    if mf is None:
        mf = 70
    if cap is not None:
        mf = min(mf, cap)
    if mf <= 0:
        return False
    req.headers.replace("Max-Forwards", str(mf - 1))
    req.headers.cache_put("max-forwards", mf - 1)
    return True


def pop_own_routes(req: Request, is_own: Callable[[Uri], bool]) -> list[Uri]:
    """Remove top Route entries that name us (loose routing, RFC 3261 §16.4)."""
    if "route" not in req.headers:
        return []
    routes = req.routes
    n = 0
    while n < len(routes) and is_own(routes[n].uri):
        n += 1
    for _ in range(n):
        req.headers.remove_first("Route")
    if n:
        req.headers.cache_put("route", routes[n:])
    return [r.uri for r in routes[:n]]


def stateless_branch(req: Request, salt: str) -> str:
    """A branch that is the same for retransmissions and for the CANCEL/ACK of the same INVITE
    (RFC 3261 §16.11): derived from the incoming top Via branch and our own salt."""
    via = top_via(req)
    if via is None:
        return fastpath.stateless_branch(salt, "", "", req.call_id)
    return fastpath.stateless_branch(salt, via.branch, via.sent_by, req.call_id)


def is_dialog_forming(req: Request) -> bool:
    return req.method in DIALOG_FORMING and req.to_tag is None


def uri_hostport(uri: Uri) -> tuple[str, int | None]:
    host = uri.host[1:-1] if uri.host.startswith("[") else uri.host
    return host, uri.port
