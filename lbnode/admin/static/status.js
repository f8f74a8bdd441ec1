// Fulcrum status page: polls status/page.json and renders it. Every name and reason from the
// node goes into the page through textContent or setAttribute, never as markup, so a name
// like "<script>" is shown as text. Rates, error ratios and p50/p99 are computed here from
// two consecutive samples (the node keeps nothing per viewer; see docs/status-page.md).
"use strict";

// Refresh interval in seconds: ?refresh=N, within [0.2, 60] (faster would only load the node).
const REFRESH = (() => {
  const asked = Number(new URLSearchParams(location.search).get("refresh"));
  return Number.isFinite(asked) && asked > 0 ? Math.min(60, Math.max(0.2, asked)) : 1;
})();

let previous = null; // {time, backends: Map(key -> backend)} of the last sample
let lastGood = null; // wall time of the last answer, for the banner
let refreshes = 0;

function el(tag, text, className) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (className) e.className = className;
  return e;
}

function cell(row, text, className) {
  row.appendChild(el("td", text, className));
}

function seconds(v) {
  if (v === null || v === undefined) return "–";
  if (v < 1) return (v * 1000).toFixed(v < 0.01 ? 1 : 0) + " ms";
  return v.toFixed(2) + " s";
}

function clock(unixSeconds) {
  return new Date(unixSeconds * 1000).toLocaleTimeString();
}

// The q-quantile of counts per bucket (bounds[i] is bucket i's upper bound; the last count is
// above every bound), interpolated linearly inside its bucket as Prometheus'
// histogram_quantile does. Above the last bound only "at least the last bound" is known.
function quantile(counts, bounds, q) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (total === 0) return null;
  const rank = q * total;
  let below = 0;
  for (let i = 0; i < counts.length; i++) {
    if (below + counts[i] >= rank && counts[i] > 0) {
      if (i >= bounds.length) return bounds[bounds.length - 1];
      const lower = i === 0 ? 0 : bounds[i - 1];
      return lower + (bounds[i] - lower) * ((rank - below) / counts[i]);
    }
    below += counts[i];
  }
  return bounds[bounds.length - 1];
}

// Rate, error ratio and latency of one backend over the interval since the previous sample.
function windowed(b, before, dt, bounds) {
  if (!before || dt <= 0 || b.requests < before.requests) return null; // first sample, or a restart
  const requests = b.requests - before.requests;
  const failures = Math.max(0, b.failures - before.failures);
  const counts = b.latency_counts.map((c, i) => c - (before.latency_counts[i] || 0));
  return {
    rate: requests / dt,
    errors: requests > 0 ? Math.min(1, failures / requests) : null,
    p50: quantile(counts, bounds, 0.5),
    p99: quantile(counts, bounds, 0.99),
  };
}

function backendKey(pool, b) {
  return pool + "\u0000" + b.id;
}

function renderPools(doc) {
  const box = document.getElementById("pools");
  const dt = previous ? doc.time - previous.time : 0;
  const parts = [];
  if (doc.pools.length === 0) parts.push(el("p", "no pools", "muted"));
  for (const pool of doc.pools) {
    const up = pool.backends.filter((b) => b.health === "up").length;
    const title = el("h3");
    title.appendChild(el("span", pool.name, "pool-name"));
    title.appendChild(el("span", ` · ${pool.algorithm} · ${up}/${pool.backends.length} up` +
      (pool.queue ? ` · ${pool.queue} queued` : ""), "muted"));
    const table = el("table");
    table.className = "backends";
    table.setAttribute("data-pool", pool.name);
    const head = el("tr");
    for (const h of ["backend", "address", "health", "admin", "weight", "req/s", "errors", "p50", "p99", "in flight", "reason"]) {
      head.appendChild(el("th", h, "col-" + h.replace(/[^a-z0-9]/g, "")));
    }
    table.appendChild(el("thead")).appendChild(head);
    const body = table.appendChild(el("tbody"));
    for (const b of pool.backends) {
      const w = windowed(b, previous && previous.backends.get(backendKey(pool.name, b)), dt, doc.latency_bounds);
      const row = el("tr", null, b.health === "down" ? "down" : "");
      row.setAttribute("data-backend", b.id);
      row.setAttribute("data-health", b.health);
      cell(row, b.id, "backend-id");
      cell(row, b.address, "col-address");
      const health = b.ejected && b.health === "up" ? "ejected" : b.health;
      cell(row, health, "state state-" + health);
      cell(row, b.admin, "state state-" + b.admin);
      cell(row, b.weight, "num");
      cell(row, w ? w.rate.toFixed(1) : "–", "num rate");
      cell(row, w && w.errors !== null ? (w.errors * 100).toFixed(1) + " %" : "–", "num errors");
      cell(row, w ? seconds(w.p50) : "–", "num p50");
      cell(row, w ? seconds(w.p99) : "–", "num p99");
      cell(row, b.inflight + b.connections, "num");
      cell(row, b.reason, "reason");
      body.appendChild(row);
    }
    const scroll = el("div", null, "scroll");
    scroll.appendChild(table);
    parts.push(title, scroll);
  }
  box.replaceChildren(...parts);
}

