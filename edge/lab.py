"""The lab supervisor: `edge lab up | down | status`.

It prepares the state directory (effective config, lab PKI), starts every component as its own
OS process with `edge run <name> --config <state>/lab.toml`, waits until each one's admin
``/status`` says ``ready`` (never a sleep), and records pids in ``<state>/lab.json`` so that
`edge lab status` and `edge lab down` work from any shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from edge.config import LabConfig, dump_toml
from edge.lab_pki import ensure_certificates

STATE_FILE = "lab.json"
CONFIG_FILE = "lab.toml"


class LabError(Exception):
    """A lab operation that cannot proceed; the message says why and what to do."""


@dataclass
class ProcessRecord:
    name: str
    role: str
    pid: int
    admin_host: str
    admin_port: int
    log_path: str

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class LabState:
    state_dir: Path
    config_path: Path
    started_at: float
    supervisor_pid: int
    processes: list[ProcessRecord] = field(default_factory=list)

    def save(self) -> None:
        data = {
            "config_path": str(self.config_path),
            "started_at": self.started_at,
            "supervisor_pid": self.supervisor_pid,
            "processes": [p.as_dict() for p in self.processes],
        }
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state_dir / STATE_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> LabState | None:
        path = state_dir / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(f"{path}: unreadable lab state ({exc}); remove it if no lab runs") from exc
        return cls(
            state_dir=state_dir,
            config_path=Path(data["config_path"]),
            started_at=float(data["started_at"]),
            supervisor_pid=int(data.get("supervisor_pid", 0)),
            processes=[ProcessRecord(**p) for p in data["processes"]],
        )


def pid_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def _is_our_process(pid: int, name: str) -> bool:
    """Only signal processes we started: check the command line names `edge run <name>`."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    return b"run" in argv and name.encode() in argv


def prepare_state(config: LabConfig) -> tuple[Path, Path]:
    """Create the state dir, write the effective config, generate/renew certificates."""
    state_dir = config.lab.state_path
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    config_path = state_dir / CONFIG_FILE
    config_path.write_text(dump_toml(config))
    ensure_certificates(config)
    return state_dir, config_path


async def fetch_status(host: str, port: int, timeout_s: float = 1.0) -> dict[str, Any] | None:
    url = f"http://{host}:{port}/status"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(url) as resp,
        ):
            if resp.status != 200:
                return None
            data: dict[str, Any] = await resp.json()
            return data
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return ""


class LabSupervisor:
    def __init__(self, config: LabConfig) -> None:
        self.config = config
        self.state: LabState | None = None
        self._popen: dict[str, subprocess.Popen[bytes]] = {}

    def _check_not_running(self) -> None:
        existing = LabState.load(self.config.lab.state_path)
        if existing is None:
            return
        alive = [p.name for p in existing.processes if pid_alive(p.pid) and _is_our_process(p.pid, p.name)]
        if alive:
            raise LabError(
                f"a lab is already running from {existing.state_dir} ({', '.join(alive)}); "
                "run `edge lab down` first"
            )

    def _spawn(self, name: str, role: str, config_path: Path, state_dir: Path) -> ProcessRecord:
        log_path = state_dir / "logs" / f"{name}.log"
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # The effective config file is complete; environment overrides must not apply twice.
        env = {k: v for k, v in env.items() if not k.startswith("EDGE__")}
        with open(log_path, "ab") as log_fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge", "run", name, "--config", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
                env=env,
            )
        self._popen[name] = proc
        host, port = self.config.admin_endpoint(name)
        return ProcessRecord(name, role, proc.pid, host, port, str(log_path))

    async def _wait_ready(self, rec: ProcessRecord) -> dict[str, Any]:
        deadline = time.monotonic() + self.config.lab.ready_timeout_s
        delay = 0.02
        while time.monotonic() < deadline:
            proc = self._popen.get(rec.name)
            if proc is not None and proc.poll() is not None:
                raise LabError(
                    f"{rec.name} exited with code {proc.returncode} while starting; its log says:\n"
                    + _tail(rec.log_path)
                )
            status = await fetch_status(rec.admin_host, rec.admin_port, timeout_s=0.5)
            if status is not None and status.get("pid") == rec.pid:
                if status.get("state") == "ready":
                    return status
                if status.get("state") == "failed":
                    raise LabError(f"{rec.name} failed to start: {status.get('failure')}")
            await asyncio.sleep(delay)  # polling interval of a readiness probe, not a wait-and-hope
            delay = min(delay * 2, 0.2)
        raise LabError(
            f"{rec.name} not ready after {self.config.lab.ready_timeout_s:.0f} s; its log says:\n"
            + _tail(rec.log_path)
        )

    async def up(self) -> LabState:
        self._check_not_running()
        state_dir, config_path = prepare_state(self.config)
        self.state = LabState(state_dir, config_path, time.time(), os.getpid())
        try:
            for name, role in self.config.components():
                rec = self._spawn(name, role, config_path, state_dir)
                self.state.processes.append(rec)
                self.state.save()
                await self._wait_ready(rec)
        except BaseException:
            await self.down()
            raise
        return self.state

    async def down(self) -> list[str]:
        # lab.json is authoritative: `edge lab restart` may have replaced a process since `up`.
        state = LabState.load(self.config.lab.state_path) or self.state
        if state is None:
            return []
        stopped = await stop_processes(state.processes, self.config.lab.stop_timeout_s)
        for proc in self._popen.values():
            with contextlib.suppress(ChildProcessError):
                proc.poll()
        with contextlib.suppress(FileNotFoundError):
            (state.state_dir / STATE_FILE).unlink()
        self.state = None
        return stopped

    def crashed(self) -> list[tuple[str, int]]:
        """Children that exited on their own (foreground mode), with exit codes. A child that
        `edge lab restart` replaced (lab.json names another pid) did not crash."""
        exited = [(n, p) for n, p in self._popen.items() if p.poll() is not None]
        if not exited:
            return []
        current = LabState.load(self.config.lab.state_path)
        pids = {} if current is None else {r.name: r.pid for r in current.processes}
        return [(n, p.returncode) for n, p in exited if pids.get(n, p.pid) == p.pid]

    async def restart(self, name: str) -> ProcessRecord:
        """Stop one component of the running lab and start it again with the lab's effective
        config; lab.json records the new pid. Raises LabError if no lab runs, the name is not a
        component, or the new process does not become ready."""
        state = LabState.load(self.config.lab.state_path)
        if state is None:
            raise LabError(f"no lab running from {self.config.lab.state_path}; run `edge lab up` first")
        names = [p.name for p in state.processes]
        if name not in names:
            raise LabError(f"no component {name!r} in this lab; components: {', '.join(names)}")
        index = names.index(name)
        old = state.processes[index]
        await stop_processes([old], self.config.lab.stop_timeout_s)
        rec = self._spawn(name, old.role, state.config_path, state.state_dir)
        # The component reads the lab's effective config: its admin endpoint has not moved.
        rec.admin_host, rec.admin_port = old.admin_host, old.admin_port
        state.processes[index] = rec
        state.save()
        self.state = state
        await self._wait_ready(rec)
        return rec


