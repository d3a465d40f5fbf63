"""The one error type of the SIP codec layer, converted to a SIP response at the input boundary."""

from __future__ import annotations


class SipParseError(ValueError):
    """A malformed message; `status_code` is the response a UAS/proxy should answer with."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(f"{status_code} {reason}")
        self.status_code = status_code
        self.reason = reason
