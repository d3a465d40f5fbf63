// Status > Unified Communications (shared/spec/MRA.md §8), polled without reloading the page.
// The page polls one JSON source: an Expressway's own /status, or the lab console's
// /api/lab/status (every component). Tables are paged so the DOM stays bounded.
"use strict";

const SOURCE = document.body.dataset.source || "/status";
const POLL_MS = 1500;
const PAGE_SIZE = 10;
const pages = {}; // table key -> current page index
let last = null; // last data rendered, for re-rendering after a pager click
window.edgePolls = 0; // for tests: counts completed polls (the page is never reloaded)

function esc(value) {
  return String(value === undefined || value === null ? "" : value)
    .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

function when(epoch) {
  if (!epoch) return "";
  const d = new Date(epoch * 1000);
  const ago = Math.max(0, Math.round(Date.now() / 1000 - epoch));
  return `${d.toLocaleString()} (${ago} s ago)`;
}

function badge(text, good, warn) {
  const cls = good ? "ok" : (warn ? "warn" : "bad");
  return `<span class="badge ${cls}">${esc(text)}</span>`;
}

// A paged table: columns are [heading, row => html]; only PAGE_SIZE rows reach the DOM.
function table(key, columns, rows) {
  if (!rows.length) return `<div class="empty" data-table="${esc(key)}">none</div>`;
  const count = Math.ceil(rows.length / PAGE_SIZE);
  const page = Math.min(pages[key] || 0, count - 1);
  pages[key] = page;
  const shown = rows.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE);
  let html = `<table data-table="${esc(key)}"><thead><tr>`;
  html += columns.map(([h]) => `<th>${esc(h)}</th>`).join("") + "</tr></thead><tbody>";
  for (const row of shown) {
    html += "<tr>" + columns.map(([, f]) => `<td>${f(row)}</td>`).join("") + "</tr>";
  }
  html += "</tbody></table>";
  if (count > 1) {
    html += `<div class="pager">rows ${page * PAGE_SIZE + 1}–${page * PAGE_SIZE + shown.length} of ${rows.length} ` +
      `<button data-page="${esc(key)}" data-delta="-1" ${page === 0 ? "disabled" : ""}>previous</button> ` +
      `<button data-page="${esc(key)}" data-delta="1" ${page >= count - 1 ? "disabled" : ""}>next</button></div>`;
  }
  return html;
}

document.addEventListener("click", (ev) => {
  const btn = ev.target.closest("button[data-page]");
  if (!btn) return;
  const key = btn.dataset.page;
  pages[key] = Math.max(0, (pages[key] || 0) + Number(btn.dataset.delta));
  if (last) render(last);
});

// Alarms derived from the status: a failed zone, an internal node down, maintenance, a dead process.
function alarms(components) {
  const out = [];
  for (const c of components) {
    if (c.state && c.state !== "ready") {
      out.push({ severity: "bad", component: c.name, text: `process ${c.state}${c.detail ? ": " + c.detail : ""}` });
    }
    for (const z of c.zones || []) {
      if (z.state !== "Active") {
        out.push({ severity: "bad", component: c.name, text: `zone ${z.name} ${z.state}: ${z.reason}`, since: z.since });
      }
    }
    const nodes = c.nodes || {};
    for (const role of Object.keys(nodes)) {
      for (const n of nodes[role] || []) {
        if (n.down) out.push({ severity: "bad", component: c.name, text: `${role.toUpperCase()} node ${n.fqdn} down` });
      }
    }
    if (c.maintenance) out.push({ severity: "warn", component: c.name, text: "maintenance mode: new calls and requests refused" });
    if (c.refreshing) out.push({ severity: "warn", component: c.name, text: "refreshing servers" });
  }
  return out;
}

function counts(c) {
  const k = c.counts || {};
  const sip = c.sip || {};
  const calls = sip.calls || {};
  const items = [];
  if ("registrations" in k) items.push(["MRA registrations", `${k.registrations} (peak ${k.registrations_peak ?? "?"})`]);
  if ("current" in calls) items.push(["Calls", `${calls.current} (peak ${calls.peak ?? "?"})`]);
  else if ("calls" in k) items.push(["Calls", k.calls]);
  if ("provisioning_sessions" in k) items.push(["Provisioning sessions", k.provisioning_sessions]);
  const xmpp = c.xmpp || {};
  if ("sessions" in xmpp) items.push(["XMPP sessions", `${xmpp.sessions} (peak ${xmpp.sessions_peak ?? "?"})`]);
  const media = (c.media && c.media.streams) ?? (sip.media && sip.media.streams);
  if (media !== undefined) items.push(["Media streams", media]);
  const mt = c.media && c.media.totals;
  if (mt) {
    items.push(["Media packets relayed", mt.tx_packets]);
    items.push(["Media drops", (mt.garbage_drops || 0) + (mt.unlatched_drops || 0) + (mt.not_latched_drops || 0)]);
  }
  if (c.allow_list) items.push(["Allow-list rules", c.allow_list.rules]);
  if (c.uptime_s !== undefined) items.push(["Uptime", `${Math.round(c.uptime_s)} s`]);
  return `<div class="kv">` + items.map(([n, v]) => `<div data-count="${esc(n)}"><span>${esc(n)}:</span> ${esc(v)}</div>`).join("") + "</div>";
}

