"""The report of a load run: a JSON document and a self-contained HTML page.

The page has no external reference at all (no CDN, no font, no image URL): the plots are inline
SVG drawn here, and a few lines of inline JavaScript add a hover read-out on the time plots from
the report JSON embedded in the page.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import os
import resource
import time
from collections.abc import Sequence
from typing import Any

from mra_client.load.engine import LoadEngine

REPORT_FORMAT = 1
PLOT_W, PLOT_H = 600, 240
_MARGIN_L, _MARGIN_R, _MARGIN_T, _MARGIN_B = 56, 16, 16, 36
_MAX_BARS = 400
COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")


def build_report(engine: LoadEngine, load_before: tuple[float, float, float]) -> dict[str, Any]:
    settings = engine.settings.as_dict()
    settings["password_pattern"] = "(hidden)"
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "tool": "edge load",
        "format": REPORT_FORMAT,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(engine.started_wall)),
        "elapsed_s": engine.elapsed_s,
        "stopped": engine.stop_reason,
        "settings": settings,
        "edge": {
            "domain": engine.client.domain,
            "dns": f"{engine.client.dns_server}:{engine.client.dns_port}",
            "ca_file": engine.client.ca_file,
        },
        "host": {
            "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "generator_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "generator_max_rss_mib": round(usage.ru_maxrss / 1024, 1),
        },
        **engine.stats.as_dict(),
    }


def write_report(report: dict[str, Any], json_path: str, html_path: str) -> None:
    with open(json_path, "w") as fh:
        json.dump(report, fh, indent=1)
        fh.write("\n")
    with open(html_path, "w") as fh:
        fh.write(render_html(report))


# -- SVG plots ------------------------------------------------------------------------------------


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return float(step * exp)
    return float(10 * exp)


def _fmt(v: float) -> str:
    if v == int(v):
        return str(int(v))
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.0f}"


def _frame(
    plot_id: str, kind: str, title: str, y_max: float, x_labels: Sequence[tuple[float, str]]
) -> list[str]:
    inner_w = PLOT_W - _MARGIN_L - _MARGIN_R
    inner_h = PLOT_H - _MARGIN_T - _MARGIN_B
    out = [
        f'<svg class="plot" data-plot="{plot_id}" data-kind="{kind}" viewBox="0 0 {PLOT_W} {PLOT_H}" '
        f'width="{PLOT_W}" height="{PLOT_H}" role="img" aria-label="{html.escape(title)}">',
        f'<rect class="bg" x="{_MARGIN_L}" y="{_MARGIN_T}" width="{inner_w}" height="{inner_h}"/>',
    ]
    for i in range(5):
        value = y_max * i / 4
        y = _MARGIN_T + inner_h - inner_h * i / 4
        out.append(
            f'<line class="grid" x1="{_MARGIN_L}" x2="{PLOT_W - _MARGIN_R}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        out.append(
            f'<text class="tick" x="{_MARGIN_L - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(value)}</text>'
        )
    for frac, label in x_labels:
        x = _MARGIN_L + inner_w * frac
        out.append(
            f'<text class="tick" x="{x:.1f}" y="{PLOT_H - _MARGIN_B + 16}" text-anchor="middle">'
            f"{html.escape(label)}</text>"
        )
    return out


def line_plot(
    plot_id: str,
    title: str,
    xs: Sequence[float],
    series: Sequence[tuple[str, Sequence[float]]],
    x_unit: str = "s",
) -> str:
    inner_w = PLOT_W - _MARGIN_L - _MARGIN_R
    inner_h = PLOT_H - _MARGIN_T - _MARGIN_B
    x_max = max(xs) if xs else 1.0
    x_max = x_max if x_max > 0 else 1.0
    y_max = _nice_max(max((max(ys) for _, ys in series if ys), default=0.0))
    x_labels = [(i / 4, f"{_fmt(round(x_max * i / 4, 1))} {x_unit}") for i in range(5)]
    out = _frame(plot_id, "line", title, y_max, x_labels)
    legend = []
    for n, (name, ys) in enumerate(series):
        color = COLORS[n % len(COLORS)]
        points = " ".join(
            f"{_MARGIN_L + inner_w * x / x_max:.1f},{_MARGIN_T + inner_h - inner_h * y / y_max:.1f}"
            for x, y in zip(xs, ys, strict=False)
        )
        out.append(
            f'<polyline class="series" data-series="{html.escape(name)}" data-points="{len(ys)}" '
            f'fill="none" stroke="{color}" stroke-width="2" points="{points}"/>'
        )
        legend.append(f'<span class="key" style="color:{color}">━ {html.escape(name)}</span>')
    out.append(
        f'<line class="cursor" x1="-10" x2="-10" y1="{_MARGIN_T}" y2="{_MARGIN_T + inner_h}" '
        f'data-x0="{_MARGIN_L}" data-w="{inner_w}" data-xmax="{x_max}"/>'
    )
    out.append("</svg>")
    return _figure(plot_id, title, "".join(out), " ".join(legend))


def bar_plot(
    plot_id: str,
    title: str,
    labels: Sequence[str],
    values: Sequence[float],
    unit: str = "",
    color: str = COLORS[0],
    tick_labels: Sequence[str] | None = None,
) -> str:
    inner_w = PLOT_W - _MARGIN_L - _MARGIN_R
    inner_h = PLOT_H - _MARGIN_T - _MARGIN_B
    y_max = _nice_max(max(values, default=0.0))
    n = max(1, len(values))
    step = max(1, math.ceil(n / 6))  # at most 6 labels under the bars (each bar has a tooltip)
    ticks = tick_labels or labels
    x_labels = [((i + 0.5) / n, ticks[i]) for i in range(0, len(labels), step)]
    out = _frame(plot_id, "bars", title, y_max, x_labels)
    width = inner_w / n
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        h = inner_h * value / y_max
        x = _MARGIN_L + i * width + width * 0.1
        out.append(
            f'<rect class="bar" x="{x:.1f}" y="{_MARGIN_T + inner_h - h:.1f}" '
            f'width="{max(0.5, width * 0.8):.1f}" height="{h:.1f}" fill="{color}" data-value="{value}">'
            f"<title>{html.escape(label)}: {_fmt(value)}{unit}</title></rect>"
        )
    out.append("</svg>")
    return _figure(plot_id, title, "".join(out), "")


def hbar_plot(plot_id: str, title: str, rows: Sequence[tuple[str, float]], empty: str) -> str:
    if not rows:
        return _figure(plot_id, title, f'<p class="empty" data-plot="{plot_id}">{html.escape(empty)}</p>', "")
    row_h = 26
    height = 16 + row_h * len(rows)
    label_w = 300
    bar_w = PLOT_W - label_w - 60
    top = max(v for _, v in rows) or 1.0
    out = [
        f'<svg class="plot" data-plot="{plot_id}" data-kind="hbars" viewBox="0 0 {PLOT_W} {height}" '
        f'width="{PLOT_W}" height="{height}" role="img" aria-label="{html.escape(title)}">'
    ]
    for i, (label, value) in enumerate(rows):
        y = 8 + i * row_h
        w = max(1.0, bar_w * value / top)
        short = label if len(label) <= 44 else label[:43] + "…"
        out.append(
            f'<text class="tick" x="{label_w - 8}" y="{y + 16}" text-anchor="end">{html.escape(short)}</text>'
        )
        out.append(
            f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" '
            f'fill="{COLORS[1]}" data-value="{value}">'
            f"<title>{html.escape(label)}: {_fmt(value)}</title></rect>"
        )
        out.append(f'<text class="tick" x="{label_w + w + 6:.1f}" y="{y + 16}">{_fmt(value)}</text>')
    out.append("</svg>")
    return _figure(plot_id, title, "".join(out), "")


def _figure(plot_id: str, title: str, body: str, legend: str) -> str:
    return (
        f'<figure id="fig-{plot_id}"><figcaption>{html.escape(title)}</figcaption>{body}'
        f'<div class="legend">{legend}<span class="readout" data-for="{plot_id}"></span></div></figure>'
    )


def _histogram(values: Sequence[float], bins: int = 20) -> tuple[list[str], list[float], list[str]]:
    """Bar labels (bin ranges), counts, and short tick labels (bin starts)."""
    if not values:
        return [], [], []
    top = max(values)
    width = _nice_max(top) / bins if top > 0 else 1.0
    counts = [0.0] * bins
    for v in values:
        counts[min(bins - 1, int(v / width))] += 1
    ranges = [f"{_fmt(width * i)}–{_fmt(width * (i + 1))} ms" for i in range(bins)]
    return ranges, counts, [f"{_fmt(width * i)} ms" for i in range(bins)]


def _per_call(per_call: Sequence[dict[str, Any]], key: str) -> tuple[list[str], list[float]]:
    """One bar per call; beyond `_MAX_BARS` calls, the mean of consecutive groups."""
    values = [float(c[key]) for c in per_call]
    names = [f"call {c['call']}" for c in per_call]
    if len(values) <= _MAX_BARS:
        return names, values
    size = math.ceil(len(values) / _MAX_BARS)
    labels, out = [], []
    for i in range(0, len(values), size):
        chunk = values[i : i + size]
        labels.append(f"calls {i + 1}–{i + len(chunk)}")
        out.append(sum(chunk) / len(chunk))
    return labels, out


# -- the page -------------------------------------------------------------------------------------


def _rate(timeline: Sequence[dict[str, Any]], key: str) -> list[float]:
    out = [0.0]
    for prev, cur in itertools.pairwise(timeline):
        dt = cur["t"] - prev["t"]
        out.append(round((cur[key] - prev[key]) / dt, 1) if dt > 0 else 0.0)
    return out


def plots(report: dict[str, Any]) -> list[str]:
    tl = report["timeline"]
    ts = [s["t"] for s in tl]
    media = report["media"]
    hist_labels, hist_counts, hist_ticks = _histogram(report["calls"]["setup_ms_values"])
    loss_labels, losses = _per_call(media["per_call"], "loss_pct")
    jitter_labels, jitters = _per_call(media["per_call"], "jitter_ms")
    errors = [(e["kind"], float(e["count"])) for e in report["errors"]["by_kind"]]
    return [
        line_plot(
            "registrations",
            "Registrations and XMPP sessions over time",
            ts,
            [
                ("registrations", [s["registrations"] for s in tl]),
                ("XMPP sessions", [s["xmpp_sessions"] for s in tl]),
            ],
        ),
        line_plot(
            "calls",
            "Calls over time",
            ts,
            [
                ("active calls", [s["calls_active"] for s in tl]),
                ("calls ok (total)", [s["calls_ok"] for s in tl]),
                ("calls failed (total)", [s["calls_failed"] for s in tl]),
            ],
        ),
        bar_plot(
            "setup",
            "Call setup latency (INVITE → 200 OK), calls per bin",
            hist_labels,
            hist_counts,
            tick_labels=hist_ticks,
        ),
        bar_plot("loss", "Media loss per call (%)", loss_labels, losses, "%", COLORS[1]),
        bar_plot("jitter", "Media jitter per call (ms, RFC 3550)", jitter_labels, jitters, " ms", COLORS[3]),
        line_plot(
            "media",
            "Media packets per second (all calls)",
            ts,
            [("sent", _rate(tl, "media_sent")), ("received", _rate(tl, "media_received"))],
        ),
        line_plot(
            "messages",
            "Chat messages (total)",
            ts,
            [("sent", [s["messages_sent"] for s in tl]), ("received", [s["messages_received"] for s in tl])],
        ),
        hbar_plot("errors", "Errors by kind", errors, "No errors."),
    ]


def _kv_table(title: str, rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class='kv'><caption>{html.escape(title)}</caption>{body}</table>"


def _pct(d: dict[str, Any]) -> str:
    if not d.get("count"):
        return "–"
    return f"p50 {d['p50']} · p90 {d['p90']} · p99 {d['p99']} · max {d['max']}"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, list[tuple[str, Any]]]]:
    s, r, c, m, x = (
        report["signins"],
        report["registrations"],
        report["calls"],
        report["media"],
        report["messages"],
    )
    return [
        (
            "Users",
            [
                ("sign-ins ok / failed / attempted", f"{s['ok']} / {s['failed']} / {s['attempted']}"),
                ("sign-in time (ms)", _pct(s["latency_ms"])),
                ("registrations current / peak", f"{r['current']} / {r['peak']}"),
                ("refreshes ok / failed", f"{r['refreshes_ok']} / {r['refreshes_failed']}"),
                (
                    "STUN keepalives sent / answered",
                    f"{report['stun']['sent']} / {report['stun']['answered']}",
                ),
                ("XMPP sessions peak", report["xmpp"]["sessions_peak"]),
                ("generator event-loop lag (ms)", _pct(report["generator"]["loop_lag_ms"])),
            ],
        ),
        (
            "Calls",
            [
                ("attempted / ok / failed", f"{c['attempted']} / {c['ok']} / {c['failed']}"),
                ("peak concurrent", c["peak_active"]),
                ("setup latency (ms)", _pct(c["setup_ms"])),
                ("media packets sent / received", f"{m['packets_sent']} / {m['packets_received']}"),
                ("loss", f"{m['packets_lost']} packets ({m['loss_pct']} %)"),
                ("jitter per call (ms)", _pct(m["jitter_ms"])),
                ("packet latency (ms)", _pct(m["latency_ms"])),
            ],
        ),
        (
            "Messages",
            [
                ("sent / received / lost", f"{x['sent']} / {x['received']} / {x['lost']}"),
                ("delivery time (ms)", _pct(x["latency_ms"])),
            ],
        ),
    ]


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#111;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} .meta{color:#555;margin-bottom:16px}
.grid2{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:8px}
figcaption{font-weight:600;margin-bottom:4px} .legend{font-size:12px;min-height:18px}
.key{margin-right:12px} .readout{float:right;color:#333} svg .bg{fill:#fff}
svg .grid{stroke:#eee} svg .tick{font-size:11px;fill:#555} svg .cursor{stroke:#999;stroke-dasharray:3 3}
table{border-collapse:collapse;background:#fff;margin:0 16px 16px 0} caption{text-align:left;font-weight:600}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3;font-weight:500}
.tables{display:flex;flex-wrap:wrap} .empty{color:#16a34a;width:600px} code{font-size:12px}
"""