async def stop_processes(processes: list[ProcessRecord], timeout_s: float) -> list[str]:
    """SIGTERM in reverse start order, wait, SIGKILL what is left. Only our own processes."""
    stopped = []
    for rec in reversed(processes):
        if pid_alive(rec.pid) and _is_our_process(rec.pid, rec.name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, signal.SIGTERM)
            stopped.append(rec.name)
    deadline = time.monotonic() + timeout_s
    pending = [r for r in processes if r.name in stopped]
    while pending and time.monotonic() < deadline:
        _reap()
        pending = [r for r in pending if pid_alive(r.pid)]
        if pending:
            await asyncio.sleep(0.05)
    for rec in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGKILL)
    _reap()
    return stopped


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break


async def lab_status(config: LabConfig) -> dict[str, Any]:
    """The aggregated lab status (spec §9): every component with pid, state and listeners."""
    state = LabState.load(config.lab.state_path)
    if state is None:
        return {"state": "down", "state_dir": str(config.lab.state_path), "components": []}
    results = await asyncio.gather(*(fetch_status(p.admin_host, p.admin_port) for p in state.processes))
    components = []
    for rec, st in zip(state.processes, results, strict=True):
        entry: dict[str, Any] = {
            "name": rec.name,
            "role": rec.role,
            "pid": rec.pid,
            "log": rec.log_path,
            "admin": {"host": rec.admin_host, "port": rec.admin_port},
        }
        if not pid_alive(rec.pid):
            entry.update(state="crashed", listeners=[], detail="process is not running")
        elif st is None or st.get("pid") != rec.pid:
            entry.update(state="unresponsive", listeners=[], detail="admin /status does not answer")
        else:
            entry.update({k: v for k, v in st.items() if k not in ("name", "role", "pid")})
        components.append(entry)
    states = {c["state"] for c in components}
    overall = "ready" if states == {"ready"} else ("degraded" if "ready" in states else "down")
    summary = _summary(components)
    return {
        "state": overall,
        "state_dir": str(state.state_dir),
        "config": str(state.config_path),
        "started_at": state.started_at,
        "components": components,
        **summary,
    }


_REFUSALS = ("rejected", "TLS verification", "authentication failed")


async def wait_zones_active(config: LabConfig, timeout_s: float) -> dict[str, Any]:
    """Poll the aggregated status until every traversal zone is Active or `timeout_s` passes
    (C dials E right after it starts); returns the last status either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await lab_status(config)
        zones = status.get("zones", [])
        if (zones and all(z.get("state") == "Active" for z in zones)) or time.monotonic() >= deadline:
            return status
        # A peer that refuses us (credentials, certificate names, CA) will not change its mind.
        if any(_MISCONFIGURED in str(z.get("reason", "")) for z in zones for _MISCONFIGURED in _REFUSALS):
            return status
        await asyncio.sleep(0.1)


def _summary(components: list[dict[str, Any]]) -> dict[str, Any]:
    """Lift zone, tunnel, link states and counts from the Expressways to the top level."""
    zones: list[dict[str, Any]] = []
    counts = {"registrations": 0, "calls": 0, "xmpp_sessions": 0, "provisioning_sessions": 0}
    for comp in components:
        for zone in comp.get("zones", []):
            zones.append({"component": comp["name"], **zone})
        if comp.get("role") in ("expe", "expc"):
            for key in counts:
                value = comp.get("counts", {}).get(key)
                if isinstance(value, int) and comp.get("role") == "expe":
                    counts[key] += value
    return {"zones": zones, "counts": counts}
