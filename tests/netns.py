"""Network namespaces for multi-host lab tests (shared/spec/MRA.md §1: "a lab run in separate
network namespaces with 'inside → DMZ only' firewall rules must work").

Topology (all addresses from 198.18.0.0/15, the benchmarking range, RFC 2544):

```
 mra-out-<id>                mra-dmz-<id>                        mra-in-<id>
 o-dmz 198.18.2.1/24 ◄──► d-out 198.18.2.254/24 (E external)
                           d-in  198.18.1.254/24 (E internal) ◄──► i-dmz 198.18.1.1/24
                           route 198.18.10.0/24 via 198.18.1.1       lo 198.18.10.x/32 (C, UCM, …)
```

The DMZ namespace drops every NEW connection it would open (or forward) towards the inside,
so only connections the inside opened work; the outside reaches only the DMZ.

Also runnable inside a namespace, stdlib only, as ``python -m tests.netns <command> <json>``:
``status`` (a component's admin /status), ``connect`` (a TCP connect probe) and ``https``
(one HTTPS request with a chosen SNI); each prints one JSON document.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

INSIDE_LAN = "198.18.10.0/24"
IN_DMZ_NET = "198.18.1.0/24"
DMZ_OUT_NET = "198.18.2.0/24"
INSIDE_LINK_ADDR = "198.18.1.1"
DMZ_INSIDE_ADDR = "198.18.1.254"
DMZ_OUTSIDE_ADDR = "198.18.2.254"
OUTSIDE_ADDR = "198.18.2.1"
INSIDE_IF = "i-dmz"
DMZ_INSIDE_IF = "d-in"
DMZ_OUTSIDE_IF = "d-out"
OUTSIDE_IF = "o-dmz"


class NetnsUnavailable(Exception):
    """`ip netns add` is not permitted here (not root, or no CAP_SYS_ADMIN): the test may skip."""


class NetnsError(Exception):
    """A namespace or firewall command failed for another reason: the test must fail."""


def _run(
    argv: Sequence[str], *, timeout_s: float = 20.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout}")
    return proc


def ns_argv(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@dataclass
class Topology:
    """Three namespaces joined by two veth pairs; `close()` deletes whatever was created."""

    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    created: list[str] = field(default_factory=list)

    @property
    def inside(self) -> str:
        return f"mra-in-{self.suffix}"

    @property
    def dmz(self) -> str:
        return f"mra-dmz-{self.suffix}"

    @property
    def outside(self) -> str:
        return f"mra-out-{self.suffix}"

    def _add_namespace(self, name: str) -> None:
        proc = _run(["ip", "netns", "add", name], check=False)
        if proc.returncode != 0:
            err = proc.stderr.strip()
            if "Operation not permitted" in err or "Permission denied" in err:
                raise NetnsUnavailable(f"ip netns add {name}: {err}")
            raise NetnsError(f"ip netns add {name} exited {proc.returncode}: {err}")
        self.created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def build(self, inside_hosts: Sequence[str]) -> None:
        """Create namespaces, links, addresses (`inside_hosts` on the inside's loopback) and routes."""
        for name in (self.inside, self.dmz, self.outside):
            self._add_namespace(name)
        # Each veth pair is created directly with its two ends in their namespaces.
        for ns, here, there in (
            (self.inside, INSIDE_IF, DMZ_INSIDE_IF),
            (self.outside, OUTSIDE_IF, DMZ_OUTSIDE_IF),
        ):
            _run(["ip", "-n", ns, *f"link add {here} type veth peer name {there} netns {self.dmz}".split()])
        for ns, ifname, addr in (
            (self.inside, INSIDE_IF, f"{INSIDE_LINK_ADDR}/24"),
            (self.dmz, DMZ_INSIDE_IF, f"{DMZ_INSIDE_ADDR}/24"),
            (self.dmz, DMZ_OUTSIDE_IF, f"{DMZ_OUTSIDE_ADDR}/24"),
            (self.outside, OUTSIDE_IF, f"{OUTSIDE_ADDR}/24"),
        ):
            _run(["ip", "-n", ns, "addr", "add", addr, "dev", ifname])
            _run(["ip", "-n", ns, "link", "set", ifname, "up"])
        for host in inside_hosts:
            _run(["ip", "-n", self.inside, "addr", "add", f"{host}/32", "dev", "lo"])
        # The DMZ reaches the inside LAN through the inside's end of the link; the inside and the
        # outside reach the DMZ on their directly connected subnets.
        _run(["ip", "-n", self.dmz, "route", "add", INSIDE_LAN, "via", INSIDE_LINK_ADDR])

    def dmz_firewall(self) -> None:
        """Spec §1: the DMZ may answer the inside but never open a connection towards it."""
        if shutil.which("iptables") is None:
            raise NetnsError("iptables is not installed (scripts/install-system-deps lists it)")
        for chain in ("OUTPUT", "FORWARD"):
            rule = f"-A {chain} -o {DMZ_INSIDE_IF} -m conntrack --ctstate NEW -j DROP"
            _run(ns_argv(self.dmz, "iptables", "-w", *rule.split()))

    def dropped_packets(self) -> int:
        """Packets the DMZ's OUTPUT rule dropped so far (proof that the rule is in force)."""
        out = _run(ns_argv(self.dmz, "iptables", "-w", "-L", "OUTPUT", "-v", "-n", "-x")).stdout
        total = 0
        for line in out.splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[2] == "DROP" and DMZ_INSIDE_IF in parts:
                total += int(parts[0])
        return total

    def close(self) -> list[str]:
        """Delete every namespace this topology created (the veth pairs go with them)."""
        errors = []
        for name in reversed(self.created):
            proc = _run(["ip", "netns", "del", name], check=False)
            if proc.returncode != 0:
                errors.append(f"{name}: {proc.stderr.strip()}")
        self.created.clear()
        return errors

    def namespaces(self) -> list[str]:
        listed = _run(["ip", "netns", "list"]).stdout
        return [line.split()[0] for line in listed.splitlines() if line.strip()]


@dataclass
class NsProcess:
    name: str
    ns: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""


class ProcessGroup:
    """Lab components started with `ip netns exec`; stopped by pid (SIGTERM, then SIGKILL)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[NsProcess] = []

    def start(self, ns: str, name: str, config_path: Path) -> NsProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE__")}
        env["PYTHONUNBUFFERED"] = "1"
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log_fh:
            popen = subprocess.Popen(
                ns_argv(ns, sys.executable, "-m", "edge", "run", name, "--config", str(config_path)),
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )
        proc = NsProcess(name, ns, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop_all(self, timeout_s: float = 10.0) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(timeout=5)


def ns_tool(ns: str, command: str, args: dict[str, Any], *, timeout_s: float = 15.0) -> Any:
    """Run `python -m tests.netns <command>` inside `ns` and return its JSON answer."""
    proc = subprocess.run(
        ns_argv(ns, sys.executable, "-m", "tests.netns", command, json.dumps(args)),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise NetnsError(f"tests.netns {command} in {ns} exited {proc.returncode}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


# -- the probes (stdlib only: they also run inside a namespace) ---------------------------------


def fetch_status(host: str, port: int, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """A component's admin /status, or None if it does not answer (yet)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=timeout_s) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (OSError, urllib.error.URLError, ValueError):
        return None


def tcp_connect(host: str, port: int, timeout_s: float, source: str | None = None) -> str | None:
    """None if a TCP connection to host:port is established within `timeout_s`, else why not."""
    try:
        sock = socket.create_connection(
            (host, port), timeout=timeout_s, source_address=(source, 0) if source else None
        )
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    sock.close()
    return None


@dataclass
class HttpAnswer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: str
    elapsed_s: float

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def https_request(
    address: str,
    port: int,
    server_name: str,
    path: str,
    *,
    cafile: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    timeout_s: float = 10.0,
) -> HttpAnswer:
    """One HTTPS request to `address:port`, with SNI and Host `server_name`, verified with `cafile`."""
    ctx = ssl.create_default_context(cafile=cafile)
    started = time.monotonic()
    sock = socket.create_connection((address, port), timeout=timeout_s)
    tls = ctx.wrap_socket(sock, server_hostname=server_name)
    conn = http.client.HTTPConnection(server_name, port, timeout=timeout_s)
    conn.sock = tls
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", errors="replace")
        return HttpAnswer(resp.status, resp.reason, resp.getheaders(), body, time.monotonic() - started)
    finally:
        conn.close()


def _main(argv: Sequence[str]) -> int:
    command, args = argv[0], json.loads(argv[1])
    out: Any
    if command == "status":
        out = fetch_status(args["host"], int(args["port"]), float(args.get("timeout_s", 1.0)))
    elif command == "connect":
        out = {"error": tcp_connect(args["host"], int(args["port"]), float(args["timeout_s"]))}
    elif command == "https":
        answer = https_request(
            args["address"],
            int(args["port"]),
            args["server_name"],
            args["path"],
            cafile=args["cafile"],
            headers=args.get("headers"),
            timeout_s=float(args.get("timeout_s", 10.0)),
        )
        out = answer.__dict__
    else:
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