function expressway(c) {
  const key = c.name;
  let html = `<div class="expressway" data-component="${esc(c.name)}">`;
  const role = c.role === "expc" ? "Expressway-C" : "Expressway-E";
  html += `<h2>${esc(c.name)} <small>${role}</small> ${badge(c.state || "?", c.state === "ready")}` +
    (c.maintenance ? " " + badge("maintenance", false, true) : "") + "</h2>";
  html += `<div class="kv"><div data-domains><span>Domains:</span> ${esc((c.domains || []).join(", "))}</div></div>`;
  html += counts(c);
  html += "<h3>Traversal zones</h3>";
  html += table(`${key}/zones`, [
    ["Zone", (z) => esc(z.name)],
    ["State", (z) => `<span class="zone-state" data-zone="${esc(z.name)}">${badge(z.state, z.state === "Active")}</span>`],
    ["Reason", (z) => `<span class="zone-reason">${esc(z.reason)}</span>`],
    ["Since", (z) => esc(when(z.since))],
    ["Reconnects", (z) => esc(z.reconnects)],
  ], c.zones || []);
  const channels = [];
  for (const z of c.zones || []) for (const ch of z.channels || []) channels.push({ zone: z.name, ...ch });
  html += "<h3>Channels (SIP / HTTPS tunnel / XMPP)</h3>";
  html += table(`${key}/channels`, [
    ["Channel", (ch) => esc(ch.channel)],
    ["Peer", (ch) => esc(ch.peer)],
    ["State", (ch) => `<span class="channel-state" data-channel="${esc(ch.channel)}">${badge(ch.state, ch.state === "active")}</span>`],
    ["Reason", (ch) => esc(ch.reason)],
    ["Since", (ch) => esc(when(ch.since))],
  ], channels);
  if (c.nodes) {
    const nodes = [];
    for (const role of Object.keys(c.nodes)) for (const n of c.nodes[role] || []) nodes.push({ role, ...n });
    html += "<h3>Discovered nodes</h3>";
    html += table(`${key}/nodes`, [
      ["Type", (n) => esc({ ucm: "Unified CM", imp: "IM and Presence", cuc: "Unity Connection" }[n.role] || n.role)],
      ["Server", (n) => esc(n.fqdn)],
      ["Status", (n) => badge(n.down ? "Down" : "Active", !n.down)],
    ], nodes);
  }
  const legs = ((c.sip || {}).calls || {}).legs || [];
  if (legs.length) {
    html += "<h3>Calls</h3>";
    const legText = (call, name) => {
      const leg = (call.legs || []).find((x) => x.leg === name);
      return leg ? `${leg.side}: ${leg.call_id}` : "";
    };
    html += table(`${key}/calls`, [
      ["Call", (l) => esc(l.call)],
      ["State", (l) => badge(l.state, l.state === "confirmed")],
      ["Leg A", (l) => esc(legText(l, "a"))],
      ["Leg B", (l) => esc(legText(l, "b"))],
      ["Since", (l) => esc(l.answered_at ? "answered" : "setting up")],
    ], legs);
  }
  html += "<h3>Listeners</h3>";
  html += table(`${key}/listeners`, [
    ["Name", (l) => esc(l.name)], ["Transport", (l) => esc(l.transport)], ["Address", (l) => esc(`${l.host}:${l.port}`)],
  ], c.listeners || []);
  return html + "</div>";
}

function render(data) {
  last = data;
  const lab = Array.isArray(data.components);
  const components = lab ? data.components : [data];
  document.getElementById("lab-section").hidden = !lab;
  if (lab) {
    document.getElementById("components").innerHTML = `<div class="kv"><div><span>Lab:</span> ${badge(data.state, data.state === "ready")}</div></div>` +
      table("lab/components", [
        ["Component", (c) => esc(c.name)], ["Role", (c) => esc(c.role)], ["PID", (c) => esc(c.pid)],
        ["State", (c) => `<span class="component-state" data-name="${esc(c.name)}">${badge(c.state, c.state === "ready")}</span>`],
        ["Detail", (c) => esc(c.detail || c.failure || "")],
      ], components);
  }
  const found = alarms(components);
  document.getElementById("alarms").innerHTML = table("alarms", [
    ["Severity", (a) => badge(a.severity === "bad" ? "Alarm" : "Warning", false, a.severity !== "bad")],
    ["Component", (a) => esc(a.component)],
    ["Alarm", (a) => `<span class="alarm-text">${esc(a.text)}</span>`],
    ["Since", (a) => esc(when(a.since))],
  ], found);
  const edges = components.filter((c) => c.role === "expc" || c.role === "expe");
  document.getElementById("expressways").innerHTML = edges.map(expressway).join("");
}

function setConn(ok, text) {
  const el = document.getElementById("conn");
  el.className = "conn " + (ok ? "ok" : "bad");
  el.textContent = text;
}

async function poll() {
  try {
    const resp = await fetch(SOURCE, { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
    setConn(true, "live");
    document.getElementById("updated").textContent = new Date().toLocaleTimeString();
  } catch (err) {
    setConn(false, `status unreachable: ${err.message || err}`);
  } finally {
    window.edgePolls += 1;
    setTimeout(poll, POLL_MS);
  }
}

document.getElementById("interval").textContent = (POLL_MS / 1000).toFixed(1);
poll();
