"""The relays under test, each in its own process (pinned to one core or not), driven without SIP.

A child (``python -m benchmarks.media.run --child relay|e|c ...``) runs on uvloop, as `edge run`
does, and takes one JSON command per line on stdin, answering one JSON line on stdout:

* ``relay``: a plain ``RelayWorker``; ``setup n`` binds n streams, both legs dedicated and
  latching (4 ports per stream), and returns the two RTP ports of each.
* ``e`` / ``c``: ``EdgeMedia`` / ``GatewayMedia`` fed SDP offers and answers in batches, in the
  order the SIP path would call them (as tests/media/test_anchor_path.py does).

A child exits by itself after ``--max-s`` seconds; the parent stops it by its PID otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[2]
STREAM_LIMIT_BYTES = 64 << 20
E_PORTS = (20000, 29999)
C_PORTS = (30000, 59999)


def raise_fd_limit(wanted: int = 65536) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pin(cpu: int) -> None:
    """Pin this process to one CPU; ``cpu < 0``: let it run on any (children inherit the
    parent's affinity, so an unpinned child must say so)."""
    cpus = set(range(os.cpu_count() or 1)) if cpu < 0 else {cpu}
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, cpus)


# -- child side ---------------------------------------------------------------------------------


class _Relay:
    def __init__(self, host: str) -> None:
        from media_relay.table import PortAllocator
        from media_relay.worker import RelayWorker

        self.worker = RelayWorker(host, allocator=PortAllocator(20000, 60000))

    async def handle(self, cmd: dict[str, Any]) -> Any:
        from media_relay.table import LegSpec

        if cmd["op"] == "setup":
            pairs: list[list[int]] = []
            for i in range(int(cmd["n"])):
                a, _ = await self.worker.bind_pair()
                b, _ = await self.worker.bind_pair()
                self.worker.add_stream(
                    f"s{i}", LegSpec.dedicated(a, latch=True), LegSpec.dedicated(b, latch=True)
                )
                pairs.append([a, b])
            return pairs
        if cmd["op"] == "totals":
            return _totals(self.worker)
        raise ValueError(f"unknown op {cmd['op']}")

    async def close(self) -> None:
        await self.worker.close()


class _Anchor:
    def __init__(self, role: str, prefix: str) -> None:
        from edge.config import ExpcSettings, ExpeSettings
        from edge_c.media import GatewayMedia
        from edge_e.media import EdgeMedia

        self.media: EdgeMedia | GatewayMedia
        if role == "e":
            self.media = EdgeMedia(
                ExpeSettings(
                    external_address=f"{prefix}.1",
                    internal_address=f"{prefix}.2",
                    media_port_min=E_PORTS[0],
                    media_port_max=E_PORTS[1],
                )
            )
        else:
            self.media = GatewayMedia(
                ExpcSettings(address=f"{prefix}.3", media_port_min=C_PORTS[0], media_port_max=C_PORTS[1])
            )

    async def start(self) -> None:
        await self.media.start()

    async def handle(self, cmd: dict[str, Any]) -> Any:
        op = cmd["op"]
        if op in ("offer", "answer"):
            fn = self.media.process_offer if op == "offer" else self.media.process_answer
            return [fn(call, cmd["ingress"], sdp.encode()).decode() for call, sdp in cmd["items"]]
        if op == "wait_bound":
            await self.media.worker.wait_bound()
            return len(self.media.worker.ports)
        if op == "totals":
            return _totals(self.media.worker)
        raise ValueError(f"unknown op {op}")

    async def close(self) -> None:
        await self.media.stop()


def _totals(worker: Any) -> dict[str, Any]:
    """Table totals (after folding in the native path's counters) and the worker's own; ``srtp``:
    whose SRTP a native C-side flow uses (``fastpath.srtp_primitives()``, where it exists)."""
    from media_relay import fastpath

    info = worker.stats()["worker"]
    native = {f"native_{k}": v for k, v in info.get("native", {}).items() if k != "backend"}
    primitives = getattr(fastpath, "srtp_primitives", None)
    srtp = (primitives() if callable(primitives) else None) or "python"
    return {
        **worker.totals(),
        "socket_errors": info["socket_errors"],
        "path": info["fastpath"]
        + (f" on {info['native']['backend']}" if "backend" in info.get("native", {}) else "")
        + (" + kernel" if "flows" in info.get("kernel", {}) else ""),
        "kernel_flows": info.get("kernel", {}).get("flows", 0),
        "srtp": str(srtp),
        **native,
    }


async def _serve(role: str, prefix: str, max_s: float) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STREAM_LIMIT_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    server: _Relay | _Anchor
    if role == "relay":
        server = _Relay(f"{prefix}.8")
    else:
        server = _Anchor(role, prefix)
        await server.start()
    _reply({"ok": True, "result": "ready"})
    deadline = loop.time() + max_s
    try:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), max(0.1, deadline - loop.time()))
            except TimeoutError:
                break
            if not line:
                break
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            try:
                _reply({"ok": True, "result": await server.handle(cmd)})
            except Exception as exc:
                _reply({"ok": False, "error": repr(exc)})
    finally:
        await server.close()


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def child_main(role: str, prefix: str, cpu: int, max_s: float) -> None:
    import uvloop

    raise_fd_limit()
    pin(cpu)
    uvloop.run(_serve(role, prefix, max_s))


# -- parent side --------------------------------------------------------------------------------


class Child:
    """One child process; ``call(op, ...)`` sends a command and waits (bounded) for the answer."""

    def __init__(
        self,
        role: str,
        prefix: str,
        cpu: int,
        log: TextIO,
        max_s: float = 300.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.role = role
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.media.run",
                "--child",
                role,
                "--prefix",
                prefix,
                "--cpu",
                str(cpu),
                "--max-s",
                str(max_s),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=REPO,
            env=None if env is None else {**os.environ, **env},
        )
        self._read(60.0)  # "ready"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, timeout_s: float) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"{self.role}: no answer in {timeout_s} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.role} exited (code {self.proc.poll()})")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"{self.role}: {reply['error']}")
        return reply["result"]

    def call(self, op: str, timeout_s: float = 120.0, **kw: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout_s)

    def close(self) -> None:
        """Ask it to quit; kill it by its PID if it does not within 10 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
