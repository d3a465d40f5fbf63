"""Kernel forwarding (``media_relay/kernel.py``, ``kernel_srtp.py``) needs root: without it the
tests are skipped and say why; as root (CI) a program the kernel refuses is a failure, not a
skip. C's SRTP program also needs the BPF crypto kfuncs (Linux 6.10+): a kernel without them
skips its tests, saying so."""

from __future__ import annotations

import errno
import os
import socket
from typing import Protocol

import pytest

from media_relay import kernel, kernel_srtp


def require_kernel() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel forwarding needs root (CAP_BPF, CAP_NET_ADMIN)")
    probe = kernel.KernelForwarder.open()  # raises KernelUnavailable with the verifier's words
    probe.close()


def require_srtp_kernel() -> None:
    """``require_kernel`` for C's SRTP program (``media_relay/kernel_srtp.py``)."""
    require_kernel()
    try:
        probe = kernel_srtp.SrtpKernel.open()
    except kernel.KernelUnavailable as exc:
        if exc.errno in (errno.ENOSYS, errno.ENOENT):  # no vmlinux BTF, or no BPF crypto kfuncs
            pytest.skip(f"kernel SRTP: {exc}")
        raise  # refused: the verifier's words
    probe.close()


class LoopbackSockets:
    """The UDP sockets of a kernel-forwarding rig: bound on loopback, a 2 s timeout each."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []

    def _sock(self, host: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sock.settimeout(2.0)
        self.socks.append(sock)
        return sock

    @staticmethod
    def name(sock: socket.socket) -> tuple[str, int]:
        host, port = sock.getsockname()
        return str(host), int(port)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


class _Closable(Protocol):
    def close(self) -> None: ...


class KernelRig(LoopbackSockets):
    """A client, the relay's ingress port, its egress socket and the destination, on loopback,
    and the kernel program under test (closed with the sockets)."""

    kernel: _Closable

    def __init__(self) -> None:
        super().__init__()
        self.client = self._sock("127.0.0.1")
        self.relay = self._sock("127.0.0.2")
        self.egress = self._sock("127.0.0.2")
        self.dest = self._sock("127.0.0.3")

    def send(self, data: bytes) -> None:
        self.client.sendto(data, self.name(self.relay))

    def close(self) -> None:
        self.kernel.close()
        super().close()
