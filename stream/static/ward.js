// The ward list: rows from the server-sent event stream /ward/events, updated in place.
// Also the formatting and SVG helpers the patient page shares (window.Ward).
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function svg(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (parent) parent.appendChild(node);
  return node;
}

function el(name, attrs, text) {
  const node = document.createElement(name);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

const pct = (p) => (p === null || p === undefined ? "–" : (100 * p).toFixed(1) + "%");
const num = (v) => (v === null || v === undefined ? "–" : Number(v.toPrecision(4)).toString());
const when = (epoch) =>
  epoch === null || epoch === undefined
    ? "–"
    : new Date(epoch * 1000).toISOString().slice(0, 16).replace("T", " ");

function ago(epoch) {
  const s = Math.max(0, Date.now() / 1000 - epoch);
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

// "creatinine 1.1 → 2.3 +2.4 pts": a reason of the score contract.
function reasonText(r) {
  const change =
    r.previous !== null && r.previous !== undefined && r.value !== null && r.value !== undefined
      ? `${num(r.previous)} → ${num(r.value)}`
      : num(r.value);
  const points = 100 * (r.contribution || 0);
  const sign = points >= 0 ? "+" : "−";
  return `${r.feature} ${change} ${sign}${Math.abs(points).toFixed(1)} pts`;
}

function reasonList(reasons, limit) {
  const list = el("ul", { class: "reasons" });
  if (!reasons || reasons.length === 0) {
    list.appendChild(el("li", { class: "none" }, "–"));
    return list;
  }
  for (const r of reasons.slice(0, limit)) {
    const item = el("li", { class: (r.contribution || 0) >= 0 ? "up" : "down",
                            "data-feature": r.feature,
                            "data-contribution": String(r.contribution) }, reasonText(r));
    item.title = `${r.modality}: ${reasonText(r)}`;
    list.appendChild(item);
  }
  return list;
}

function freshnessText(f) {
  if (!f) return "–";
  const parts = [];
  for (const [key, label] of [["lab_age_h", "lab"], ["vital_age_h", "vital"],
                              ["note_age_h", "note"], ["cxr_age_h", "X-ray"]]) {
    if (f[key] !== null && f[key] !== undefined) parts.push(`${label} ${num(f[key])} h`);
  }
  if (f.absent && f.absent.length) parts.push("absent: " + f.absent.join(", "));
  return parts.join(" · ") || "–";
}

function sparkline(points) {
  const width = 100, height = 24;
  const box = svg("svg", { class: "spark", width, height, viewBox: `0 0 ${width} ${height}`,
                           role: "img" });
  if (!points || points.length === 0) return box;
  const top = Math.max(...points, 0.05);
  const step = points.length > 1 ? width / (points.length - 1) : 0;
  const xy = points.map((p, i) => `${(i * step).toFixed(1)},${(height - 2 - (p / top) *
    (height - 4)).toFixed(1)}`);
  svg("polyline", { points: xy.join(" "), fill: "none", class: "spark-line" }, box);
  const [x, y] = xy[xy.length - 1].split(",");
  svg("circle", { cx: x, cy: y, r: 2, class: "spark-dot" }, box);
  box.setAttribute("aria-label", "mortality risk over the last " + points.length + " scores");
  return box;
}

// "threshold, rise since 2150-03-01 14:00": an alert's criteria and its raise (feature time).
const alertText = (a) => `${a.criteria.join(", ")} since ${when(a.raised_at)}`;

window.Ward = { svg, el, pct, num, when, ago, reasonText, reasonList, freshnessText, sparkline,
                alertText };

// Each row's update, with its wall-clock time: the page-latency benchmark reads these.
window.wardUpdates = [];

function renderRow(tr, row, rank) {
  tr.replaceChildren();
  tr.appendChild(el("td", { class: "rank" }, String(rank)));
  const link = el("a", { href: `/ward/patient/${row.hadm_id}` }, String(row.hadm_id));
  const id = el("td", { class: "hadm" });
  id.appendChild(link);
  tr.appendChild(id);
  tr.appendChild(el("td", { class: "ward" }, row.ward || "–"));
  const risk = el("td", { class: "risk" });
  risk.appendChild(el("span", { class: "value" }, pct(row.mortality_prob)));
  const bar = el("span", { class: "bar" });
  bar.style.width = Math.round(60 * row.mortality_prob) + "px";
  risk.appendChild(bar);
  if (row.previous_mortality_prob !== null && row.previous_mortality_prob !== undefined) {
    const delta = row.mortality_prob - row.previous_mortality_prob;
    risk.appendChild(el("span", { class: delta >= 0 ? "delta up" : "delta down" },
      `${delta >= 0 ? "▲" : "▼"} from ${pct(row.previous_mortality_prob)}`));
  }
  tr.appendChild(risk);
  const alert = el("td", { class: "alert" });
  if (row.alert) {
    const badge = el("span", { class: "alert-badge", "data-raised-at": String(row.alert.raised_at),
                               "data-criteria": row.alert.criteria.join(",") });
    badge.textContent = "⚠ " + alertText(row.alert);
    alert.appendChild(badge);
  }
  tr.classList.toggle("alerted", Boolean(row.alert));
  tr.appendChild(alert);
  const trend = el("td", { class: "trend" });
  trend.appendChild(sparkline(row.sparkline));
  tr.appendChild(trend);
  tr.appendChild(el("td", { class: "los" }, num(row.los_remaining_days) + " d"));
  tr.appendChild(el("td", { class: "discharge" }, when(row.expected_discharge)));
  const reasons = el("td", { class: "reasons-cell" });
  reasons.appendChild(reasonList(row.reasons, 3));
  tr.appendChild(reasons);
  tr.appendChild(el("td", { class: "freshness" }, freshnessText(row.freshness)));
  tr.appendChild(el("td", { class: "scored", title: when(row.scored_at) }, ago(row.scored_at)));
}

// The active alerts (as GET /alerts has them), oldest raise first.
function renderAlerts(alerts) {
  const list = document.getElementById("alert-list");
  const version = JSON.stringify(alerts);
  if (list.dataset.version === version) return;
  list.dataset.version = version;
  list.replaceChildren();
  for (const a of alerts) {
    const item = el("li", { "data-hadm-id": String(a.hadm_id),
                            "data-raised-at": String(a.raised_at),
                            "data-criteria": a.criteria.join(",") });
    item.appendChild(el("a", { href: `/ward/patient/${a.hadm_id}` }, String(a.hadm_id)));
    item.appendChild(el("span", { class: "alert-ward" }, a.ward || "–"));
    item.appendChild(el("span", { class: "alert-risk" }, pct(a.mortality_prob)));
    item.appendChild(el("span", { class: "alert-what" }, alertText(a)));
    list.appendChild(item);
  }
  document.getElementById("alert-count").textContent = String(alerts.length);
  document.getElementById("no-alerts").hidden = alerts.length > 0;
}

function render(data) {
  renderAlerts(data.alerts || []);
  const body = document.getElementById("rows");
  const existing = new Map([...body.children].map((tr) => [tr.dataset.hadmId, tr]));
  const now = performance.timeOrigin + performance.now();
  const keep = new Set();
  data.rows.forEach((row, i) => {
    const key = String(row.hadm_id);
    keep.add(key);
    let tr = existing.get(key);
    if (!tr) {
      tr = el("tr", { "data-hadm-id": key });
    }
    const version = JSON.stringify(row);
    if (tr.dataset.version !== version || tr.dataset.rank !== String(i + 1)) {
      const rescored = tr.dataset.version !== undefined && tr.dataset.version !== version;
      renderRow(tr, row, i + 1);
      tr.dataset.version = version;
      tr.dataset.rank = String(i + 1);
      tr.dataset.scoredAt = String(row.scored_at);
      tr.dataset.mortality = String(row.mortality_prob);
      window.wardUpdates.push({ hadm_id: row.hadm_id, scored_at: row.scored_at, at_ms: now });
      if (rescored) {
        tr.classList.remove("flash");
        void tr.offsetWidth; // restart the highlight
        tr.classList.add("flash");
      }
    }
    body.appendChild(tr); // moves it into rank order
  });
  for (const [key, tr] of existing) if (!keep.has(key)) tr.remove();
  if (window.wardUpdates.length > 10000) window.wardUpdates.splice(0, 5000);
  document.getElementById("empty").hidden = data.rows.length > 0;
  const filter = document.getElementById("ward-filter");
  const known = new Set([...filter.options].map((o) => o.value));
  for (const w of data.wards) if (!known.has(w)) filter.appendChild(el("option", { value: w }, w));
}

function connect() {
  const ward = document.getElementById("ward-filter").value;
  const status = document.getElementById("status");
  const source = new EventSource("/ward/events" + (ward ? "?ward=" + encodeURIComponent(ward) : ""));
  source.addEventListener("rows", (event) => {
    render(JSON.parse(event.data));
    status.textContent = "live · updated " + new Date().toLocaleTimeString();
    status.className = "status live";
  });
  source.addEventListener("expired", () => {
    source.close();
    window.location.assign("/ward/login");
  });
  source.onerror = () => {
    status.textContent = "reconnecting…";
    status.className = "status down";
    if (source.readyState === EventSource.CLOSED) {
      // Refused (401: the session ended) or gone: the login page says which.
      window.location.assign("/ward/login");
    }
  };
  return source;
}

if (document.getElementById("rows")) {
  let source = connect();
  document.getElementById("ward-filter").addEventListener("change", () => {
    source.close();
    document.getElementById("rows").replaceChildren();
    source = connect();
  });
}
