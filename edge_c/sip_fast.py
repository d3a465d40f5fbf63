"""Expressway-C's SIP fast path: a plain REGISTER from the zone and UCM's answer, on bytes.

Most of what crosses C is REGISTER refreshes and their answers. For those `ExpcRegisterFastPath`
does what `ExpcSip`'s full path does (`_zone_message` + `_forward_to_ucm`, `_ucm_message`) on
the framed bytes (`edge.sip.fastpath`): it checks what the full path would check, splices the
changed lines and sends bytes, without building a `Message` (benchmarks/sip/README.md). Anything
else, and anything odd, is declined having changed nothing, and goes the full way: both paths
send the same bytes and keep the same state (tests/sip/test_sip_fastpath.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.sip import fastpath
from edge.sip.address import NameAddr
from edge.sip.errors import SipParseError
from edge.sip.events import MessageFramed
from edge.sip_flow import SipFlow

if TYPE_CHECKING:
    from edge_c.sip import ExpcSip


class ExpcRegisterFastPath:
    """The byte-level hops of one `ExpcSip` (the zone's and UCM flows' `on_frame` callbacks)."""

    __slots__ = ("_contact_memo", "_flow_param", "_route_own", "_sip")

    def __init__(self, sip: ExpcSip, flow_param: str) -> None:
        self._sip = sip
        self._flow_param = flow_param.encode()
        self._route_own: dict[bytes, bool | None] = {}  # Route value → names C?
        # (client Contact, its address) → the rewritten Contact; refreshes repeat it
        self._contact_memo: dict[tuple[bytes, bytes], bytes] = {}

    def zone_frame(self, flow: SipFlow, frame: MessageFramed) -> bool:
        """`_zone_message` + `_forward_to_ucm` for a plain REGISTER on an open UCM flow: the same
        bytes, without building a Message. False, having changed nothing, for the rest."""
        sip = self._sip
        conn = sip.zone_conns.get(flow.flow_id)
        if conn is None or conn.flow is not flow or sip.maintenance():
            return False
        head = fastpath.register_head(frame.data, frame.head_end, frame.head)
        if head is None:
            return False
        plan = head.plan
        vias = plan.vias
        mi = plan.first.get("max-forwards", 0)
        mf = fastpath.max_forwards(head.value(mi)) if mi else None
        if len(vias) < 2 or not mf:  # no client Via below E's; Max-Forwards absent or 0
            return False
        top = fastpath.parse_via(head.value(vias[0]))
        client = fastpath.parse_via(head.value(vias[1]))
        if top is None or client is None:
            return False
        ri = plan.first.get("route", 0)
        own_route = ri > 0 and self._route_names_c(head.value(ri))
        if ri and (own_route is None or plan.count["route"] > 1):
            return False
        received = client.param(b"received")
        rport_text = client.param(b"rport")
        rport = int(rport_text) if rport_text is not None and rport_text.isdigit() else None
        client_addr = (received.decode() if received else client.host, rport or client.port or 5061)
        orig = f"{client_addr[0]}:{client_addr[1]}".encode()
        transport = sip.settings.ucm_transport.encode()
        ci = plan.first.get("contact", 0)
        contact = None
        if ci and not sip.settings.sip_path_headers:
            value = head.value(ci)
            if plan.count["contact"] > 1 or b"," in value:
                return False
            contact = self._contact_memo.get((value, orig))
            if contact is None:
                params = [(b"transport", transport), (b"orig-hostport", orig)]
                contact = fastpath.rewrite_contact(value, sip.address, sip.ucm_port, params)
                if contact is None:
                    return False
                if len(self._contact_memo) >= 8192:
                    self._contact_memo.clear()
                self._contact_memo[(value, orig)] = contact
        live = sip._live_ucm()
        ucm = sip.ucm_out.get(live[0].name) if len(live) == 1 else None
        if ucm is None or not ucm.is_open:
            return False
        node = live[0]
        sip.client_edge[client_addr] = flow.flow_id
        sip._count("register")
        branch = fastpath.stateless_branch(
            sip.salt, fastpath.text(top.branch), top.sent_by, head.value(plan.first["call-id"]).decode()
        )
        top.stamp(flow.peer, sip.settings.zone.name)
        lines = head.lines
        lines[vias[0]] = head.replaced(vias[0], top.encode())
        mf = min(mf, sip.settings.zone.max_hops)
        lines[mi] = head.replaced(mi, str(mf - 1).encode())
        for i in sorted((ci if contact is not None else 0, ri if own_route else 0), reverse=True):
            if i:
                del lines[i]
        if contact is not None:  # Headers.remove + add: the rewritten Contact goes last
            lines.append(b"Contact: " + contact)
        fresh = [
            lines[0],
            b"Via: SIP/2.0/%s %s:%d;branch=%s;egress-zone=CE%s-%s;%s=%s;rport"
            % (
                transport.upper(),
                sip.address.encode(),
                sip.ucm_port,
                branch.encode(),
                transport,
                node.name.encode(),
                self._flow_param,
                flow.flow_id.encode(),
            ),
        ]
        if sip.settings.sip_path_headers:
            fresh.append(
                b"Path: <sip:%s:%d;transport=%s;lr;orig-hostport=%s>"
                % (sip.address.encode(), sip.ucm_port, transport, orig)
            )
        lines[0:1] = fresh
        ucm.send_bytes(b"\r\n".join(lines) + head.body_tail())
        return True

    def _route_names_c(self, value: bytes) -> bool | None:
        """Whether a single Route value names C (then popped); None: not plain, parse fully."""
        memo = self._route_own
        if value in memo:
            return memo[value]
        own: bool | None = None
        if b"," not in value:
            try:
                own = self._sip._is_own(NameAddr.parse(value.decode()).uri)
            except SipParseError:
                own = None
        if len(memo) >= 1024:
            memo.clear()
        memo[value] = own
        return own

    def ucm_frame(self, flow: SipFlow, frame: MessageFramed) -> bool:
        """`_ucm_message` for UCM's answer to a REGISTER: our Via popped, the rest as received."""
        sip = self._sip
        if not frame.data.startswith(b"SIP/2.0 "):
            return False
        head = frame.head or fastpath.scan(frame.data, frame.head_end)
        if head is None or fastpath.status_code(head.lines[0]) is None:
            return False
        plan = head.plan
        ci = plan.first.get("cseq", 0)
        vi = plan.first.get("via", 0)
        if not ci or not vi or fastpath.cseq_method(head.value(ci)) != b"REGISTER":
            return False
        via = fastpath.parse_via(head.value(vi))
        if via is None or via.host != sip.address or plan.count.get("content-length", 0) > 1:
            return False
        token = via.param(self._flow_param)
        conn = sip.zone_conns.get(token.decode()) if token is not None else None
        if conn is None or not conn.flow.is_open:
            return False
        conn.flow.send_bytes(head.without(vi))
        return True
