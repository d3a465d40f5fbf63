"""The lab's one typed configuration model.

Every default is embedded here, so the lab runs with no file at all (spec §9). A TOML file
overrides any key; environment variables ``EDGE__SECTION__KEY=value`` and CLI ``--set
section.key=value`` override the file. Unknown keys and bad values fail fast with the key's
dotted path and the reason (pydantic's ``extra="forbid"`` and validators).

Addresses: each process binds its own loopback address so the lab mirrors the real split
(outside / DMZ / inside) on one host. The 127.10.0.0/16 plan:

* 127.10.0.53        lab DNS (split horizon: inside clients get the internal view)
* 127.10.1.0/24      outside-facing: Expressway-E's external address
* 127.10.2.0/24      DMZ: Expressway-E's internal address (traversal listeners)
* 127.10.3.0/24      inside: Expressway-C, Unified CM, IM&P, Unity Connection
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the key and the reason."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _check_ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise ValueError(f"not an IP address: {value!r}") from exc
    return value


Port = Annotated[int, Field(ge=0, le=65535)]


class LabSettings(_Model):
    """Lab-wide settings."""

    domain: str = "example.com"
    """The edge domain and the UC (presence) domain: users sign in as user@domain."""
    state_dir: str = Field(
        default_factory=lambda: os.environ.get("EDGE_STATE_DIR", "~/.local/state/edge-lab")
    )
    """Where certificates, the effective config, pids and logs live."""
    ready_timeout_s: float = 20.0
    stop_timeout_s: float = 10.0
    demo: bool = True
    """Run the demo MRA flow after `edge lab up` brings every component up."""
    admin_username: str = "admin"
    admin_password: str = "lab-admin-pass"
    """Credentials of the admin API (never a lab user's)."""

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser()


class DnsSettings(_Model):
    name: str = "dns"
    address: str = "127.10.0.53"
    port: Port = 53
    admin_port: Port = 9080
    internal_clients: list[str] = ["127.10.2.0/24", "127.10.3.0/24"]
    """Source prefixes that get the internal view (BIND match-clients); everyone else is outside."""
    ttl_s: int = 300

    _ip = field_validator("address")(classmethod(lambda cls, v: _check_ip(v)))

    @field_validator("internal_clients")
    @classmethod
    def _nets(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"not a network prefix: {net!r}") from exc
        return value


class ZoneClientSettings(_Model):
    """C's side of the Unified Communications traversal zone (spec §1–3)."""

    name: str = "CollaborationEdgeZone"
    peers: list[str] = ["expe"]
    """Names of the Expressway-E nodes (up to 6) this C keeps channels to."""
    username: str = "traversal"
    password: str = "lab-traversal-pass"
    keepalive_interval_s: float = 5.0
    keepalive_timeout_s: float = 15.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    connect_timeout_s: float = 5.0
    max_hops: int = 15
    """Max-Forwards on the zone; a request beyond gets 483 (spec §5)."""

    @field_validator("peers")
    @classmethod
    def _peer_count(cls, value: list[str]) -> list[str]:
        if not 1 <= len(value) <= 6:
            raise ValueError("a traversal zone has 1 to 6 Expressway-E peers")
        return value


class AccessControl(_Model):
    """MRA access-control settings on C (spec §4), lab defaults."""

    authorize_by_oauth_refresh: bool = True
    authorize_by_oauth_sso: bool = False
    authorize_by_user_credential: bool = True
    """Off in the real product's defaults; the lab turns it on so Basic works out of the box."""
    check_internal_auth_availability: bool = False
    sip_token_extra_ttl_s: int = 0
    credentials_refresh_min: float = 480
    credentials_cleanup_min: float = 720
    auth_rate_max: int = 8
    auth_rate_window_s: int = 300


class AllowRule(_Model):
    url: str
    methods: list[str] = []
    match: Literal["exact", "prefix"] = "prefix"
    deployment: str = ""
    description: str = ""


class ExpcSettings(_Model):
    """Expressway-C: the inside gateway."""

    name: str = "expc"
    fqdn: str = "expc.example.com"
    cluster_name: str = "expc-cluster.example.com"
    """The name E's zone checks in C's certificate ("TLS verify subject name")."""
    address: str = "127.10.3.10"
    admin_port: Port = 9080
    sip_tls_port: Port = 5061
    sip_tcp_port: Port = 5060
    media_port_min: Port = 36000
    media_port_max: Port = 59999
    ucm_transport: Literal["tcp", "tls"] = "tcp"
    sip_path_headers: bool = False
    """Off: rewrite Contact and keep the client's in orig-hostport. On: add a Path header (RFC 3327)."""
    ucm_keepalive_interval_s: float = 30.0
    aes_gcm: bool = False
    """The per-UCM "AES GCM" option: offer the AEAD suites on the outside leg."""
    media_threads: int = Field(default=1, ge=1, le=16)
    """Forwarder threads of C's media relay: 1 reads every port from the event loop; more spread
    the ports over that many forwarders, the others served by threads of their own without the
    GIL, so SRTP transcoding uses more than one core (``EDGE_MEDIA_THREADS`` when 1)."""
    media_send_helper: bool = False
    """With one io_uring forwarder: while it is saturated, a second thread sends half of the
    flows' datagrams from another core (``EDGE_MEDIA_HELPER=1`` when false). Lends the relay
    other cores' idle time; costs about 20 % more CPU while active."""
    media_kernel_srtp: bool = False
    """Transcode established SRTP flows in the kernel (``media_relay/kernel_srtp.py``: an eBPF
    program on ``lo`` that checks, decrypts and encrypts AES_CM_128_HMAC_SHA1_80/_32 RTP; root,
    Linux 6.10+ with the BPF crypto kfuncs, every media address on 127.0.0.0/8). C's relay
    process then sees a leg's first packets, RTCP, strangers and refused packets only. Falls
    back to the native path, with a warning, where it cannot run (``EDGE_MEDIA_KERNEL=1`` turns
    it on too)."""
    zone: ZoneClientSettings = ZoneClientSettings()
    access: AccessControl = AccessControl()
    allow_rules: list[AllowRule] = []
    ucm_publishers: list[str] = []
    """Unified CM servers configured on C (names of `ucm` nodes, one per cluster): "refresh servers"
    discovers the other nodes of each cluster with UDS `servers` (spec §8). Empty: the first node."""
    imp_publishers: list[str] = []
    """IM&P servers configured on C (names of `imp` nodes): "refresh servers" discovers the rest of
    their cluster over AXL `listProcessNode`. Empty: every `imp` node is configured."""
    cuc_publishers: list[str] = []
    """Unity Connection servers configured on C (names of `cuc` nodes): "refresh servers" discovers
    the rest of their cluster with VMREST `cluster`. Empty: every `cuc` node is configured."""
    refresh_servers_on_start: bool = True
    """Refresh servers when C starts; off, C knows only the configured servers until an admin
    refreshes them (as after adding a Unified CM server on the real product)."""

    _ip = field_validator("address")(classmethod(lambda cls, v: _check_ip(v)))


class ExpeSettings(_Model):
    """Expressway-E: the DMZ edge."""

    name: str = "expe"
    fqdn: str = "expe.example.com"
    external_address: str = "127.10.1.10"
    internal_address: str = "127.10.2.10"
    admin_port: Port = 9080
    https_port: Port = 8443
    sip_tls_port: Port = 5061
    sip_tcp_port: Port | None = None
    """Off by default (spec §2)."""
    xmpp_port: Port = 5222
    media_port_min: Port = 36002
    media_port_max: Port = 59999
    media_kernel_forwarding: bool = False
    """Forward established media flows in the kernel (an eBPF program on ``lo``; root, Linux
    6.6+, every media address on 127.0.0.0/8): E's relay process then sees only the first packets
    of a leg, strangers and garbage. Falls back to the native path, with a warning, where it
    cannot run. ``EDGE_MEDIA_KERNEL=1`` turns it on too (``media_relay/kernel.py``)."""
    traversal_sip_port: Port = 7001
    tunnel_port: Port = 2222
    traversal_xmpp_port: Port = 7400
    demux_rtp_port: Port = 2776
    demux_rtcp_port: Port = 2777
    tls_verify_subject_name: str = "expc-cluster.example.com"
    zone_credentials: dict[str, str] = {"traversal": "lab-traversal-pass"}
    """E's local authentication database for traversal clients."""
    max_http_body_bytes: int = 1_048_576

    _ip = field_validator("external_address", "internal_address")(classmethod(lambda cls, v: _check_ip(v)))


class InsideNode(_Model):
    """A server inside the enterprise (UCM, IM&P, Unity Connection node)."""

    name: str
    fqdn: str
    address: str
    admin_port: Port = 9080
    external: bool = False
    """A real server run outside the lab (e.g. Prosody as the IM&P): the supervisor does not start
    it, but DNS, certificates and Expressway-C still point at it."""

    _ip = field_validator("address")(classmethod(lambda cls, v: _check_ip(v)))


class UcmNode(InsideNode):
    sip_tcp_port: Port = 5060
    sip_tls_port: Port = 5061
    https_port: Port = 8443
    tftp_http_port: Port = 6970
    tftp_https_port: Port = 6972


class ImpNode(InsideNode):
    client_port: Port = 5222
    """Inside clients: plain TCP with mandatory STARTTLS."""
    edge_port: Port = 7400
    """Expressway-C: direct TLS (spec §2)."""
    https_port: Port = 8443
    cluster_extra: list[str] = []
    """FQDNs this node's AXL lists as cluster members besides the lab's `imp` nodes: nodes the lab
    neither runs nor configures anywhere else (known only to the publisher)."""


class CucNode(InsideNode):
    https_port: Port = 443
    cluster_extra: list[str] = []
    """FQDNs this node's VMREST `cluster` lists besides the lab's `cuc` nodes (known only to it)."""


class User(_Model):
    username: str
    dn: str
    password: str = "lab-pass"
    display_name: str = ""
    devices: list[str] = []
    """Device names; empty means the default CSF<USERNAME> (Jabber softphone)."""
    digest_auth: bool = False

    @property
    def device_names(self) -> list[str]:
        return self.devices or [f"CSF{self.username.upper()}"]


def _default_users() -> list[User]:
    return [
        User(username="alice", dn="1001", display_name="Alice Example"),
        User(username="bob", dn="1002", display_name="Bob Example"),
    ]


class LoadPopulation(_Model):
    count: int = 0
    """Generated users load00001…, DNs from first_dn, same password (spec §9)."""
    first_dn: int = 20001
    password: str = "lab-pass"

    @field_validator("count")
    @classmethod
    def _count(cls, value: int) -> int:
        if not 0 <= value <= 100_000:
            raise ValueError("load population count must be within 0..100000")
        return value


class LabConfig(_Model):
    lab: LabSettings = LabSettings()
    dns: DnsSettings = DnsSettings()
    expe: list[ExpeSettings] = [ExpeSettings()]
    expc: ExpcSettings = ExpcSettings()
    ucm: list[UcmNode] = [UcmNode(name="ucm1", fqdn="ucm1.example.com", address="127.10.3.20")]
    imp: list[ImpNode] = [ImpNode(name="imp1", fqdn="imp1.example.com", address="127.10.3.30")]
    cuc: list[CucNode] = [CucNode(name="cuc1", fqdn="cuc1.example.com", address="127.10.3.40")]
    users: list[User] = Field(default_factory=_default_users)
    load: LoadPopulation = LoadPopulation()
    echo_number: str = "9999"

    @model_validator(mode="after")
    def _cross_checks(self) -> LabConfig:
        names = [self.dns.name, self.expc.name, *(e.name for e in self.expe)]
        names += [n.name for n in (*self.ucm, *self.imp, *self.cuc)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"component names must be unique, repeated: {', '.join(dupes)}")
        known = {e.name for e in self.expe}
        for peer in self.expc.zone.peers:
            if peer not in known:
                raise ValueError(f"expc.zone.peers names {peer!r}, which is not an expe node")
        if not self.ucm:
            raise ValueError("ucm: at least one Unified CM node is required")
        ucm_names = {n.name for n in self.ucm}
        for publisher in self.expc.ucm_publishers:
            if publisher not in ucm_names:
                raise ValueError(f"expc.ucm_publishers names {publisher!r}, which is not a ucm node")
        for role, publishers, nodes in (
            ("imp", self.expc.imp_publishers, self.imp),
            ("cuc", self.expc.cuc_publishers, self.cuc),
        ):
            for publisher in publishers:
                if publisher not in {n.name for n in nodes}:
                    raise ValueError(
                        f"expc.{role}_publishers names {publisher!r}, which is not a {role} node"
                    )
        dns_seen = {u.dn for u in self.users}
        if len(dns_seen) != len(self.users):
            raise ValueError("users: directory numbers must be unique")
        return self

    # -- derived views ------------------------------------------------------------------

    def all_users(self) -> list[User]:
        users = list(self.users)
        for i in range(self.load.count):
            users.append(
                User(
                    username=f"load{i + 1:05d}",
                    dn=str(self.load.first_dn + i),
                    password=self.load.password,
                )
            )
        return users

    def expe_node(self, name: str) -> ExpeSettings:
        for node in self.expe:
            if node.name == name:
                return node
        raise ConfigError(f"no expe node named {name!r}")

    def components(self) -> list[tuple[str, str]]:
        """(name, role) of every process, in start order: DNS, inside servers, C, then E."""
        out: list[tuple[str, str]] = [(self.dns.name, "dns")]
        out += [(n.name, "ucm") for n in self.ucm if not n.external]
        out += [(n.name, "imp") for n in self.imp if not n.external]
        out += [(n.name, "cuc") for n in self.cuc if not n.external]
        out += [(e.name, "expe") for e in self.expe]
        out.append((self.expc.name, "expc"))
        return out

    def role_of(self, name: str) -> str:
        for comp, role in self.components():
            if comp == name:
                return role
        roles = {role: comp for comp, role in reversed(self.components())}
        if name in roles:
            return roles[name]  # a role name picks its first node
        raise ConfigError(f"unknown component {name!r}; known: {', '.join(c for c, _ in self.components())}")

    def component_name(self, name: str) -> str:
        """Accept a role name ("ucm") for its first node ("ucm1")."""
        for comp, role in self.components():
            if name in (comp, role):
                return comp
        raise ConfigError(f"unknown component {name!r}; known: {', '.join(c for c, _ in self.components())}")

    def admin_endpoint(self, name: str) -> tuple[str, int]:
        """Where a component's admin HTTP (/status, /metrics) listens."""
        role = self.role_of(name)
        if role == "dns":
            return self.dns.address, self.dns.admin_port
        if role == "expc":
            return self.expc.address, self.expc.admin_port
        if role == "expe":
            node = self.expe_node(name)
            return node.internal_address, node.admin_port
        for n in (*self.ucm, *self.imp, *self.cuc):
            if n.name == name:
                return n.address, n.admin_port
        raise ConfigError(f"unknown component {name!r}")


# -- loading ----------------------------------------------------------------------------


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path}: {msg}")
    return f"invalid configuration ({source}):\n  " + "\n  ".join(lines)


