"""The knobs of one `edge load` run, validated up front (every loop bounded in count and time)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MAX_USERS = 100_000
MAX_DURATION_S = 24 * 3600.0
MAX_CALLS = 1_000_000


class LoadSettingsError(ValueError):
    """A setting that cannot work; the message names the option and the reason."""


@dataclass(frozen=True)
class LoadSettings:
    users: int = 10
    """Users to sign in (user_pattern with n = first_index … first_index + users - 1)."""
    signin_rate_per_s: float = 10.0
    signin_concurrency: int = 64
    """Sign-ins in flight at most (a slow edge slows the ramp instead of piling up)."""
    calls: int = 0
    """Calls to place in total."""
    call_rate_per_s: float = 1.0
    hold_s: float = 10.0
    call_to: str = "9999"
    """A number to call (the lab's echo test by default) or `users` for calls between users."""
    messages_per_min: float = 0.0
    duration_s: float = 60.0
    """The run stops this long after it started, whatever is still in progress."""
    user_pattern: str = "load{n:05d}"
    password_pattern: str = "lab-pass"
    first_index: int = 1
    xmpp: bool = True
    sip_only: bool = False
    """Load-test shortcut (`sip_only.py`): get_edge_config, UDS and TFTP once for the run, not per
    user; each user does discovery, SIP connect, REGISTER and STUN. Real clients never do this."""
    suite: str = "AES_CM_128_HMAC_SHA1_80"
    register_expires_s: int = 3600
    """Asked for; the registrar grants its own (UCM: 120 s for MRA clients) and we refresh at half."""
    stun_interval_s: float = 30.0
    """MRA HA keepalive on the SIP flow (spec §5)."""
    xmpp_keepalive_s: float = 60.0
    sample_interval_s: float = 1.0
    stop_timeout_s: float = 30.0
    """Bound on hang-up and sign-out at the end (or after Ctrl-C)."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise LoadSettingsError("; ".join(problems))

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.users <= MAX_USERS:
            out.append(f"--users must be within 1..{MAX_USERS}")
        for name, value in (
            ("--rate", self.signin_rate_per_s),
            ("--call-rate", self.call_rate_per_s),
            ("--hold", self.hold_s),
            ("--duration", self.duration_s),
            ("--stun-interval", self.stun_interval_s),
        ):
            if not value > 0:
                out.append(f"{name} must be > 0")
        if self.duration_s > MAX_DURATION_S:
            out.append(f"--duration must be at most {MAX_DURATION_S:.0f} s")
        if not 0 <= self.calls <= MAX_CALLS:
            out.append(f"--calls must be within 0..{MAX_CALLS}")
        if self.messages_per_min < 0:
            out.append("--messages-per-min must be >= 0")
        if self.messages_per_min > 0 and not self.xmpp:
            out.append("--messages-per-min needs XMPP (drop --no-xmpp)")
        if self.signin_concurrency < 1:
            out.append("--concurrency must be >= 1")
        if self.first_index < 0:
            out.append("--first must be >= 0")
        if self.call_to == "users" and self.calls and self.users < 2:
            out.append("--call-to users needs at least 2 users")
        for name, pattern in (("--user-pattern", self.user_pattern), ("--password", self.password_pattern)):
            try:
                pattern.format(n=1)
            except (KeyError, IndexError, ValueError) as exc:
                out.append(f"{name} {pattern!r}: bad pattern ({exc}); use {{n}} or {{n:05d}} for the index")
        if "{" not in self.user_pattern:
            out.append("--user-pattern must contain {n} (every user needs its own name)")
        return out

    def username(self, i: int) -> str:
        return self.user_pattern.format(n=self.first_index + i)

    def password(self, i: int) -> str:
        return self.password_pattern.format(n=self.first_index + i)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
