"""Running one lab component as its own OS process: `edge run <component> --config FILE`.

A component is an object with ``start()`` (bind every listener, raise if it cannot), ``stop()``
and ``status()``. The runtime installs uvloop, starts the component's admin HTTP server
(``/status`` JSON, ``/metrics`` Prometheus text), marks the process ready only once every
listener is bound, and stops cleanly on SIGTERM/SIGINT within a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from edge.config import LabConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listener:
    """One bound socket, as `edge lab status --json` reports it (spec §9)."""

    name: str
    transport: str
    host: str
    port: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Component(Protocol):
    name: str
    role: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def listeners(self) -> list[Listener]: ...

    def status(self) -> dict[str, Any]: ...


class BaseComponent:
    """Shared plumbing: a metrics registry, owned tasks, start time, listener list."""

    role = "component"

    def __init__(self, name: str, config: LabConfig) -> None:
        self.name = name
        self.config = config
        self.registry = CollectorRegistry(auto_describe=True)
        self.started_at = time.time()
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.extra_routes: list[tuple[str, str, Callable[..., Awaitable[Any]]]] = []

    def spawn(self, coro: Awaitable[Any], *, name: str | None = None) -> asyncio.Task[Any]:
        """Run a task owned by this component: kept until done, cancelled on stop."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        if name:
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: task %s failed", self.name, task.get_name(), exc_info=task.exception())

    async def cancel_tasks(self, timeout_s: float = 5.0) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    def add_listener(self, name: str, transport: str, host: str, port: int) -> None:
        self._listeners.append(Listener(name, transport, host, port))

    def listeners(self) -> list[Listener]:
        return list(self._listeners)

    def status(self) -> dict[str, Any]:
        return {}

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        await self.cancel_tasks()


def build_component(name: str, config: LabConfig) -> BaseComponent:
    """Instantiate the component called `name` (a node name, or a role name for its first node)."""
    name = config.component_name(name)
    role = config.role_of(name)
    # Imports are local so each process loads only its own code.
    if role == "dns":
        from edge.dns_component import DnsComponent

        return DnsComponent(name, config)
    if role == "ucm":
        from mock_ucm.ucm import UcmComponent

        return UcmComponent(name, config)
    if role == "imp":
        from mock_ucm.imp_component import ImpComponent

        return ImpComponent(name, config)
    if role == "cuc":
        from mock_ucm.cuc import CucComponent

        return CucComponent(name, config)
    if role == "expc":
        from edge_c.component import ExpresswayC

        return ExpresswayC(name, config)
    if role == "expe":
        from edge_e.component import ExpresswayE

        return ExpresswayE(name, config)
    raise ValueError(f"no component for role {role!r}")


async def serve_component(component: BaseComponent, *, stop_event: asyncio.Event | None = None) -> int:
    """Start the component and its admin server, run until SIGTERM/SIGINT or stop_event."""
    from edge.admin import AdminServer

    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    admin_host, admin_port = component.config.admin_endpoint(component.name)
    admin = AdminServer(component, admin_host, admin_port)
    try:
        await admin.start()  # answers /status with state "starting" while the component binds
        await component.start()
    except Exception as exc:  # a bind failure or bad configuration: report and exit non-zero
        log.error("%s: failed to start: %s", component.name, exc)
        print(f"{component.name}: failed to start: {exc}", flush=True)
        admin.state = "failed"
        admin.failure = str(exc)
        await _stop_all(component, admin)
        return 1
    admin.state = "ready"
    print(f"{component.name}: ready (pid {os.getpid()})", flush=True)
    await stop.wait()
    admin.state = "stopping"
    await _stop_all(component, admin)
    return 0


async def _stop_all(component: BaseComponent, admin: Any) -> None:
    try:
        await asyncio.wait_for(component.stop(), timeout=component.config.lab.stop_timeout_s)
    except (TimeoutError, Exception) as exc:  # stopping must never hang or crash the exit path
        log.warning("%s: unclean stop: %s", component.name, exc)
    await admin.stop()


def raise_open_files_limit() -> tuple[int, int]:
    """Lift this process's soft RLIMIT_NOFILE to its hard limit (no privilege needed) and return
    (soft, hard). A relay holds four sockets per call (RTP and RTCP on two legs), so the usual
    soft limit of 1,024 would stop C near 250 calls with EMFILE; the hard limit (Debian and
    systemd: 524,288; Docker: 1,048,576) is what a server process is meant to use."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel caps it at fs.nr_open
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. a hard limit the kernel refuses (fs.nr_open)
            log.warning("open files limit stays at %d (hard %d): %s", soft, hard, exc)
    return soft, hard


def run_component(name: str, config: LabConfig) -> int:
    """Entry point of `edge run`: one component in the foreground on uvloop."""
    import uvloop

    raise_open_files_limit()
    component = build_component(name, config)
    return uvloop.run(serve_component(component))
