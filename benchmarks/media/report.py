"""Shared by both parts of the media benchmark: targets, counter deltas, formatting, py-spy."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.media.procs import pin

LOSS_TARGET_PCT = 0.1


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Counters over the window only (set-up leaves drops: C's pinhole packets, warm-up)."""
    return {k: v - before.get(k, 0) if isinstance(v, int) else v for k, v in after.items()}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt_us(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.0f}"


# -- profiling ----------------------------------------------------------------------------------


class Profile:
    """py-spy on one process for one window (pinned to CPU 0 with the load); top self-time."""

    def __init__(self, pid: int, seconds: float, out: Path, native: bool) -> None:
        self.out = out
        cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-d", f"{seconds:.0f}"]
        cmd += ["-r", "200", "-f", "raw", "-o", str(out), "--nonblocking"] + (["--native"] if native else [])
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: pin(0)
        )

    def top(self, k: int = 10) -> list[str]:
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if not self.out.exists():
            return ["(py-spy wrote nothing)"]
        own: Counter[str] = Counter()
        total = 0
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            leaf = re.sub(r":\d+\)", ")", stack.split(";")[-1])
            own[leaf] += int(count)
            total += int(count)
        return [f"{100 * c / max(total, 1):5.1f}%  {name}" for name, c in own.most_common(k)]
