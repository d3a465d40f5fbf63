"""`edge run` lifts the open-files soft limit: a relay holds four sockets per call."""

from __future__ import annotations

import resource
import subprocess
import sys


def _lowered(soft: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_component_process_starts_with_its_soft_open_files_limit_at_the_hard_limit() -> None:
    code = (
        "import resource, socket\n"
        "from edge.runtime import raise_open_files_limit\n"
        "before = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "soft, hard = raise_open_files_limit()\n"
        "socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(1500)]\n"
        "print(before[0], soft, hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0], len(socks))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: _lowered(1024),
    )
    assert out.returncode == 0, out.stderr
    before, soft, hard, now, opened = (int(x) for x in out.stdout.split())
    assert before == 1024
    assert soft == now == (hard if hard != resource.RLIM_INFINITY else now) and now > 1500
    assert opened == 1500  # past the old limit: 1,500 sockets (375 calls' worth) open
