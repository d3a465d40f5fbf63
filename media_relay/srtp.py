"""SDES key exchange (RFC 4568) and SRTP contexts over libsrtp (spec §7).

E relays SRTP untouched; only C, the B2BUA, terminates it: it unprotects with the key the peer
offered and re-protects with the key C announced (or sends plain RTP to an inside endpoint that
did not offer SRTP). Every libsrtp failure becomes ``SrtpError`` / ``SrtpAuthError``, which the
relay table counts as a drop; nothing from libsrtp reaches the event loop.

Two libsrtp bindings, byte-identical output: the native fast path's ``SrtpSession`` (system
libsrtp2, ``media_relay/_srtp.c``) when the extension was built with it and is not switched off
(``fastpath.native_srtp()``), else pylibsrtp. A native ``SrtpTranscoder`` can be handed to the
native forwarder (``fastpath.FlowSync``), which then transcodes that leg's packets in C with the
very same sessions: one SRTP state per SSRC whichever path a packet takes.
"""

from __future__ import annotations

import base64
import binascii
import enum
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pylibsrtp

from media_relay import fastpath
from media_relay.errors import MediaError, TranscodeError

if TYPE_CHECKING:
    from media_relay._fastpath import SrtpSession, Transcoder

try:
    from media_relay import _fastpath as _native
except ImportError:  # not built: pylibsrtp only
    _native = None  # type: ignore[assignment]

# The native binding's exceptions (empty tuples without it: ``except ()`` catches nothing).
_NATIVE_AUTH: tuple[type[Exception], ...] = ()
_NATIVE_ERR: tuple[type[Exception], ...] = ()
if _native is not None and bool(getattr(_native, "HAVE_SRTP", False)):
    _NATIVE_AUTH = (_native.SrtpAuthError,)
    _NATIVE_ERR = (_native.SrtpError,)
# What else a binding may raise for a bad packet (pylibsrtp: ValueError "packet is too long").
_OTHER_ERR: tuple[type[Exception], ...] = (ValueError, TypeError, *_NATIVE_ERR)

log = logging.getLogger(__name__)


class SrtpError(TranscodeError):
    """libsrtp refused a packet (too long for its buffer, cipher failure, ...)."""


class SrtpAuthError(SrtpError):
    """An SRTP/SRTCP packet failed authentication or the replay check."""


class SdesError(MediaError, ValueError):
    """A malformed or unusable ``a=crypto`` attribute."""


class SrtpUnsupportedError(SdesError):
    """A crypto suite or parameter the installed libsrtp cannot do; refuse it at negotiation."""


@dataclass(frozen=True, slots=True)
class SuiteInfo:
    name: str
    profile: int
    key_salt_bytes: int


# RFC 4568 §6.2 / RFC 7714 §14.2 names; key||salt lengths: 16+14, 16+12, 32+12 bytes.
_SUITE_TABLE: tuple[tuple[str, str, int], ...] = (
    ("AES_CM_128_HMAC_SHA1_80", "SRTP_PROFILE_AES128_CM_SHA1_80", 30),
    ("AES_CM_128_HMAC_SHA1_32", "SRTP_PROFILE_AES128_CM_SHA1_32", 30),
    ("AEAD_AES_128_GCM", "SRTP_PROFILE_AEAD_AES_128_GCM", 28),
    ("AEAD_AES_256_GCM", "SRTP_PROFILE_AEAD_AES_256_GCM", 44),
)
SUITES: dict[str, SuiteInfo] = {
    name: SuiteInfo(name, getattr(pylibsrtp.Policy, attr), n)
    for name, attr, n in _SUITE_TABLE
    if hasattr(pylibsrtp.Policy, attr)
}
KNOWN_SUITES = tuple(name for name, _, _ in _SUITE_TABLE)
_KEY_SALT_BYTES = {name: n for name, _, n in _SUITE_TABLE}
# Spec §7: AES-CM-80 always; -32 too; GCM only when the per-UCM "AES GCM" option is on.
DEFAULT_SUITES = ("AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32")
GCM_SUITES = ("AEAD_AES_128_GCM", "AEAD_AES_256_GCM")


