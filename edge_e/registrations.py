"""The MRA registrations Expressway-E counts (spec §8: current and peak): AOR → binding → expiry.

E is a stateless proxy, so it learns registrations only from the registrar's 2xx answers to
REGISTER, which list every current binding of the AOR (RFC 3261 §10.3 step 8). Both of E's
paths feed `RegistrationTable.track`: the full parser's (`edge_e.sip`) and the byte-level fast
path's (`edge_e.sip_fast`), with the header values as written.
"""

from __future__ import annotations

import re

from edge.sip.errors import SipParseError
from edge.sip.message import _small_int

_INSTANCE_RE = re.compile(r';\s*\+sip\.instance\s*=\s*("[^"]*"|[^;\s]+)', re.IGNORECASE)
_EXPIRES_RE = re.compile(r";\s*expires\s*=\s*([0-9]{1,10})\s*(?:;|\Z)", re.IGNORECASE)


def _uri_text(value: str) -> str:
    """The URI of a name-addr / addr-spec value as written (between <> or before the first ';')."""
    lt = value.find("<")
    if lt >= 0:
        gt = value.find(">", lt)
        return value[lt + 1 : gt if gt > lt else len(value)].strip()
    return value.split(";", 1)[0].strip()


_BINDINGS: dict[str, tuple[str, int | None]] = {}
_BINDINGS_MAX = 8192  # a registrar's 200 repeats each client's Contact on every refresh


def _binding_of(contact: str) -> tuple[str, int | None]:
    """(+sip.instance or the contact URI, the expires parameter) of one Contact value; the
    header parameters are those after the '>' of a name-addr (RFC 3261 §20.10). Memoised."""
    found = _BINDINGS.get(contact)
    if found is None:
        if len(_BINDINGS) >= _BINDINGS_MAX:
            _BINDINGS.clear()
        found = _BINDINGS[contact] = _read_binding(contact)
    return found


def _read_binding(contact: str) -> tuple[str, int | None]:
    gt = contact.rfind(">")
    params = contact[gt + 1 :] if gt >= 0 else contact[contact.find(";") :] if ";" in contact else ""
    instance = _INSTANCE_RE.search(params)
    expires = _EXPIRES_RE.search(params)
    return (
        instance.group(1) if instance else _uri_text(contact),
        int(expires.group(1)) if expires else None,
    )


class RegistrationTable:
    """MRA registrations seen through E (current and peak since start): AOR → contact → expiry."""

    def __init__(self) -> None:
        self._by_aor: dict[str, dict[str, float]] = {}
        self._count = 0
        self.peak = 0

    def replace(self, aor: str, bindings: dict[str, int], now: float) -> None:
        """A registrar's 2xx lists every current binding of the AOR (RFC 3261 §10.3 step 8)."""
        old = self._by_aor.pop(aor, {})
        fresh = {contact: now + expires for contact, expires in bindings.items() if expires > 0}
        if fresh:
            self._by_aor[aor] = fresh
        self._count += len(fresh) - len(old)
        self.peak = max(self.peak, self._count)

    def track(self, to: str | None, contacts: list[str], expires_header: str | None, now: float) -> None:
        """Count the bindings a registrar's 2xx lists. Only the parts counting needs are read
        (To's URI; each Contact's +sip.instance, expires and URI text), not whole addresses."""
        if to is None:
            return
        try:
            default = _small_int(expires_header, None) or 0
        except SipParseError:
            default = 0
        bindings: dict[str, int] = {}
        for contact in contacts:
            key, expires = _binding_of(contact)
            bindings[key] = default if expires is None else expires
        self.replace(_uri_text(to), bindings, now)

    def purge(self, now: float) -> None:
        for aor in list(self._by_aor):
            entries = self._by_aor[aor]
            live = {c: t for c, t in entries.items() if t > now}
            if len(live) != len(entries):
                self._count -= len(entries) - len(live)
                if live:
                    self._by_aor[aor] = live
                else:
                    del self._by_aor[aor]

    def current(self, now: float) -> int:
        self.purge(now)
        return self._count
