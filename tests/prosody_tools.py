"""A real Prosody (Debian's 0.12) as the IM&P node, for the interop test and the XMPP benchmark.

shared/TOOLS.md: Prosody needs `lua-unbound`; as root it needs `run_as_root = true`; it runs in
the foreground (`prosody --config FILE -F`) with its own data_path, pidfile and ports; users are
added with `prosodyctl --config FILE register USER HOST PASS`. The server listens like the lab's
IM&P node (spec §2, §6): c2s with mandatory STARTTLS on `client_port` for inside clients, c2s
direct TLS on `edge_port` for Expressway-C. Every user is in one shared roster group
(`mod_groups`), so everyone sees everyone's presence as on the lab IM&P. The process is ours,
owned by a context manager and stopped by its own PID; readiness is a listening socket.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.sip_tools import require, stop_process, tcp_listening, wait_for

START_TIMEOUT_S = 20.0
REGISTER_TIMEOUT_S = 30.0


def _lua(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class ProsodyServer:
    """One Prosody process on `address` serving `domain` (`with ProsodyServer(...) as server:`)."""

    workdir: Path
    address: str
    domain: str
    cert_path: Path
    key_path: Path
    client_port: int
    edge_port: int | None = None
    users: Sequence[tuple[str, str]] = ()
    extra_config: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def config_path(self) -> Path:
        return self.workdir / "prosody.cfg.lua"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prosody.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def write_config(self) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (self.workdir / "certs").mkdir(exist_ok=True)  # an empty certificate directory: no noise
        groups = self.workdir / "groups.txt"
        groups.write_text("[Lab]\n" + "".join(f"{u}@{self.domain}\n" for u, _ in self.users))
        direct = f"c2s_direct_tls_ports = {{ {self.edge_port} }}\n" if self.edge_port else ""
        log = _lua(str(self.log_path))
        ssl = f"{{ certificate = {_lua(str(self.cert_path))}; key = {_lua(str(self.key_path))}; }}"
        self.config_path.write_text(
            "-- written by tests/prosody_tools.py\n"
            "run_as_root = true\n"
            "daemonize = false\n"
            f"pidfile = {_lua(str(self.workdir / 'prosody.pid'))}\n"
            f"data_path = {_lua(str(data))}\n"
            f"certificates = {_lua(str(self.workdir / 'certs'))}\n"
            f"log = {{ {{ levels = {{ min = 'info' }}; to = 'file'; filename = {log} }} }}\n"
            f"interfaces = {{ {_lua(self.address)} }}\n"
            f"local_interfaces = {{ {_lua(self.address)} }}\n"
            f"c2s_ports = {{ {self.client_port} }}\n"
            f"{direct}"
            "s2s_ports = { }\n"
            "c2s_require_encryption = true\n"
            "authentication = 'internal_plain'\n"
            "storage = 'internal'\n"
            "modules_enabled = { 'roster'; 'saslauth'; 'tls'; 'disco'; 'ping'; 'groups'; 'posix' }\n"
            "modules_disabled = { 's2s'; 'offline' }\n"
            f"groups_file = {_lua(str(groups))}\n"
            f"ssl = {ssl}\n"
            f"{self.extra_config}\n"
            f"VirtualHost {_lua(self.domain)}\n"
            f"    ssl = {ssl}\n"
        )

    def register_users(self) -> None:
        prosodyctl = require("prosodyctl")
        for user, password in self.users:
            subprocess.run(
                [prosodyctl, "--config", str(self.config_path), "register", user, self.domain, password],
                check=True,
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=REGISTER_TIMEOUT_S,
            )

    def start(self) -> None:
        binary = require("prosody")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self.register_users()
        self.proc = subprocess.Popen(
            [binary, "--config", str(self.config_path), "-F"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
        )
        ports = [self.client_port] + ([self.edge_port] if self.edge_port else [])
        for port in ports:
            wait_for(self._listening(port), START_TIMEOUT_S, f"prosody listening on {self.address}:{port}")

    def _listening(self, port: int) -> Callable[[], bool]:
        return lambda: tcp_listening((self.address, port)) or self._died()

    def _died(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prosody exited {self.proc.returncode}:\n{self.log_text()[-4000:]}")
        return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ProsodyServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
