"""Process management for the third-party SIP peers of tests/test_sip_interop.py.

sipp 3.6.1 here has no TLS (shared/TOOLS.md), so it talks plain TCP (`-t t1`, one connection) to
a local stunnel4 client that carries the bytes over TLS to Expressway-E, verifying E's certificate
against the lab CA. baresip is a real SIP UA with its own TLS stack; it is driven through its
ctrl_tcp module (netstring JSON commands and events). Every process is started by us, owned by a
context manager and stopped by its own PID; every wait has a deadline; nothing sleeps and hopes.
A missing tool fails the test (the packages come from scripts/install-system-deps).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edge.config import LabConfig
from edge.sip.message import Request, Response
from edge_c.sip import ExpcSip
from edge_c.sip_zone import ZoneSipConnection
from edge_e.sip import EdgeSip

SIPP_DIR = Path(__file__).resolve().parent / "sipp"
STOP_DEADLINE_S = 5.0
_TCP_LISTEN = "0A"

T = TypeVar("T")


def require(tool: str) -> str:
    """The tool's path; a missing tool fails the test (it must not silently skip)."""
    path = shutil.which(tool)
    if path is None:
        raise AssertionError(f"{tool} is not installed: run scripts/install-system-deps")
    return path


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Poll `probe` until it returns something truthy (returned), or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- /proc/net/tcp: who is listening / connected (IPv4 loopback only) ------------------------------


def _hex_addr(text: str) -> tuple[str, int]:
    ip_hex, port_hex = text.split(":")
    ip = socket.inet_ntoa(int(ip_hex, 16).to_bytes(4, "little"))
    return ip, int(port_hex, 16)


def _tcp_table() -> list[tuple[tuple[str, int], tuple[str, int], str]]:
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        rows.append((_hex_addr(fields[1]), _hex_addr(fields[2]), fields[3]))
    return rows


def tcp_listening(addr: tuple[str, int]) -> bool:
    return any(local == addr and state == _TCP_LISTEN for local, _, state in _tcp_table())


# -- owned processes ----------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> int:
    """Stop a process we started, by its PID: `sig`, then SIGKILL after a deadline."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(STOP_DEADLINE_S)
    return proc.returncode


class Stunnel:
    """A stunnel4 TLS client: plain TCP on `accept`, TLS to `connect` from source `local_ip`,
    verifying the server chain against `ca_file` and its name against `check_host`."""

    def __init__(
        self, *, local_ip: str, connect: tuple[str, int], ca_file: Path, check_host: str, workdir: Path
    ) -> None:
        self.local_ip = local_ip
        self.connect = connect
        self.accept = (local_ip, free_port(local_ip))
        self.workdir = workdir
        self.log = workdir / "stunnel.log"
        self.conf = workdir / "stunnel.conf"
        self.conf.write_text(
            "foreground = yes\n"
            "pid =\n"
            f"output = {self.log}\n"
            "debug = 5\n"
            "[sip]\n"
            "client = yes\n"
            f"accept = {self.accept[0]}:{self.accept[1]}\n"
            f"connect = {connect[0]}:{connect[1]}\n"
            f"local = {local_ip}\n"
            f"CAfile = {ca_file}\n"
            "verifyChain = yes\n"
            f"checkHost = {check_host}\n"
            "sslVersionMin = TLSv1.2\n"
            "TIMEOUTclose = 0\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Stunnel:
        binary = require("stunnel4")
        self.proc = subprocess.Popen(
            [binary, str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
        )
        proc = self.proc
        wait_for(
            lambda: tcp_listening(self.accept) or self._died(proc),
            10,
            f"stunnel listening on {self.accept}",
        )
        return self

    def _died(self, proc: subprocess.Popen[bytes]) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"stunnel exited {proc.returncode}:\n{self.log_text()}")
        return False

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def upstream(self) -> list[tuple[str, int]]:
        """stunnel's own ends of its TLS connections to the server (what the server sees as the
        client's address), from its log, oldest first."""
        found = []
        for line in self.log_text().splitlines():
            _, marker, addr = line.partition("connected remote server from ")
            if marker:
                host, _, port = addr.strip().rpartition(":")
                found.append((host, int(port)))
        return found


# -- sipp ------------------------------------------------------------------------------------------------


_TRACE_RULE = "-" * 47


@dataclass
class SippResult:
    returncode: int
    output: str
    errors: str
    messages: str

    def traced(self, direction: str) -> list[str]:
        """SIP messages of the `-trace_msg` log that sipp "sent" or "received", in order."""
        out = []
        for block in self.messages.split(_TRACE_RULE):
            head, _, body = block.partition("\n\n")
            if f"message {direction}" in head and "Unexpected" not in head and body.strip():
                out.append(body.strip("\n"))
        return out

    def explain(self) -> str:
        return (
            f"sipp exited {self.returncode}\n--- output\n{self.output[-3000:]}\n"
            f"--- unexpected messages\n{self.errors[-4000:]}\n--- trace\n{self.messages[-6000:]}"
        )


