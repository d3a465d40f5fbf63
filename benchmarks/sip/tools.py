"""Load tools of the SIP benchmark: sipp runs with statistics, a Kamailio registrar peer, py-spy.

sipp 3.6.1 here has no TLS (shared/TOOLS.md), so every run goes plain TCP to a local stunnel4
client (tests/sip_tools.py `Stunnel`) that carries it over TLS to the target: Expressway-E's
5061, or Kamailio's TLS listener. Kamailio runs in the foreground (`-DD -E`) with a generated
config and a self-signed certificate; both are stopped by their own PID.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.sip_tools import free_port, require, stop_process, tcp_listening, wait_for

HERE = Path(__file__).resolve().parent
KAMAILIO_MODULES = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules")


def write_users(path: Path, count: int, first_dn: int = 20001, start: int = 1) -> Path:
    """sipp injection file of the lab's load population, users start…start+count-1:
    DN; device (CSFLOAD00001…); instance."""
    lines = ["SEQUENTIAL"]
    for i in range(start, start + count):
        lines.append(f"{first_dn + i - 1};CSFLOAD{i:05d};00000000-0000-4000-8000-{i:012d}")
    path.write_text("\n".join(lines) + "\n")
    return path


# -- sipp ----------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    rate_target: float
    calls: int
    successful: int
    failed: int
    elapsed_s: float
    rtd_mean_ms: float
    returncode: int
    errors_tail: str

    @property
    def achieved(self) -> float:
        return self.successful / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and self.failed == 0 and self.successful == self.calls


def _hms(text: str) -> float:
    """sipp's `HH:MM:SS:mmmuuu`-style durations to seconds (last field: fractional digits)."""
    parts = text.strip().split(":")
    if len(parts) < 3:
        return float(parts[-1] or 0)
    h, m, s = (int(p) for p in parts[:3])
    frac = parts[3] if len(parts) > 3 else "0"
    return float(h * 3600 + m * 60 + s) + int(frac or 0) / float(10 ** len(frac or "0"))


def _epoch(text: str) -> float:
    """sipp's `date<TAB>time<TAB>epoch` timestamps: the epoch seconds (0 when absent)."""
    try:
        return float(text.split("\t")[-1])
    except ValueError:
        return 0.0


def parse_stats(path: Path) -> dict[str, str]:
    """The last (cumulative) row of sipp's `-trace_stat` CSV as {column: value}."""
    if not path.exists():
        return {}
    rows = [r for r in path.read_text(errors="replace").splitlines() if r.strip()]
    if len(rows) < 2:
        return {}
    head = rows[0].split(";")
    return dict(zip(head, rows[-1].split(";"), strict=False))


class SippLoad:
    """One bounded sipp load run (`-m calls` at `-r rate`, hard `-timeout`)."""

    def __init__(
        self,
        scenario: str,
        *,
        remote: tuple[str, int],
        local_ip: str,
        workdir: Path,
        users: Path,
        transport: str,
        rate: float,
        calls: int,
        limit: int,
        timeout_s: float,
        keys: dict[str, str],
        globals_: dict[str, str] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.rate = rate
        self.calls = calls
        self.timeout_s = timeout_s
        self.stat = workdir / "stat.csv"
        argv = [
            require("sipp"),
            f"{remote[0]}:{remote[1]}",
            "-sf",
            str(HERE / scenario),
            "-t",
            transport,
            "-i",
            local_ip,
            "-p",
            str(free_port(local_ip)),
            "-inf",
            str(users),
            "-r",
            f"{rate:g}",
            "-rp",
            "1000",
            "-m",
            str(calls),
            "-l",
            str(limit),
            "-nostdin",
            "-timeout",
            f"{int(timeout_s)}s",
            "-max_reconnect",
            "0",
            "-max_socket",
            str(max(calls + 100, 1000)),
            "-trace_stat",
            "-stf",
            str(self.stat),
            "-fd",
            "1",
            "-trace_err",
            "-error_file",
            str(workdir / "errors.log"),
            "-error_overwrite",
            "true",
        ]
        for k, v in keys.items():
            argv += ["-key", k, v]
        for k, v in (globals_ or {}).items():
            argv += ["-set", k, v]
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> SippLoad:
        with (self.workdir / "stdout.log").open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, "TERM": "dumb"},
            )
        self.started = time.monotonic()
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self) -> LoadResult:
        assert self.proc is not None
        try:
            code = self.proc.wait(self.timeout_s + 15)
        except subprocess.TimeoutExpired:
            code = stop_process(self.proc)
        wall = time.monotonic() - self.started
        stats = parse_stats(self.stat)
        ok = int(stats.get("SuccessfulCall(C)", "0") or 0)
        failed = int(stats.get("FailedCall(C)", "0") or 0)
        elapsed = _epoch(stats.get("CurrentTime", "")) - _epoch(stats.get("StartTime", ""))
        if elapsed <= 0:
            elapsed = wall
        rtd = _hms(stats.get("ResponseTime1(C)", "0") or "0") * 1000
        err = self.workdir / "errors.log"
        tail = err.read_text(errors="replace")[-1500:] if err.exists() else ""
        if code not in (0, 1):
            tail += (self.workdir / "stdout.log").read_text(errors="replace")[-1500:]
        return LoadResult(self.rate, self.calls, ok, failed, elapsed, rtd, code, tail)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


# -- Kamailio ----------------------------------------------------------------------------------------

