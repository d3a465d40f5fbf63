"""What E's and C's media anchors share: refusal bookkeeping and SDP parsing as MediaRejected."""

from __future__ import annotations

import logging

from edge.media_hooks import MediaRejected
from media_relay.errors import MediaError
from media_relay.sdp import SessionDescription
from media_relay.worker import RelayWorker

log = logging.getLogger(__name__)


class AnchorBase:
    """Counts refusals; every failure leaves as `MediaRejected` (signalling answers 488/503)."""

    what = "media anchor"

    def __init__(self) -> None:
        self._worker: RelayWorker | None = None
        self.rejected = 0

    def _running(self) -> RelayWorker:
        if self._worker is None:
            self.rejected += 1
            raise MediaRejected(f"{self.what} not running", 503)
        return self._worker

    def _reject(self, call: str, reason: str) -> MediaRejected:
        self.rejected += 1
        log.info("call %s: media rejected: %s", call, reason)
        return MediaRejected(reason)

    def _parse(self, sdp: bytes) -> SessionDescription:
        try:
            return SessionDescription.parse(sdp)
        except (MediaError, ValueError) as exc:
            self.rejected += 1
            raise MediaRejected(f"bad SDP: {exc}") from None
