"""The interface between SIP signalling and the media relay (spec §5, §7).

Signalling (E's proxy, C's B2BUA) hands every SDP it forwards to a `MediaSession` and forwards
the SDP it gets back. `ingress` says where the SDP came from: "outside" is the client's side
(on E: the client's flow; on C: the traversal zone from E), "inside" is the enterprise side (on E:
the zone from C; on C: Unified CM). The media side allocates relay ports, latches, terminates or
passes SRTP, and rewrites connection addresses, ports, profiles and crypto lines.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

Side = Literal["outside", "inside"]


class MediaRejected(Exception):
    """The SDP cannot be served (no common suite, ports exhausted…): answer 488 with this reason."""

    def __init__(self, reason: str, status: int = 488) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class MediaSession(Protocol):
    def process_offer(self, call: str, ingress: Side, sdp: bytes) -> bytes:
        """An SDP offer arriving from `ingress`; returns the offer to forward to the other side."""
        ...

    def process_answer(self, call: str, ingress: Side, sdp: bytes) -> bytes:
        """The SDP answer to the last offer of `call`, arriving from `ingress`; returns the answer
        to forward. Called for provisional (18x) answers too; the last one wins."""
        ...

    def end_call(self, call: str) -> None:
        """The call (dialog) ended: release its ports and streams."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """Streams and counters for status pages."""
        ...


class PassthroughMedia:
    """No anchoring: SDP passes unchanged (signalling-only calls, for labs without a relay)."""

    def process_offer(self, call: str, ingress: Side, sdp: bytes) -> bytes:
        return sdp

    def process_answer(self, call: str, ingress: Side, sdp: bytes) -> bytes:
        return sdp

    def end_call(self, call: str) -> None:
        return None

    def snapshot(self) -> dict[str, Any]:
        return {"anchored": False}
