"""XMPP addresses (RFC 7622), with the basic checks a lab server needs.

Not a full PRECIS implementation: local and domain parts are NFKC-normalised and case-folded,
the resource is NFC-normalised and kept as is; lengths and forbidden characters are checked.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

MAX_PART_BYTES = 1023  # RFC 7622 §3.2-3.4
# RFC 7622 §3.3.1: characters a localpart can never contain.
_LOCAL_FORBIDDEN = frozenset("\"&'/:<>@")
_DOMAIN_FORBIDDEN = frozenset(" \"&'/:<>@\\")


class InvalidJid(ValueError):
    """The string is not a valid JID."""


def _check_part(part: str, what: str) -> None:
    if not part:
        raise InvalidJid(f"empty {what}")
    if len(part.encode("utf-8")) > MAX_PART_BYTES:
        raise InvalidJid(f"{what} longer than {MAX_PART_BYTES} bytes")
    if any(unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") for c in part):
        raise InvalidJid(f"{what} contains a control or unassigned character")


def normalize_local(local: str) -> str:
    local = unicodedata.normalize("NFKC", local).casefold()
    _check_part(local, "localpart")
    if any(c in _LOCAL_FORBIDDEN or c.isspace() for c in local):
        raise InvalidJid(f"localpart {local!r} contains a forbidden character")
    return local


def normalize_domain(domain: str) -> str:
    domain = unicodedata.normalize("NFKC", domain).casefold().removesuffix(".")
    _check_part(domain, "domainpart")
    if domain.startswith("[") and domain.endswith("]"):
        return domain  # IPv6 literal, RFC 7622 §3.2
    if any(c in _DOMAIN_FORBIDDEN or c.isspace() for c in domain):
        raise InvalidJid(f"domainpart {domain!r} contains a forbidden character")
    if any(not label or len(label) > 63 for label in domain.split(".")):
        raise InvalidJid(f"domainpart {domain!r} has an empty or over-long label")
    return domain


def normalize_resource(resource: str) -> str:
    resource = unicodedata.normalize("NFC", resource)
    _check_part(resource, "resourcepart")
    return resource


@dataclass(frozen=True, slots=True)
class Jid:
    """``local@domain/resource``; ``local`` and ``resource`` may be empty strings."""

    local: str
    domain: str
    resource: str = ""

    @classmethod
    def parse(cls, text: str) -> Jid:
        """Split per RFC 7622 §3.1 (resource first, then local) and normalise each part."""
        rest, slash, resource = text.partition("/")
        local, at, domain = rest.rpartition("@")
        if slash and not resource:
            raise InvalidJid("empty resourcepart after '/'")
        if at and not local:
            raise InvalidJid("empty localpart before '@'")
        return cls(
            normalize_local(local) if at else "",
            normalize_domain(domain),
            normalize_resource(resource) if slash else "",
        )

    @property
    def bare(self) -> Jid:
        return Jid(self.local, self.domain) if self.resource else self

    @property
    def is_bare(self) -> bool:
        return not self.resource

    def with_resource(self, resource: str) -> Jid:
        return Jid(self.local, self.domain, normalize_resource(resource))

    def __str__(self) -> str:
        text = f"{self.local}@{self.domain}" if self.local else self.domain
        return f"{text}/{self.resource}" if self.resource else text
