"""Shared fixtures: a lab configuration on its own loopback plan, and a running lab."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.config import LabConfig, load_config
from edge.lab_plan import block_overrides, find_free_block
from mra_client.edge_http import EdgeHttpClient

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"

# Each lab a test starts gets its own 127.x block so tests never collide with a developer's
# running `./dev lab` (127.10.x), with each other, nor with a second test run on the machine.
_blocks = itertools.count(20 + (os.getpid() % 50) * 4)


def _free_block() -> int:
    # 240 candidates from this run's own counter, wrapped into 20..249.
    return find_free_block(20 + (next(_blocks) - 20) % 230 for _ in range(240))


def lab_overrides(state_dir: Path, block: int | None = None) -> list[str]:
    return block_overrides(_free_block() if block is None else block, state_dir)


def make_config(state_dir: Path, *extra: str, block: int | None = None) -> LabConfig:
    return load_config(None, overrides=[*lab_overrides(state_dir, block), *extra], environ={})


def edge_cli(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real `edge` command line as a user would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE__")}
    proc = subprocess.run(
        [sys.executable, "-m", "edge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"edge {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_args(config: LabConfig, overrides: list[str]) -> list[str]:
    out = []
    for item in overrides:
        out += ["--set", item]
    return out


class RunningLab:
    """A lab brought up with `edge lab up --detach` through the real CLI."""

    def __init__(self, state_dir: Path, overrides: list[str], config_file: Path | None = None) -> None:
        self.state_dir = state_dir
        self.overrides = overrides
        self.config_file = config_file
        self.config = load_config(config_file, overrides=overrides, environ={})

    @property
    def args(self) -> list[str]:
        extra = ["--config", str(self.config_file)] if self.config_file else []
        return extra + [a for item in self.overrides for a in ("--set", item)]

    def up(self) -> None:
        edge_cli("lab", "up", "--detach", *self.args, timeout=120)

    def down(self) -> None:
        edge_cli("lab", "down", *self.args, timeout=60, check=False)

    def status(self) -> dict[str, Any]:
        from edge.lab import lab_status

        return asyncio.run(lab_status(self.config))

    def component(self, name: str) -> dict[str, Any]:
        """One component's live /status (plain blocking HTTP: usable inside a coroutine too)."""
        host, port = self.config.admin_endpoint(name)
        with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
        return data

    def edge_http(self, address: str | None = None) -> EdgeHttpClient:
        """An HTTPS client of the first Expressway-E as a remote client reaches it (lab CA)."""
        e = self.config.expe[0]
        return EdgeHttpClient(
            domain=self.config.lab.domain,
            edge_host=e.fqdn,
            edge_port=e.https_port,
            edge_address=e.external_address if address is None else address,
            ca_file=str(self.state_dir / "certs" / "ca.pem"),
        )

    def listener(self, component: str, name: str) -> tuple[str, int]:
        for lst in self.component(component)["listeners"]:
            if lst["name"] == name:
                return str(lst["host"]), int(lst["port"])
        raise KeyError(f"{component}/{name}")


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[Any]:
    labs: list[RunningLab] = []

    def factory(*extra: str) -> RunningLab:
        state = tmp_path / f"lab{len(labs)}"
        lab = RunningLab(state, [*lab_overrides(state), *extra])
        labs.append(lab)
        lab.up()
        return lab

    yield factory
    for lab in labs:
        lab.down()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningLab]:
    """One lab per test module, default configuration on a private loopback block."""
    state = tmp_path_factory.mktemp("lab")
    running = RunningLab(state, lab_overrides(state))
    running.up()
    try:
        yield running
    finally:
        running.down()