def suite_info(suite: str) -> SuiteInfo:
    info = SUITES.get(suite)
    if info is None:
        why = "not supported by the installed libsrtp" if suite in KNOWN_SUITES else "unknown"
        raise SrtpUnsupportedError(f"crypto suite {suite}: {why}")
    return info


# -- SDES a=crypto ------------------------------------------------------------------------------

_KEY_PARAM = re.compile(r"^inline:([A-Za-z0-9+/=]+)(?:\|([0-9^]+))?(?:\|([0-9]+):([0-9]+))?$")


@dataclass(frozen=True, slots=True)
class KeyParams:
    """``inline:<base64 key||salt>[|lifetime][|MKI:length]``; lifetime kept as written."""

    key_salt: bytes
    lifetime: str | None = None
    mki: int | None = None
    mki_length: int | None = None

    @property
    def lifetime_packets(self) -> int | None:
        if self.lifetime is None:
            return None
        if self.lifetime.startswith("2^"):
            return 1 << int(self.lifetime[2:])
        return int(self.lifetime)

    @classmethod
    def parse(cls, text: str) -> KeyParams:
        m = _KEY_PARAM.match(text)
        if m is None:
            raise SdesError(f"bad key-params {text!r}")
        key64, lifetime, mki, mki_len = m.groups()
        try:
            bare = key64.rstrip("=")
            key_salt = base64.b64decode(bare + "=" * (-len(bare) % 4), validate=True)
        except binascii.Error as exc:
            raise SdesError(f"bad base64 key in {text!r}") from exc
        if lifetime is not None and not re.fullmatch(r"2\^[0-9]{1,2}|[0-9]{1,20}", lifetime):
            raise SdesError(f"bad key lifetime {lifetime!r}")
        if mki_len is not None and not 1 <= int(mki_len) <= 128:
            raise SdesError(f"bad MKI length {mki_len}")
        return cls(
            key_salt,
            lifetime,
            None if mki is None else int(mki),
            None if mki_len is None else int(mki_len),
        )

    def __str__(self) -> str:
        text = "inline:" + base64.b64encode(self.key_salt).decode("ascii")
        if self.lifetime is not None:
            text += "|" + self.lifetime
        if self.mki is not None:
            text += f"|{self.mki}:{self.mki_length}"
        return text


@dataclass(frozen=True, slots=True)
class CryptoAttribute:
    """One ``a=crypto:<tag> <suite> <key-params>[;<key-params>] [<session params>]`` (RFC 4568 §9.1)."""

    tag: int
    suite: str
    keys: tuple[KeyParams, ...]
    session_params: tuple[str, ...] = field(default=())

    @property
    def key_salt(self) -> bytes:
        return self.keys[0].key_salt

    @classmethod
    def parse(cls, value: str) -> CryptoAttribute:
        """Parse the attribute value (the text after ``a=crypto:``, or the whole line)."""
        value = value.strip()
        if value.startswith("a=crypto:"):
            value = value[len("a=crypto:") :]
        parts = value.split()
        if len(parts) < 3 or not parts[0].isdigit() or len(parts[0]) > 9:
            raise SdesError(f"bad crypto attribute {value!r}")
        keys = tuple(KeyParams.parse(k) for k in parts[2].split(";"))
        length = _KEY_SALT_BYTES.get(parts[1])
        if length is not None and any(len(k.key_salt) != length for k in keys):
            raise SdesError(f"{parts[1]} needs {length} key||salt bytes")
        return cls(int(parts[0]), parts[1], keys, tuple(parts[3:]))

    def __str__(self) -> str:
        keys = ";".join(str(k) for k in self.keys)
        return " ".join([str(self.tag), self.suite, keys, *self.session_params])

    def to_line(self) -> str:
        return f"a=crypto:{self}"


def generate_crypto(tag: int, suite: str = "AES_CM_128_HMAC_SHA1_80") -> CryptoAttribute:
    """Fresh random key||salt for ``suite`` (C's own keys for each leg, spec §7)."""
    info = suite_info(suite)
    return CryptoAttribute(tag, suite, (KeyParams(secrets.token_bytes(info.key_salt_bytes)),))


