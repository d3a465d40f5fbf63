"""Prometheus samples of a relay's media (spec §7): totals, and per stream leg while it lives.

Built from the component's media ``snapshot()`` (E's ``EdgeMedia``, C's ``GatewayMedia``), which
folds the native and kernel paths' counters in first, so ``/metrics`` and ``/status`` agree.
Per-leg series carry ``call``, ``stream`` and ``leg`` labels (E: ``client`` and ``c``; C:
``outside`` and ``inside``); they exist while the stream does, so the cardinality is bounded by
the live calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from edge.metrics import Sample

_DROPS = ("garbage", "unlatched", "not_latched", "transcode", "unknown_port", "unknown_source")
_E_LEGS = ("client", "c")


def media_samples(snapshot: dict[str, Any]) -> Iterator[Sample]:
    if not snapshot.get("running"):
        return
    totals = snapshot["totals"]
    yield Sample("edge_media_streams", "gauge", "Media streams relayed now", float(totals["streams"]))
    for direction in ("rx", "tx"):
        labels = {"direction": direction}
        yield Sample(
            "edge_media_packets_total",
            "counter",
            "Media packets relayed",
            float(totals[f"{direction}_packets"]),
            labels,
        )
        yield Sample(
            "edge_media_bytes_total",
            "counter",
            "Media bytes relayed",
            float(totals[f"{direction}_bytes"]),
            labels,
        )
    for reason in _DROPS:
        yield Sample(
            "edge_media_drops_total",
            "counter",
            "Media datagrams dropped, by reason",
            float(totals.get(f"{reason}_drops", 0)),
            {"reason": reason},
        )
    worker = snapshot.get("worker", {})
    kernel = worker.get("kernel", {})
    if "flows" in kernel:
        yield Sample(
            "edge_media_kernel_flows", "gauge", "Media flows forwarded in the kernel", float(kernel["flows"])
        )
    auth_failures = 0
    for call, streams in snapshot["calls"].items():
        for st in streams:
            for leg, numbers in _legs(st):
                labels = {"call": call, "stream": st["stream_id"], "leg": leg}
                auth_failures += numbers.get("srtp_auth_failures", 0)
                yield from _leg_samples(numbers, labels)
    if snapshot.get("role") == "expc":
        yield Sample(
            "edge_media_srtp_auth_failures",
            "gauge",
            "SRTP/SRTCP authentication failures on the live streams",
            float(auth_failures),
        )


def _legs(st: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(leg name, numbers) in one shape for E's and C's stream snapshots."""
    if "outside" in st:  # C
        for name in ("outside", "inside"):
            leg = st[name]
            yield (
                name,
                {
                    "rx_packets": leg["packets"],
                    "rx_bytes": leg["bytes"],
                    "tx_packets": leg["packets_sent"],
                    "tx_bytes": leg["bytes_sent"],
                    "lost": leg["lost"],
                    "jitter_ms": leg["jitter_ms"],
                    "srtp_auth_failures": leg["srtp_auth_failures"],
                },
            )
        return
    stream = st.get("stream")
    if stream is None:  # offered, not relaying yet
        return
    for name, leg in zip(_E_LEGS, stream["legs"], strict=False):
        yield (
            name,
            {
                "rx_packets": leg["rx_packets"],
                "rx_bytes": leg["rx_bytes"],
                "tx_packets": leg["tx_packets"],
                "tx_bytes": leg["tx_bytes"],
                "lost": leg["rtp"]["lost"],
                "jitter_ms": leg["rtp"]["jitter_ms"],
            },
        )


def _leg_samples(numbers: dict[str, Any], labels: dict[str, str]) -> Iterator[Sample]:
    for direction in ("rx", "tx"):
        leg_labels = {**labels, "direction": direction}
        yield Sample(
            "edge_media_leg_packets_total",
            "counter",
            "Media packets of a live stream leg",
            float(numbers[f"{direction}_packets"]),
            leg_labels,
        )
        yield Sample(
            "edge_media_leg_bytes_total",
            "counter",
            "Media bytes of a live stream leg",
            float(numbers[f"{direction}_bytes"]),
            leg_labels,
        )
    yield Sample(
        "edge_media_leg_lost",
        "gauge",
        "RTP packets lost on a live stream leg (RFC 3550 A.3)",
        float(numbers["lost"]),
        labels,
    )
    yield Sample(
        "edge_media_leg_jitter_ms",
        "gauge",
        "Interarrival jitter of a live stream leg (RFC 3550 A.8)",
        float(numbers["jitter_ms"]),
        labels,
    )
    if "srtp_auth_failures" in numbers:
        yield Sample(
            "edge_media_leg_srtp_auth_failures",
            "gauge",
            "SRTP/SRTCP authentication failures on a live stream leg",
            float(numbers["srtp_auth_failures"]),
            labels,
        )
