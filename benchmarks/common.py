"""Shared plumbing of the benchmarks: a lab on its own 127.x block, process memory, tables.

A benchmark brings its own lab up with the real CLI (`edge lab up --detach --set ...`, as
tests/conftest.py does) in a temporary state directory and takes it down by the CLI at the end.
Every helper process (stunnel, sipp, Kamailio) is started by the benchmark and stopped by its own
PID (tests/sip_tools.py); every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edge.config import LabConfig, load_config  # noqa: E402
from edge.lab_plan import block_overrides, find_free_block  # noqa: E402
from mra_client.edge_http import EdgeHttpClient  # noqa: E402

FD_LIMIT = 65536


def raise_fd_limit(wanted: int = FD_LIMIT) -> int:
    """Raise this process's open-file limit (inherited by the lab and the load tools we start):
    10,000 TLS flows need ~10k fds in sipp and E and ~20k in stunnel."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def free_block(first: int = 150) -> int:
    """A 127.x block nobody listens on (other labs, tests and `./dev lab` use their own)."""
    return find_free_block([*range(first, 250), *range(20, first)])


def lab_overrides(state_dir: Path, block: int) -> list[str]:
    return block_overrides(block, state_dir)


def edge_cli(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE__")}
    proc = subprocess.run(
        [sys.executable, "-m", "edge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"edge {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


class BenchLab:
    """A lab on a free 127.x block in `state_dir`, up/down through the real CLI."""

    def __init__(self, state_dir: Path, *extra: str, block: int | None = None) -> None:
        self.state_dir = state_dir
        self.block = free_block() if block is None else block
        self.overrides = [*lab_overrides(state_dir, self.block), *extra]
        self.config: LabConfig = load_config(None, overrides=self.overrides, environ={})

    @property
    def args(self) -> list[str]:
        return [a for item in self.overrides for a in ("--set", item)]

    def __enter__(self) -> BenchLab:
        edge_cli("lab", "up", "--detach", *self.args, timeout=300)
        return self

    def __exit__(self, *exc: object) -> None:
        edge_cli("lab", "down", *self.args, timeout=120, check=False)

    def ip(self, octet: int) -> str:
        """An address on the lab's outside /24 (for load tools)."""
        return f"127.{self.block}.1.{octet}"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "certs" / "ca.pem"

    def component(self, name: str) -> dict[str, Any]:
        host, port = self.config.admin_endpoint(name)
        with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=10) as resp:
            data: dict[str, Any] = json.loads(resp.read())
        return data

    def pids(self) -> dict[str, int]:
        data = json.loads((self.state_dir / "lab.json").read_text())
        return {str(p["name"]): int(p["pid"]) for p in data["processes"]}

    def listener(self, component: str, name: str) -> tuple[str, int]:
        for lst in self.component(component)["listeners"]:
            if lst["name"] == name:
                return str(lst["host"]), int(lst["port"])
        raise KeyError(f"{component}/{name}")

    def edge_client(self) -> EdgeHttpClient:
        e = self.config.expe[0]
        return EdgeHttpClient(
            domain=self.config.lab.domain,
            edge_host=e.fqdn,
            edge_port=e.https_port,
            edge_address=e.external_address,
            ca_file=str(self.ca_file),
        )

    def sip_route(self) -> str:
        """The `sipRequest` route as get_edge_config hands it out (a client preloads it)."""

        async def fetch() -> str:
            async with self.edge_client() as client:
                config, _ = await client.get_edge_config("alice", "lab-pass")
            if config.sip_route is None:
                raise RuntimeError("get_edge_config carried no sipRequest route")
            return config.sip_route

        return asyncio.run(fetch())


# -- memory ------------------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    """VmRSS of one process, KiB (/proc/<pid>/status)."""
    return _status_kib(pid, "VmRSS")


def pss_kib(pid: int) -> int:
    """Proportional set size (shared pages split between sharers), KiB: fair for forked servers."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- reporting ---------------------------------------------------------------------------------


def machine_line() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = _meminfo_kib("MemTotal")
    load = os.getloadavg()
    return (
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {platform.node()}; "
        f"{os.cpu_count()} CPU ({cpu}); {mem_kib / 1048576:.0f} GiB; Python {platform.python_version()}; "
        f"loadavg at start {load[0]:.2f}"
    )


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