class Sipp:
    """One sipp run: `-t t1` to a stunnel's accept address, traces in its own directory."""

    def __init__(
        self,
        scenario: str,
        *,
        remote: tuple[str, int],
        local_ip: str,
        workdir: Path,
        keys: dict[str, str] | None = None,
        calls: int = 1,
        timeout_s: float = 30,
        ooc_scenario: str | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.name = Path(scenario).stem
        argv = [
            require("sipp"),
            f"{remote[0]}:{remote[1]}",
            "-sf",
            str(SIPP_DIR / scenario),
            "-t",
            "t1",
            "-i",
            local_ip,
            "-p",
            str(free_port(local_ip)),
            "-m",
            str(calls),
            "-l",
            "1",
            "-nostdin",
            "-timeout",
            f"{int(timeout_s)}s",
            "-timeout_error",
            "-max_reconnect",
            "0",
            "-trace_err",
            "-error_file",
            str(workdir / "errors.log"),
            "-trace_msg",
            "-message_file",
            str(workdir / "messages.log"),
            "-trace_screen",
            "-screen_file",
            str(workdir / "screen.log"),
        ]
        if ooc_scenario is not None:
            argv += ["-oocsf", str(SIPP_DIR / ooc_scenario)]
        for key, value in (keys or {}).items():
            argv += ["-key", key, value]
        self.argv = [*argv, *extra]
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sipp:
        with (self.workdir / "stdout.log").open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, "TERM": "dumb"},
            )
        return self

    def wait(self) -> SippResult:
        """sipp's own exit (its `-timeout` bounds it); a stuck sipp is stopped and reported."""
        assert self.proc is not None
        try:
            code = self.proc.wait(self.timeout_s + 10)
        except subprocess.TimeoutExpired:
            code = stop_process(self.proc)
        return self.result(code)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def result(self, code: int) -> SippResult:
        def read(name: str) -> str:
            path = self.workdir / name
            return path.read_text(errors="replace") if path.exists() else ""

        return SippResult(
            code, read("stdout.log") + read("screen.log"), read("errors.log"), read("messages.log")
        )

    def run(self) -> SippResult:
        return self.start().wait()


# -- baresip ------------------------------------------------------------------------------------------


