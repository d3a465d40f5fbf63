"""What the sans-IO IM&P core asks its I/O adapter to do, per connection."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DataQueued:
    """Bytes to write on connection ``conn_id``."""

    conn_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TlsUpgradeRequested:
    """``<proceed/>`` was queued: start the TLS handshake now and then call ``tls_established``."""

    conn_id: int


@dataclass(frozen=True, slots=True)
class CloseRequested:
    """Flush what was queued, then close the connection."""

    conn_id: int


ImpOutput = DataQueued | TlsUpgradeRequested | CloseRequested
