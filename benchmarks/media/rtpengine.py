"""rtpengine (Debian `rtpengine-daemon` 10.5) as the reference relay, driven over its ng protocol.

ng = ``<cookie> <bencoded dict>`` in one UDP datagram each way; commands used: ``ping``,
``offer``, ``answer``. Userspace forwarding only (``--table=-1``: no kernel module here), one
worker thread, pinned to one core, started in the foreground and stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from typing import Any, TextIO

from benchmarks.media.procs import pin

Bencodable = int | str | bytes | list[Any] | dict[str, Any]


def bencode(value: Bencodable) -> bytes:
    if isinstance(value, bool):
        raise TypeError("bencode has no booleans")
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(bencode(v) for v in value) + b"e"
    if isinstance(value, dict):
        items = sorted((k.encode(), v) for k, v in value.items())
        return b"d" + b"".join(bencode(k) + bencode(v) for k, v in items) + b"e"
    raise TypeError(f"cannot bencode {type(value).__name__}")


def bdecode(data: bytes) -> Any:
    value, end = _decode(data, 0)
    if end != len(data):
        raise ValueError("trailing bytes after bencoded value")
    return value


def _decode(data: bytes, i: int) -> tuple[Any, int]:
    c = data[i : i + 1]
    if c == b"i":
        end = data.index(b"e", i)
        return int(data[i + 1 : end]), end + 1
    if c == b"l":
        items: list[Any] = []
        i += 1
        while data[i : i + 1] != b"e":
            item, i = _decode(data, i)
            items.append(item)
        return items, i + 1
    if c == b"d":
        out: dict[str, Any] = {}
        i += 1
        while data[i : i + 1] != b"e":
            key, i = _decode(data, i)
            out[key.decode() if isinstance(key, bytes) else str(key)], i = _decode(data, i)
        return out, i + 1
    if c.isdigit():
        colon = data.index(b":", i)
        n = int(data[i:colon])
        return data[colon + 1 : colon + 1 + n], colon + 1 + n
    raise ValueError(f"bad bencode at offset {i}")


def plain_sdp(addr: tuple[str, int], session: int) -> str:
    return (
        f"v=0\r\no=- {session} 1 IN IP4 {addr[0]}\r\ns=-\r\nc=IN IP4 {addr[0]}\r\nt=0 0\r\n"
        f"m=audio {addr[1]} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    )


_C_LINE = re.compile(r"^c=IN IP4 (\S+)", re.M)
_M_LINE = re.compile(r"^m=audio (\d+) ", re.M)


def sdp_media_addr(sdp: str) -> tuple[str, int]:
    c, m = _C_LINE.search(sdp), _M_LINE.search(sdp)
    if c is None or m is None:
        raise ValueError(f"no c=/m=audio in {sdp!r}")
    return c.group(1), int(m.group(1))


class Rtpengine:
    """One rtpengine process on ``ip`` (media and ng control), pinned to ``cpu``."""

    def __init__(self, ip: str, cpu: int, log: TextIO, *, threads: int = 1, ng_port: int = 22222) -> None:
        self.ip = ip
        self.ng = (ip, ng_port)
        self.proc = subprocess.Popen(
            [
                "rtpengine",
                "--foreground",
                "--config-file=none",
                "--table=-1",
                f"--interface={ip}",
                f"--listen-ng={ip}:{ng_port}",
                "--port-min=20000",
                "--port-max=59999",
                f"--num-threads={threads}",
                "--log-stderr",
                "--log-level=3",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=lambda: pin(cpu),
        )
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((ip, 0))
        self._cookie = 0
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.command({"command": "ping"}, timeout_s=0.5).get("result") == b"pong":
                    break
            except TimeoutError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("rtpengine did not answer ng ping (see its log)")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def command(self, cmd: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
        self._cookie += 1
        cookie = b"c%d" % self._cookie
        self._sock.settimeout(timeout_s)
        self._sock.sendto(cookie + b" " + bencode(cmd), self.ng)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                data = self._sock.recv(65535)
            except TimeoutError:
                break
            got, _, body = data.partition(b" ")
            if got == cookie:
                reply: dict[str, Any] = bdecode(body)
                return reply
        raise TimeoutError(f"ng {cmd.get('command')}: no answer")

    def call(
        self, call_id: str, a: tuple[str, int], b: tuple[str, int]
    ) -> tuple[tuple[str, int], tuple[str, int]]:
        """offer (from a) + answer (from b); returns (where a sends to, where b sends to)."""
        common = {"call-id": call_id, "from-tag": "a-" + call_id, "replace": ["origin"], "ICE": "remove"}
        offer = self.command({"command": "offer", "sdp": plain_sdp(a, 1), **common})
        if offer.get("result") != b"ok":
            raise RuntimeError(f"offer refused: {offer}")
        answer = self.command(
            {"command": "answer", "sdp": plain_sdp(b, 2), "to-tag": "b-" + call_id, **common}
        )
        if answer.get("result") != b"ok":
            raise RuntimeError(f"answer refused: {answer}")
        to_b = sdp_media_addr(bytes(offer["sdp"]).decode())
        to_a = sdp_media_addr(bytes(answer["sdp"]).decode())
        return to_a, to_b

    def close(self) -> None:
        self._sock.close()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