# Hover read-out for the time plots: value of every series at the sample nearest the pointer.
_JS = """
(function () {
  var data = JSON.parse(document.getElementById('report-data').textContent);
  var tl = data.timeline || [];
  var keys = {registrations: [['registrations', 'registrations'], ['XMPP', 'xmpp_sessions']],
              calls: [['active', 'calls_active'], ['ok', 'calls_ok'], ['failed', 'calls_failed']],
              media: [['sent total', 'media_sent'], ['received total', 'media_received']],
              messages: [['sent', 'messages_sent'], ['received', 'messages_received']]};
  document.querySelectorAll('svg.plot[data-kind="line"]').forEach(function (svg) {
    var id = svg.getAttribute('data-plot');
    var cursor = svg.querySelector('.cursor');
    var out = document.querySelector('.readout[data-for="' + id + '"]');
    svg.addEventListener('mousemove', function (ev) {
      if (!tl.length || !keys[id]) { return; }
      var box = svg.getBoundingClientRect();
      var x = (ev.clientX - box.left) * svg.viewBox.baseVal.width / box.width;
      var x0 = +cursor.getAttribute('data-x0'), w = +cursor.getAttribute('data-w');
      var t = Math.max(0, Math.min(1, (x - x0) / w)) * +cursor.getAttribute('data-xmax');
      var best = tl[0];
      tl.forEach(function (s) { if (Math.abs(s.t - t) < Math.abs(best.t - t)) { best = s; } });
      cursor.setAttribute('x1', x); cursor.setAttribute('x2', x);
      out.textContent = 't=' + best.t + ' s: ' + keys[id].map(function (k) {
        return k[0] + ' ' + best[k[1]]; }).join(', ');
    });
  });
  document.body.setAttribute('data-ready', '1');
})();
"""