def check_usable(attr: CryptoAttribute) -> SuiteInfo:
    """Raise unless this attribute can drive an ``SrtpContext`` here (call at negotiation time)."""
    info = suite_info(attr.suite)
    if len(attr.keys) != 1:
        raise SrtpUnsupportedError("several master keys (MKI) are not supported")
    key = attr.keys[0]
    if len(key.key_salt) != info.key_salt_bytes:
        raise SdesError(f"{attr.suite} needs {info.key_salt_bytes} key||salt bytes, got {len(key.key_salt)}")
    if key.mki_length:
        raise SrtpUnsupportedError("MKI in SRTP packets is not supported by pylibsrtp")
    if attr.session_params:
        raise SrtpUnsupportedError(f"session parameters {attr.session_params} are not supported")
    return info


def negotiate(
    offered: list[CryptoAttribute], allowed: tuple[str, ...] = DEFAULT_SUITES
) -> CryptoAttribute | None:
    """The first offered attribute (offerer's preference, RFC 4568 §7.1.1) we can use, or None."""
    for attr in offered:
        if attr.suite not in allowed:
            continue
        try:
            check_usable(attr)
        except SdesError:
            continue
        return attr
    return None


# -- SRTP contexts ------------------------------------------------------------------------------


class Direction(enum.Enum):
    INBOUND = "inbound"  # unprotect what the peer sent with its key
    OUTBOUND = "outbound"  # protect with our key


class SrtpContext:
    """One direction of one SRTP session (any SSRC), RTP and RTCP.

    ``native``: None = the native binding when available (``fastpath.native_srtp()``), True
    requires it, False = pylibsrtp. Both produce the same bytes and raise the same errors.
    """

    def __init__(
        self, suite: str, key_salt: bytes, direction: Direction, *, native: bool | None = None
    ) -> None:
        info = suite_info(suite)
        if len(key_salt) != info.key_salt_bytes:
            raise SdesError(f"{suite} needs {info.key_salt_bytes} key||salt bytes, got {len(key_salt)}")
        required = native is True
        if native is None:
            native = fastpath.native_srtp()
        self.suite = suite
        self.direction = direction
        self.key_salt = key_salt  # the SDES master key||salt (C's kernel SRTP flows derive from it)
        # SSRC -> the ROC a kernel SRTP flow left this key at (libsrtp's own getter does not see
        # a ROC set for its next packet, srtp_set_stream_roc's "pending" one)
        self.kernel_roc: dict[int, int] = {}
        self._session: pylibsrtp.Session | SrtpSession
        self.native: SrtpSession | None = None
        if native:
            if not _NATIVE_ERR:
                raise SrtpUnsupportedError("the native fast path was built without libsrtp2")
            try:
                self.native = _native.SrtpSession(info.profile, key_salt, direction is Direction.OUTBOUND)
            except _OTHER_ERR as exc:  # e.g. a libsrtp2 without GCM: pylibsrtp, Python path
                if required:
                    raise SrtpUnsupportedError(f"crypto suite {suite}: native libsrtp2: {exc}") from None
                log.warning("crypto suite %s: native libsrtp2 refused it (%s): pylibsrtp instead", suite, exc)
        if self.native is not None:
            self._session = self.native
        else:
            ssrc_type = (
                pylibsrtp.Policy.SSRC_ANY_INBOUND
                if direction is Direction.INBOUND
                else pylibsrtp.Policy.SSRC_ANY_OUTBOUND
            )
            policy = pylibsrtp.Policy(key=key_salt, ssrc_type=ssrc_type, srtp_profile=info.profile)
            self._session = pylibsrtp.Session(policy)

    @classmethod
    def from_crypto(
        cls, attr: CryptoAttribute, direction: Direction, *, native: bool | None = None
    ) -> SrtpContext:
        check_usable(attr)
        return cls(attr.suite, attr.key_salt, direction, native=native)

    def protect(self, packet: bytes) -> bytes:
        return self._call(self._session.protect, packet)

    def protect_rtcp(self, packet: bytes) -> bytes:
        return self._call(self._session.protect_rtcp, packet)

    def unprotect(self, packet: bytes) -> bytes:
        return self._call(self._session.unprotect, packet)

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        return self._call(self._session.unprotect_rtcp, packet)

    @staticmethod
    def _call(fn: Callable[[bytes], bytes], packet: bytes) -> bytes:
        try:
            return fn(packet)
        except pylibsrtp.Error as exc:
            raise _srtp_error(str(exc)) from None
        except _NATIVE_AUTH as exc:
            raise SrtpAuthError(str(exc.args[0])) from None
        except _OTHER_ERR as exc:
            raise SrtpError(str(exc.args[0] if exc.args else exc)) from None