function renderListeners(doc) {
  const body = document.querySelector("#listeners tbody");
  const rows = doc.listeners.map((li) => {
    const row = el("tr");
    row.setAttribute("data-listener", li.name);
    const before = previous && previous.listeners.get(li.name);
    const dt = previous ? doc.time - previous.time : 0;
    cell(row, li.name);
    cell(row, li.protocol + (li.tls ? " (TLS)" : ""));
    cell(row, li.address);
    cell(row, li.pool);
    cell(row, li.open, "num");
    cell(row, before && dt > 0 && li.accepted >= before.accepted ? ((li.accepted - before.accepted) / dt).toFixed(1) : "–", "num");
    return row;
  });
  body.replaceChildren(...rows);
}

function renderCluster(doc) {
  const section = document.getElementById("cluster-section");
  const cluster = doc.cluster;
  section.hidden = !cluster && doc.vips.length === 0;
  if (section.hidden) return;
  document.getElementById("cluster-summary").textContent = cluster
    ? `${cluster.nodes.filter((n) => n.live).length} live nodes · etcd ${cluster.etcd_reachable ? "reachable" : "NOT reachable"}` +
      (cluster.lease_held ? "" : " · no lease")
    : "";
  const nodes = (cluster ? cluster.nodes : []).map((n) => {
    const row = el("tr", null, n.live ? "" : "down");
    row.setAttribute("data-node", n.id);
    cell(row, n.id + (n.self ? " (this node)" : ""));
    cell(row, n.live ? "live" : "gone", "state state-" + (n.live ? "up" : "down"));
    cell(row, n.host);
    cell(row, n.version);
    cell(row, n.addresses.join(", "));
    return row;
  });
  document.querySelector("#nodes tbody").replaceChildren(...nodes);
  const vips = doc.vips.map((v) => {
    const row = el("tr");
    row.setAttribute("data-vip", v.address);
    cell(row, v.address);
    cell(row, v.holder === null ? "free" : v.holder + (v.held_here ? " (this node)" : ""),
      v.holder === null ? "state state-down" : "");
    cell(row, v.since ? clock(v.since) : "–");
    return row;
  });
  document.querySelector("#vips tbody").replaceChildren(...vips);
  document.getElementById("vips").hidden = vips.length === 0; // no [[cluster.vips]]: no empty table
}

function renderEvents(doc) {
  const items = doc.events.map((e) => {
    const li = el("li");
    li.setAttribute("data-kind", e.kind);
    li.appendChild(el("span", clock(e.time), "when"));
    li.appendChild(el("span", e.kind, "kind"));
    li.appendChild(el("span", e.subject + " ", "subject"));
    li.appendChild(el("span", e.detail, "detail"));
    return li;
  });
  if (items.length === 0) items.push(el("li", "nothing yet", "muted"));
  document.getElementById("events").replaceChildren(...items);
}

function render(doc) {
  document.getElementById("node-id").textContent = doc.node;
  document.title = `Fulcrum ${doc.node}`;
  const backends = doc.pools.reduce((n, p) => n + p.backends.length, 0);
  const down = doc.pools.reduce((n, p) => n + p.backends.filter((b) => b.health === "down").length, 0);
  document.getElementById("summary").textContent =
    `${doc.draining ? "DRAINING · " : ""}${doc.pools.length} pools · ${backends} backends, ${down} down · ` +
    `config ${doc.config.source}${doc.config.stale ? " (stale)" : ""} · updated ${clock(doc.time)}`;
  renderPools(doc);
  renderListeners(doc);
  renderCluster(doc);
  renderEvents(doc);
}

function remember(doc) {
  const backends = new Map();
  for (const pool of doc.pools) for (const b of pool.backends) backends.set(backendKey(pool.name, b), b);
  const listeners = new Map(doc.listeners.map((li) => [li.name, li]));
  previous = { time: doc.time, backends, listeners };
}

async function refresh() {
  const banner = document.getElementById("error");
  try {
    const answer = await fetch("status/page.json", { cache: "no-store", credentials: "same-origin" });
    if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
    const doc = await answer.json();
    render(doc);
    remember(doc);
    lastGood = doc.time;
    banner.hidden = true;
  } catch (err) {
    banner.textContent = `cannot reach the node (${err.message})` +
      (lastGood ? `; showing what it said at ${clock(lastGood)}` : "");
    banner.hidden = false;
  } finally {
    refreshes += 1;
    document.body.setAttribute("data-refreshes", String(refreshes));
    setTimeout(refresh, REFRESH * 1000);
  }
}

document.getElementById("interval").textContent = String(REFRESH);
refresh();
