"""Loopback address plans for extra labs: tests and benchmarks each take a free ``127.N`` block.

The default lab (``./dev lab``) lives on 127.10.x. A block ``N`` puts the DNS server on
``127.N.0.53``, E on ``127.N.1.10`` (outside) and ``127.N.2.10`` (DMZ), and C, UCM, IM&P and
Unity on ``127.N.3.x`` (inside), mirroring the default plan.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path

# Addresses probed to decide whether a block is taken: a running lab listens on these.
_PROBED = ("0.53", "1.10", "2.10", "3.10", "3.20")
_PROBE_PORT = 9080


def block_overrides(block: int, state_dir: Path | str) -> list[str]:
    """``--set`` overrides that move every lab component into ``127.<block>.x``."""
    p = f"127.{block}"
    return [
        f'lab.state_dir="{state_dir}"',
        "lab.demo=false",
        f'dns.address="{p}.0.53"',
        f'dns.internal_clients=["{p}.2.0/24", "{p}.3.0/24"]',
        f'expe.0.external_address="{p}.1.10"',
        f'expe.0.internal_address="{p}.2.10"',
        f'expc.address="{p}.3.10"',
        f'ucm.0.address="{p}.3.20"',
        f'imp.0.address="{p}.3.30"',
        f'cuc.0.address="{p}.3.40"',
    ]


def block_is_free(block: int) -> bool:
    """True when nothing is bound on the block's probe addresses (no other lab lives there)."""
    for octets in _PROBED:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((f"127.{block}.{octets}", _PROBE_PORT))
            except OSError:
                return False
    return True


def find_free_block(candidates: Iterable[int]) -> int:
    """The first free block among ``candidates`` (each in 1..254); RuntimeError if none is."""
    for block in candidates:
        if 0 < block < 255 and block_is_free(block):
            return block
    raise RuntimeError("no free 127.x block for a lab")
