"""Prometheus exposition of a component's live counters.

Components keep plain int counters on their hot paths (no metric-library call per packet or per
message); at scrape time a collector turns `component.metric_samples()` into metric families
with stable names and labels. Every name starts with ``edge_``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    name: str
    kind: str  # "gauge" | "counter"
    help: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


class HasSamples(Protocol):
    name: str
    role: str

    def metric_samples(self) -> Iterable[Sample]: ...


class StatusCollector(Collector):
    def __init__(self, component: Any) -> None:
        self.component = component

    def collect(self) -> Iterator[Metric]:
        try:
            samples = list(self.component.metric_samples())
        except AttributeError:
            return
        except Exception:  # a scrape must never break the endpoint; the sample set is just smaller
            log.exception("metrics: %s: collecting samples failed", getattr(self.component, "name", "?"))
            samples = []
        families: dict[str, Metric] = {}
        label_names: dict[str, list[str]] = {}
        base = {"component": self.component.name, "role": self.component.role}
        for s in samples:
            labels = {**base, **s.labels}
            fam = families.get(s.name)
            if fam is None:
                names = sorted(labels)
                label_names[s.name] = names
                if s.kind == "counter":
                    name = s.name[: -len("_total")] if s.name.endswith("_total") else s.name
                    fam = CounterMetricFamily(name, s.help, labels=names)
                else:
                    fam = GaugeMetricFamily(s.name, s.help, labels=names)
                families[s.name] = fam
            names = label_names[s.name]
            fam.add_metric([labels.get(n, "") for n in names], s.value)  # type: ignore[attr-defined]
        yield from families.values()


def zone_samples(zone: dict[str, Any]) -> list[Sample]:
    """Samples for a zone status dict as built by traversal.zone.zone_summary."""
    out = [
        Sample(
            "edge_zone_active",
            "gauge",
            "1 when every channel of the traversal zone is active",
            1.0 if zone["state"] == "Active" else 0.0,
            {"zone": zone["name"]},
        ),
        Sample(
            "edge_zone_reconnects_total",
            "counter",
            "Traversal channel reconnects",
            float(zone.get("reconnects", 0)),
            {"zone": zone["name"]},
        ),
    ]
    for ch in zone.get("channels", []):
        out.append(
            Sample(
                "edge_zone_channel_active",
                "gauge",
                "1 when this traversal channel is active",
                1.0 if ch["state"] == "active" else 0.0,
                {"zone": zone["name"], "channel": ch["channel"], "peer": ch["peer"]},
            )
        )
    return out


def counter_samples(prefix: str, help_text: str, counters: dict[str, int], label: str) -> list[Sample]:
    return [Sample(prefix, "counter", help_text, float(v), {label: k}) for k, v in sorted(counters.items())]
