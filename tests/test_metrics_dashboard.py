"""The Grafana dashboard uses only metrics the lab processes really export.

Scrapes /metrics of every process of a running lab, parses the text with prometheus_client's
own parser, and checks that each PromQL expression of dashboards/grafana-mra-edge.json names
only metrics found there.
"""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, RunningLab

DASHBOARD = REPO / "dashboards" / "grafana-mra-edge.json"
PROMQL_WORDS = {
    # aggregation operators and their modifiers, binary operators, keywords
    *("sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile"),
    *("by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"),
    *("offset", "inf", "nan"),
}


def scrape(lab: RunningLab) -> dict[str, set[str]]:
    """{component: every sample name and family name it exports}."""
    out: dict[str, set[str]] = {}
    for comp in lab.status()["components"]:
        admin = comp["admin"]
        with urllib.request.urlopen(f"http://{admin['host']}:{admin['port']}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        names: set[str] = set()
        for family in text_string_to_metric_families(text):
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
        out[comp["name"]] = names
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (labels, functions, durations removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals (label values)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\b[a-zA-Z_][a-zA-Z0-9_]*\s*\(", "(", expr)  # function names
    tokens = re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr)
    return {t for t in tokens if t.lower() not in PROMQL_WORDS}


def dashboard_exprs() -> list[tuple[str, str]]:
    dash: dict[str, Any] = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            inner = re.fullmatch(r"label_values\((\w+)\s*,\s*\w+\)", var["query"])
            assert inner, var["query"]
            out.append((f"variable {var['name']}", inner.group(1)))
    return out


def test_metric_name_extraction() -> None:
    assert metric_names('sum by (component) (rate(edge_dns_answers_total{job=~"$job"}[5m])) * 60') == {
        "edge_dns_answers_total"
    }
    assert metric_names("max by (a, b) (x_one) / on (c) group_left y_two") == {"x_one", "y_two"}


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"


def test_dashboard_uses_only_exported_metrics(lab: RunningLab) -> None:
    exported = scrape(lab)
    assert set(exported) == {"dns", "ucm1", "imp1", "cuc1", "expc", "expe"}
    # The Expressways export the zone metrics; C its own view (maintenance, nodes, sessions).
    assert {"edge_zone_active", "edge_zone_channel_active"} <= exported["expc"] & exported["expe"]
    assert {"edge_maintenance", "edge_node_down", "edge_provisioning_sessions"} <= exported["expc"]
    # The mock UCM exports its registrar's view (a broken sample source used to vanish silently).
    assert {
        "edge_ucm_registrations",
        "edge_ucm_registrations_peak",
        "edge_ucm_register_new_total",
    } <= exported["ucm1"]
    everything = set().union(*exported.values())
    missing = {
        (title, name)
        for title, expr in dashboard_exprs()
        for name in metric_names(expr)
        if name not in everything
    }
    assert not missing, f"dashboard names metrics no process exports: {sorted(missing)}"
    used = {name for _, expr in dashboard_exprs() for name in metric_names(expr)}
    assert len(used) >= 10