def render_html(report: dict[str, Any]) -> str:
    settings = report["settings"]
    title = f"edge load: {settings['users']} users, {settings['calls']} calls"
    host = report["host"]
    meta = (
        f"started {report['started_at']}, ran {report['elapsed_s']} s, stopped: {report['stopped']}; "
        f"edge domain {report['edge']['domain']} via DNS {report['edge']['dns']}; "
        f"load average before {host['load_average_before']}, after {host['load_average_after']} "
        f"on {host['cpus']} CPUs; generator CPU {host['generator_cpu_s']} s"
    )
    tables = "".join(_kv_table(name, rows) for name, rows in summary_rows(report))
    err_rows = "".join(
        f"<tr><td>{html.escape(e['kind'])}</td><td>{e['count']}</td><td><code>{html.escape(e['example'])}</code></td>"
        f"<td>{e['first_at_s']}–{e['last_at_s']} s</td></tr>"
        for e in report["errors"]["by_kind"]
    )
    errors = (
        "<table><caption>Errors by kind (protocol text of the first one)</caption>"
        f"<tr><th>kind</th><th>count</th><th>example</th><th>seen</th></tr>{err_rows}</table>"
        if err_rows
        else ""
    )
    embedded = {k: v for k, v in report.items() if k != "media"}
    # `<` escaped as \u003c: nothing in the data can close the script element or open a tag.
    data = json.dumps(embedded, separators=(",", ":")).replace("<", "\\u003c")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><div class='meta'>{html.escape(meta)}</div>"
        f"<div class='tables'>{tables}</div>{errors}"
        f"<div class='grid2'>{''.join(plots(report))}</div>"
        f"<script type='application/json' id='report-data'>{data}</script>"
        f"<script>{_JS}</script></body></html>\n"
    )
