"""Kernel forwarding (``media_relay/kernel.py``) needs root: without it its tests are skipped and
say why; as root (CI) a program the kernel refuses is a failure, not a skip."""

from __future__ import annotations

import os

import pytest

from media_relay import kernel


def require_kernel() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel forwarding needs root (CAP_BPF, CAP_NET_ADMIN)")
    probe = kernel.KernelForwarder.open()  # raises KernelUnavailable with the verifier's words
    probe.close()
