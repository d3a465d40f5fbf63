"""Lingering close: end a TCP connection so that what we wrote last reaches the peer.

A stream error (RFC 6120 §4.9.1.1: the error, then ``</stream:stream>``, then close) is often
sent while the peer is still writing, e.g. a stanza far over ``max_stanza_bytes``. Closing a
socket with input still unread makes Linux send a RST instead of a FIN, and a peer that writes
again before it has read our error gets ECONNRESET / EPIPE on that write: uvloop and asyncio
then report the connection lost without reading what was already in their receive buffer, and
asyncio's StreamReader raises the error ahead of any buffered data. The error is lost: the
flake where a client saw ``remote-connection-failed`` from Expressway-C instead of the IM&P's
``policy-violation``.

So: half-close (the FIN follows everything written), keep reading and discarding the peer's
input until its EOF, and close then, or at a deadline for a peer that never stops. The caller's
protocol must drop what it receives meanwhile (nothing is buffered) and return ``None`` from
``eof_received`` so the transport closes at the peer's EOF.
"""

from __future__ import annotations

import asyncio

LINGER_TIMEOUT_S = 2.0  # how long a peer that never ends its side is read (and ignored)


def linger_close(
    transport: asyncio.Transport, timeout_s: float = LINGER_TIMEOUT_S
) -> asyncio.TimerHandle | None:
    """Half-close ``transport`` now and return the handle of the deadline that closes it.

    At the deadline the transport is closed as by a plain close: what we wrote is still flushed
    first, only the reading stops. The owner cancels the handle in ``connection_lost``. A
    transport that cannot half-close is closed at once (``None`` is returned).
    """
    if transport.is_closing():
        return None
    if not transport.can_write_eof():
        transport.close()
        return None
    transport.write_eof()
    transport.resume_reading()  # reading may be paused for backpressure: the input must drain
    return asyncio.get_running_loop().call_later(timeout_s, transport.close)
