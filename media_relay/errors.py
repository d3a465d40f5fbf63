"""One error model for the media layer; converted to counters at the relay's input boundary."""

from __future__ import annotations


class MediaError(Exception):
    """Base of every error the media layer raises."""


class PortsExhaustedError(MediaError):
    """No free even/odd port pair is left in the allocator's range."""


class TranscodeError(MediaError):
    """A packet could not be transformed for the other leg; the relay drops and counts it."""
