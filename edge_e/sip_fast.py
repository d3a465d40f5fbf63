"""Expressway-E's SIP fast path: a client's plain REGISTER and C's answers, on bytes.

Most of what crosses E is REGISTER refreshes and their answers. For those `EdgeRegisterFastPath`
does what `EdgeSip`'s full path does (`_client_message`, `_zone_response`) on the framed bytes
(`edge.sip.fastpath`): it checks what the full path would check, splices the changed lines and
sends bytes, without building a `Message` (benchmarks/sip/README.md). Anything else, and
anything odd, is declined having changed nothing, and goes the full way: both paths send the
same bytes and keep the same state (tests/sip/test_sip_fastpath.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from edge.sip import fastpath
from edge.sip.address import NameAddr
from edge.sip.errors import SipParseError
from edge.sip.events import MessageFramed
from edge.sip_flow import SipFlow

if TYPE_CHECKING:
    from edge_e.sip import EdgeSip


class EdgeRegisterFastPath:
    """The byte-level hops of one `EdgeSip` (its `on_frame` callbacks)."""

    __slots__ = ("_client_param", "_route_ok", "_sip", "_zone_via")

    def __init__(self, sip: EdgeSip, client_param: str) -> None:
        self._sip = sip
        self._client_param = client_param.encode()
        # E's Via towards C up to its branch value, and what a client's Route value means
        # (True: forward as is); Route values repeat across clients.
        self._zone_via = f"Via: SIP/2.0/TLS {sip.internal_address}:{sip.zone_port};branch=".encode()
        self._route_ok: dict[bytes, bool] = {}

    def client_frame(self, flow: SipFlow, frame: MessageFramed) -> bool:
        """`_client_message` for a plain REGISTER: the same bytes to C, without building a
        Message. False, having changed nothing, for anything else (the full path decides)."""
        sip = self._sip
        if sip.maintenance():
            return False
        head = fastpath.register_head(frame.data, frame.head_end, frame.head)
        if head is None:
            return False
        plan = head.plan
        vi = plan.first["via"]
        via = fastpath.parse_via(head.value(vi))
        mi = plan.first.get("max-forwards", 0)
        mf = fastpath.max_forwards(head.value(mi)) if mi else None
        if via is None or not mf:  # odd Via; Max-Forwards absent, malformed or 0 (483)
            return False
        ri = plan.first.get("route", 0)
        if ri and (plan.count["route"] > 1 or not self._route_forwardable(head.value(ri))):
            return False
        zone = sip.live_zone_flow()
        if zone is None:
            return False
        sip._count("in_register")
        branch = fastpath.stateless_branch(
            sip.salt, fastpath.text(via.branch), via.sent_by, head.value(plan.first["call-id"]).decode()
        )
        via.stamp(flow.peer, sip.zone_name)
        lines = head.lines
        lines[vi] = head.replaced(vi, via.encode())
        lines[mi] = head.replaced(mi, str(mf - 1).encode())
        cf = self._client_param
        lines.insert(1, b"%s%s;%s=%s;rport" % (self._zone_via, branch.encode(), cf, flow.flow_id.encode()))
        zone.send_bytes(b"\r\n".join(lines) + head.body_tail())
        return True

    def _route_forwardable(self, value: bytes) -> bool:
        """A client's single Route value that `_client_message` forwards as is: not ours (not
        popped) and naming our zone-id, if any. Memoised: every client preloads the same one."""
        ok = self._route_ok.get(value)
        if ok is None:
            sip = self._sip
            try:
                uri = NameAddr.parse(value.decode()).uri
                zone_id = uri.params.get("zone-id")
                ok = b"," not in value and not sip._is_own(uri) and zone_id in (None, sip.zone_id)
            except SipParseError:
                ok = False
            if len(self._route_ok) >= 1024:
                self._route_ok.clear()
            self._route_ok[value] = ok
        return ok

    def zone_frame(self, flow: SipFlow, frame: MessageFramed) -> bool:
        """`_zone_response` for C's answer (no SDP) to a client request, on bytes."""
        if not frame.data.startswith(b"SIP/2.0 ") or not flow.context.get("authenticated"):
            return False
        head = frame.head or fastpath.scan(frame.data, frame.head_end)
        if head is None:
            return False
        code = fastpath.status_code(head.lines[0])
        plan = head.plan
        vi = plan.first.get("via", 0)
        if code is None or not vi or plan.count.get("content-length", 0) > 1:
            return False
        sip = self._sip
        via = fastpath.parse_via(head.value(vi))
        if via is None or not sip._is_own_hostport(via.host, via.port):
            return False
        token = via.param(self._client_param)
        client = sip.clients.get(token.decode()) if token is not None else None
        ci = plan.first.get("cseq", 0)
        method = fastpath.cseq_method(head.value(ci)) if ci else None
        if client is None or not client.is_open or method is None or method in (b"INVITE", b"UPDATE"):
            return False
        if method == b"REGISTER" and 200 <= code < 300:
            sip.registrations.track(*fastpath.binding_headers(head), time.monotonic())
        client.send_bytes(head.without(vi))
        return True