_KAMAILIO_CFG = """#!KAMAILIO
# A plain in-memory registrar for the REGISTER benchmark (benchmarks/sip/run.py).
debug=0
log_stderror=yes
fork=yes
children={children}
tcp_children={children}
auto_aliases=no
enable_tls=yes
listen=tls:{ip}:{tls_port}
listen=tcp:{ip}:{tcp_port}
tcp_connection_lifetime=3605
tcp_max_connections=40000
tls_max_connections=40000
mpath="{modules}"
loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "tls.so"
modparam("tls", "config", "{tls_cfg}")
modparam("usrloc", "db_mode", 0)
modparam("registrar", "max_expires", 120)
modparam("registrar", "default_expires", 120)

request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (is_method("REGISTER")) {{
        if (!save("location")) {{
            sl_reply_error();
        }}
        exit;
    }}
    sl_send_reply("404", "Not here");
    exit;
}}
"""

_TLS_CFG = """[server:default]
method = TLSv1.2+
verify_certificate = no
require_certificate = no
private_key = {key}
certificate = {cert}

[client:default]
verify_certificate = no
require_certificate = no
"""

KAMAILIO_NAME = "kamailio.bench.example"


class Kamailio:
    """Kamailio 5.6 as a registrar on `ip`: TLS (through stunnel, like E) and plain TCP."""

    def __init__(self, *, ip: str, workdir: Path, children: int = 2) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.ip = ip
        self.workdir = workdir
        self.tls_port = free_port(ip)
        self.tcp_port = free_port(ip)
        self.cert = workdir / "cert.pem"
        key = workdir / "key.pem"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-days", "2", "-subj", f"/CN={KAMAILIO_NAME}",
                "-addext", f"subjectAltName=DNS:{KAMAILIO_NAME}",
                "-keyout", str(key), "-out", str(self.cert),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )  # fmt: skip
        tls_cfg = workdir / "tls.cfg"
        tls_cfg.write_text(_TLS_CFG.format(key=key, cert=self.cert))
        self.cfg = workdir / "kamailio.cfg"
        self.cfg.write_text(
            _KAMAILIO_CFG.format(
                children=children,
                ip=ip,
                tls_port=self.tls_port,
                tcp_port=self.tcp_port,
                modules=KAMAILIO_MODULES,
                tls_cfg=tls_cfg,
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Kamailio:
        binary = require("kamailio")
        with (self.workdir / "kamailio.log").open("wb") as out:
            self.proc = subprocess.Popen(
                [binary, "-f", str(self.cfg), "-DD", "-E", "-m", "256", "-M", "16",
                 "-P", str(self.workdir / "kamailio.pid"), "-Y", str(self.workdir)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )  # fmt: skip
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                log = (self.workdir / "kamailio.log").read_text(errors="replace")
                raise RuntimeError(f"kamailio exited {proc.returncode}:\n{log[-3000:]}")
            return tcp_listening((self.ip, self.tls_port)) and tcp_listening((self.ip, self.tcp_port))

        wait_for(up, 20, "kamailio listening")
        # Its workers fork after the listeners open: wait until the process count settles, so
        # that the CPU of every worker is counted (one run saw only two of seven processes).
        seen, stable_since = 0, time.monotonic()
        deadline = stable_since + 10
        while time.monotonic() < deadline:
            count = len(self.pids())
            if count != seen:
                seen, stable_since = count, time.monotonic()
            elif time.monotonic() - stable_since >= 1.0:
                break
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def pids(self) -> list[int]:
        """The main process and its forked workers (children by /proc/<pid>/stat's ppid)."""
        if self.proc is None:
            return []
        out = [self.proc.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if int(stat[1]) == self.proc.pid:
                        out.append(int(entry.name))
        return out


# -- py-spy ---------------------------------------------------------------------------------------------


def pyspy_record(pid: int, out: Path, duration_s: int, rate_hz: int = 200) -> subprocess.Popen[bytes]:
    """Start `py-spy record` (raw collapsed stacks) on a running process for `duration_s`
    (`--native` was seen to crash py-spy 0.4.3 here, so C frames of uvloop/OpenSSL show up as
    self time of the Python frame that called them)."""
    binary = Path(sys.executable).parent / "py-spy"
    exe = str(binary) if binary.exists() else require("py-spy")
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(duration_s), "--rate", str(rate_hz),
         "--format", "raw", "--output", str(out), "--nonblocking"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def top_functions(
    collapsed: Path, n: int = 8
) -> tuple[int, list[tuple[str, float, float]], list[tuple[str, float]]]:
    """From py-spy's collapsed stacks: (samples, top by self time [(function, self %, total %)],
    top project frames by inclusive time [(function, total %)])."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    if not collapsed.exists():
        return 0, [], []
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_short(f) for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] += count
        for f in set(frames):
            total[f] += count
    if not samples:
        return 0, [], []
    rows = [(f, 100 * c / samples, 100 * total[f] / samples) for f, c in own.most_common(n)]
    skip = ("asyncio/", "runners.py", "<module>", "__main__", "runtime.py", "cli.py", "core.py:", "main.py")
    inclusive = [
        (f, 100 * c / samples)
        for f, c in total.most_common()
        if not any(s in f for s in skip) and 100 * c / samples < 95
    ][:n]
    return samples, rows, inclusive


def _short(frame: str) -> str:
    """`func (path/to/module.py:123)` → `func (module.py:123)`."""
    name, _, where = frame.partition(" (")
    if not where:
        return frame
    path = where.rstrip(")")
    parts = path.split("/")
    tail = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({tail})"