def _srtp_error(reason: str) -> SrtpError:
    if "authentication" in reason or "replay" in reason or "index" in reason:
        return SrtpAuthError(reason)
    return SrtpError(reason)


_Op = Callable[[bytes], bytes] | None


class SrtpTranscoder:
    """C's per-direction B2BUA transform: unprotect with ``inbound``, protect with ``outbound``.

    Either side may be None for plain RTP (an inside endpoint that did not offer SRTP).
    Satisfies ``media_relay.table.Transcoder``; ``auth_failures`` counts packets refused by
    SRTP authentication or the replay check. When every context given is native (or none is
    given and the native binding is available), ``native`` is a ``_fastpath.Transcoder`` that
    does the work and the counting, for Python here and for the native forwarder alike;
    otherwise each packet calls pylibsrtp's ``Session`` directly (one Python frame).
    """

    __slots__ = ("_auth_failures", "_rtcp", "_rtp", "inbound", "native", "outbound")

    def __init__(self, inbound: SrtpContext | None, outbound: SrtpContext | None) -> None:
        if inbound is not None and inbound.direction is not Direction.INBOUND:
            raise ValueError("inbound context must have Direction.INBOUND")
        if outbound is not None and outbound.direction is not Direction.OUTBOUND:
            raise ValueError("outbound context must have Direction.OUTBOUND")
        self.inbound = inbound
        self.outbound = outbound
        self._auth_failures = 0
        given = [c for c in (inbound, outbound) if c is not None]
        self.native: Transcoder | None = None
        if _NATIVE_ERR and (all(c.native is not None for c in given) if given else fastpath.native_srtp()):
            self.native = _native.Transcoder(
                None if inbound is None else inbound.native, None if outbound is None else outbound.native
            )
        i = None if inbound is None else inbound._session
        o = None if outbound is None else outbound._session
        self._rtp: tuple[_Op, _Op] = (None if i is None else i.unprotect, None if o is None else o.protect)
        self._rtcp: tuple[_Op, _Op] = (
            None if i is None else i.unprotect_rtcp,
            None if o is None else o.protect_rtcp,
        )

    @property
    def auth_failures(self) -> int:
        native = self.native
        return self._auth_failures + (0 if native is None else native.auth_failures)

    def count_auth_failures(self, n: int) -> None:
        """Packets of this transform that C's kernel SRTP flow refused (kernel_srtp.py)."""
        self._auth_failures += n

    def transcode(self, data: bytes, rtcp: bool) -> bytes:
        native = self.native
        if native is not None:
            try:
                return native.transcode(data, rtcp)
            except _NATIVE_AUTH as exc:  # counted by the native transcoder
                raise SrtpAuthError(str(exc.args[0])) from None
            except _OTHER_ERR as exc:
                raise SrtpError(str(exc.args[0] if exc.args else exc)) from None
        unprotect, protect = self._rtcp if rtcp else self._rtp
        try:
            plain = data if unprotect is None else unprotect(data)
            return plain if protect is None else protect(plain)
        except pylibsrtp.Error as exc:
            error = _srtp_error(str(exc))
            if isinstance(error, SrtpAuthError):
                self._auth_failures += 1
            raise error from None
        except _NATIVE_AUTH as exc:  # a native context next to a pylibsrtp one
            self._auth_failures += 1
            raise SrtpAuthError(str(exc.args[0])) from None
        except _OTHER_ERR as exc:
            raise SrtpError(str(exc.args[0] if exc.args else exc)) from None