class Baresip:
    """baresip with one account, driven over ctrl_tcp (netstring-framed JSON).

    Audio is a sine source and a file player so no sound device is needed; media is SDES-SRTP
    when the account says `mediaenc=srtp-mand`.
    """

    def __init__(self, *, workdir: Path, local_ip: str, account: str, ca_file: Path) -> None:
        self.workdir = workdir
        self.ctrl = (local_ip, free_port(local_ip))
        self.sip_listen = (local_ip, free_port(local_ip))
        (workdir / "accounts").write_text(account + "\n")
        (workdir / "contacts").write_text("")
        (workdir / "config").write_text(
            "\n".join(
                [
                    "poll_method epoll",
                    f"sip_listen {self.sip_listen[0]}:{self.sip_listen[1]}",
                    f"sip_cafile {ca_file}",
                    "call_local_timeout 30",
                    "audio_player aufile,/dev/null",
                    "audio_source ausine,440",
                    "ausrc_srate 48000",
                    "auplay_srate 48000",
                    "ausrc_channels 2",
                    "auplay_channels 2",
                    "audio_alert aufile,/dev/null",
                    f"rtp_ports {20000 + self.ctrl[1] % 20000}-{20099 + self.ctrl[1] % 20000}",
                    "module_path /usr/lib/baresip/modules",
                    "module g711.so",
                    "module srtp.so",
                    "module ausine.so",
                    "module aufile.so",
                    "module_tmp uuid.so",
                    "module_tmp account.so",
                    "module_app menu.so",
                    "module_app ctrl_tcp.so",
                    f"ctrl_tcp_listen {self.ctrl[0]}:{self.ctrl[1]}",
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self._tokens = 0

    def __enter__(self) -> Baresip:
        with (self.workdir / "baresip.log").open("wb") as out:
            self.proc = subprocess.Popen(
                [require("baresip"), "-f", str(self.workdir), "-s"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        proc = self.proc
        wait_for(lambda: tcp_listening(self.ctrl) or self._died(proc), 10, "baresip ctrl_tcp listening")
        self.sock = socket.create_connection(self.ctrl, timeout=5)
        return self

    def _died(self, proc: subprocess.Popen[bytes]) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"baresip exited {proc.returncode}:\n{self.log_text()[-3000:]}")
        return False

    def __exit__(self, *exc: object) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT)

    def log_text(self) -> str:
        path = self.workdir / "baresip.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def command(self, command: str, params: str = "", timeout_s: float = 10) -> dict[str, Any]:
        assert self.sock is not None
        self._tokens += 1
        token = f"t{self._tokens}"
        payload = json.dumps({"command": command, "params": params, "token": token}).encode()
        self.sock.sendall(b"%d:%s," % (len(payload), payload))
        return self._next(lambda m: m.get("response") is True and m.get("token") == token, timeout_s)

    def wait_event(self, kind: str, timeout_s: float) -> dict[str, Any]:
        """The first event of type `kind` (already received or arriving within `timeout_s`)."""
        for i, ev in enumerate(self.events):
            if ev.get("type") == kind:
                return self.events.pop(i)
        return self._next(lambda m: m.get("event") is True and m.get("type") == kind, timeout_s)

    def _next(self, match: Callable[[dict[str, Any]], bool], timeout_s: float) -> dict[str, Any]:
        assert self.sock is not None
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self._pop_netstring()
            if msg is not None:
                if match(msg):
                    return msg
                if msg.get("event"):
                    self.events.append(msg)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"baresip: no matching message in {timeout_s:.0f} s; events {self.events}\n"
                    f"{self.log_text()[-4000:]}"
                )
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise AssertionError(f"baresip closed ctrl_tcp:\n{self.log_text()[-4000:]}")
            self._buf += data

    def _pop_netstring(self) -> dict[str, Any] | None:
        colon = self._buf.find(b":")
        if colon < 0:
            return None
        length = int(self._buf[:colon])
        end = colon + 1 + length
        if len(self._buf) < end + 1:
            return None
        payload = self._buf[colon + 1 : end]
        self._buf = self._buf[end + 1 :]
        msg: dict[str, Any] = json.loads(payload)
        return msg


class FakeFlow:
    """What E's and C's SIP hops use of edge.sip_flow.SipFlow (ids, peer, context, send), recording
    every message sent as bytes; for driving the hops without sockets (tests, benchmarks/sip/hops.py)."""

    def __init__(self, flow_id: str, peer: tuple[str, int]) -> None:
        self.flow_id = flow_id
        self.peer = peer
        self.context: dict[str, Any] = {"authenticated": True, "keepalive_at": 1e18, "ucm": "up"}
        self.is_open = True
        self.sent: list[bytes] = []

    def send(self, message: Request | Response) -> bool:
        self.sent.append(message.serialize())
        return True

    def send_bytes(self, data: bytes) -> bool:
        self.sent.append(data)
        return True

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self, reason: str = "") -> None:
        self.is_open = False


CLIENT = ("198.51.100.7", 51000)


@dataclass
class WiredEdge:
    """Expressway-E and -C SIP handlers wired to fake flows, no sockets: a client on E, E's and
    C's ends of the zone link, C's flow to the first UCM node (tests, benchmarks/sip/hops.py)."""

    e: EdgeSip
    c: ExpcSip
    client: FakeFlow
    e_zone: FakeFlow
    c_zone: FakeFlow
    c_ucm: FakeFlow
    conn: ZoneSipConnection


def wire_edge(config: LabConfig) -> WiredEdge:
    e_cfg, node = config.expe[0], config.ucm[0]
    e = EdgeSip(
        name=e_cfg.name,
        external_address=e_cfg.external_address,
        internal_address=e_cfg.internal_address,
        client_port=e_cfg.sip_tls_port,
        zone_port=e_cfg.traversal_sip_port,
        zone_name="CollaborationEdgeZone",
        zone_id="1",
        credentials={},
        verify_subject_name="",
        maintenance=lambda: False,
        keepalive_timeout_s=1e9,
    )
    c = ExpcSip(config, ucm_health=lambda: True, maintenance=lambda: False)
    client = FakeFlow("f1", CLIENT)
    e_zone = FakeFlow("f2", (config.expc.address, 40000))  # E's end of the zone link
    c_zone = FakeFlow("f3", (e_cfg.internal_address, e_cfg.traversal_sip_port))  # C's end
    c_ucm = FakeFlow("f4", (node.address, node.sip_tcp_port))
    e.zone_flows[e_zone.flow_id] = e_zone  # type: ignore[assignment]
    e.clients[client.flow_id] = client  # type: ignore[assignment]
    e.clients_by_addr[CLIENT] = client  # type: ignore[assignment]
    conn = ZoneSipConnection(c_zone, "expe")  # type: ignore[arg-type]
    c.zone_conns[c_zone.flow_id] = conn
    c.ucm_out[node.name] = c_ucm  # type: ignore[assignment]
    c.ucm_flows[c_ucm.flow_id] = c_ucm  # type: ignore[assignment]
    return WiredEdge(e, c, client, e_zone, c_zone, c_ucm, conn)
