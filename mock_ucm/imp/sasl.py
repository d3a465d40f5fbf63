"""SASL mechanisms of the lab IM&P (RFC 6120 §6, spec §6): pure decoding, no I/O.

* ``PLAIN`` (RFC 4616): ``authzid \\0 authcid \\0 password``.
* ``CISCO-VTG-TOKEN`` (IM&P's own, spec §6 [capture]): ``userid=<jid>\\0token=<token>``.
* ``X-OAUTH2`` (the Google-style OAuth bearer mechanism Jabber uses): ``authzid \\0 user \\0 token``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from enum import Enum

from edge.xmpp.jid import InvalidJid, Jid, normalize_local

MECHANISMS = ("PLAIN", "CISCO-VTG-TOKEN", "X-OAUTH2")


class CredentialKind(Enum):
    PASSWORD = "password"
    TOKEN = "token"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a SASL payload claims: a user (localpart) and a password or token."""

    username: str
    secret: str
    kind: CredentialKind


class SaslFailure(Exception):
    """A payload that cannot be checked; ``condition`` is an RFC 6120 §6.5 failure condition."""

    def __init__(self, condition: str, text: str = "") -> None:
        super().__init__(condition, text)
        self.condition = condition
        self.text = text


def decode_payload(text: str) -> bytes:
    """The base64 of an ``<auth/>`` or ``<response/>``; ``=`` means an empty response (§6.4.2)."""
    text = "".join(text.split())
    if text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SaslFailure("incorrect-encoding", "payload is not base64") from exc


def _username(identity: str, domain: str) -> str:
    """``alice`` or ``alice@example.com`` → ``alice``; another domain is not ours."""
    try:
        if "@" not in identity:
            return normalize_local(identity)
        jid = Jid.parse(identity)
    except InvalidJid as exc:
        raise SaslFailure("not-authorized", "malformed user name") from exc
    if jid.domain != domain or not jid.local:
        raise SaslFailure("not-authorized", "user not in this domain")
    return jid.local


def _text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SaslFailure("malformed-request", "payload is not UTF-8") from exc


def parse_credentials(mechanism: str, payload: bytes, domain: str) -> Credentials:
    """Decode one mechanism's initial response into `Credentials` or raise `SaslFailure`."""
    text = _text(payload)
    if mechanism in ("PLAIN", "X-OAUTH2"):
        parts = text.split("\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise SaslFailure("malformed-request", f"{mechanism} needs authzid\\0user\\0secret")
        authzid, user, secret = parts
        username = _username(user, domain)
        if authzid and _username(authzid, domain) != username:
            raise SaslFailure("invalid-authzid", "cannot act on behalf of another user")
        kind = CredentialKind.PASSWORD if mechanism == "PLAIN" else CredentialKind.TOKEN
        return Credentials(username, secret, kind)
    if mechanism == "CISCO-VTG-TOKEN":
        fields = dict(part.partition("=")[::2] for part in text.split("\0") if part)
        userid, token = fields.get("userid", ""), fields.get("token", "")
        if not userid or not token:
            raise SaslFailure("malformed-request", "CISCO-VTG-TOKEN needs userid= and token=")
        return Credentials(_username(userid, domain), token, CredentialKind.TOKEN)
    raise SaslFailure("invalid-mechanism", f"mechanism {mechanism!r} not offered")