def _parse_scalar(text: str) -> Any:
    """Parse an override value as TOML (numbers, booleans, lists, quoted strings) or a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = [k for k in dotted.split(".") if k]
    if not keys:
        raise ConfigError(f"empty override key in {dotted!r}")
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            try:
                node = node[int(key)]
            except (ValueError, IndexError) as exc:
                raise ConfigError(f"{'.'.join(keys[: i + 1])}: no list item {key!r}") from exc
            continue
        node = node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError) as exc:
            raise ConfigError(f"{dotted}: no list item {last!r}") from exc
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{dotted}: {'.'.join(keys[:-1])} is not a table")


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """EDGE__EXPC__SIP_PATH_HEADERS=true → ("expc.sip_path_headers", "true"). Lists: EDGE__EXPE__0__FQDN."""
    out = []
    for key, value in environ.items():
        if key.startswith("EDGE__") and len(key) > 6:
            out.append((".".join(part.lower() for part in key[6:].split("__")), value))
    return sorted(out)


def load_config(
    path: str | Path | None = None,
    *,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> LabConfig:
    """Defaults ← TOML file ← environment ← ``key=value`` overrides, validated once at the end."""
    data: dict[str, Any] = {}
    source = "embedded defaults"
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {p}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
        source = str(p)
    # Lists of nodes are replaced whole by a file; for dotted overrides into a list item we need
    # the defaults materialised first.
    base = LabConfig().model_dump(mode="python")
    merged = _deep_merge(base, data)
    env = env_overrides(os.environ if environ is None else environ)
    for dotted, raw in env:
        _apply_override(merged, dotted, _parse_scalar(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        dotted, raw = item.split("=", 1)
        _apply_override(merged, dotted.strip(), _parse_scalar(raw.strip()))
    if env or overrides:
        source += " + overrides"
    try:
        return LabConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def dump_toml(config: LabConfig) -> str:
    """Serialise the effective configuration as TOML (what `edge config show` prints)."""
    return _toml_table(config.model_dump(mode="json"), ())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def _toml_table(data: Mapping[str, Any], path: tuple[str, ...]) -> str:
    scalars, tables, arrays = [], [], []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict) and value and key != "zone_credentials":
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            scalars.append(f"{_toml_key(key)} = {_toml_value(value)}")
    out = []
    if scalars:
        if path:
            out.append(f"[{'.'.join(path)}]")
        out.extend(scalars)
        out.append("")
    for key, value in tables:
        out.append(_toml_table(value, (*path, key)))
    for key, items in arrays:
        for item in items:
            out.append(f"[[{'.'.join((*path, key))}]]")
            out.append(_inline_subtables(item))
            out.append("")
    return "\n".join(out)


def _inline_subtables(item: Mapping[str, Any]) -> str:
    lines = []
    for key, value in item.items():
        if value is None:
            continue
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines)
