// One admission: its score history as an SVG chart, and a timeline of its scores with the
// reasons recorded at each. Reloaded every few seconds.
"use strict";

(function () {
  const { svg, el, pct, num, when, reasonList, freshnessText } = window.Ward;
  const hadmId = document.body.dataset.hadmId;
  const REFRESH_MS = 5000;

  function chart(history) {
    const width = 720, height = 240, left = 48, right = 48, top = 12, bottom = 28;
    const box = svg("svg", { id: "history-chart", width: "100%", height,
                             viewBox: `0 0 ${width} ${height}`, role: "img",
                             "aria-label": "mortality risk and remaining stay over time" });
    const times = history.map((h) => h.feature_time);
    const t0 = Math.min(...times), t1 = Math.max(...times);
    const span = t1 > t0 ? t1 - t0 : 1;
    const riskTop = Math.max(0.05, ...history.map((h) => h.mortality_prob)) * 1.1;
    const losTop = Math.max(1, ...history.map((h) => h.los_remaining_days)) * 1.1;
    const x = (t) => left + ((t - t0) / span) * (width - left - right);
    const yRisk = (p) => top + (1 - p / riskTop) * (height - top - bottom);
    const yLos = (d) => top + (1 - d / losTop) * (height - top - bottom);
    svg("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom,
                  class: "axis" }, box);
    for (const f of [0, 0.5, 1]) {
      const label = svg("text", { x: left - 6, y: yRisk(f * riskTop) + 4, class: "tick risk",
                                  "text-anchor": "end" }, box);
      label.textContent = pct(f * riskTop);
      const los = svg("text", { x: width - right + 6, y: yLos(f * losTop) + 4,
                                class: "tick los" }, box);
      los.textContent = num(f * losTop) + " d";
    }
    for (const [t, anchor] of [[t0, "start"], [t1, "end"]]) {
      const label = svg("text", { x: x(t), y: height - 8, class: "tick", "text-anchor": anchor },
                        box);
      label.textContent = when(t);
    }
    const line = (y, key, cls) =>
      svg("polyline", { class: cls, fill: "none",
                        points: history.map((h) => `${x(h.feature_time).toFixed(1)},` +
                                            `${y(h[key]).toFixed(1)}`).join(" ") }, box);
    const legend = svg("text", { x: left + 8, y: top + 4, class: "tick" }, box);
    legend.textContent = "— mortality risk (left)   - - remaining stay (right)";
    line(yLos, "los_remaining_days", "los-line");
    line(yRisk, "mortality_prob", "risk-line");
    history.forEach((h, i) => {
      const dot = svg("circle", { cx: x(h.feature_time), cy: yRisk(h.mortality_prob), r: 4,
                                  class: "risk-dot", "data-index": i }, box);
      const tip = svg("title", {}, dot);
      tip.textContent = `${when(h.feature_time)}: ${pct(h.mortality_prob)}`;
      dot.addEventListener("click", () => {
        const item = document.getElementById(`score-${i}`);
        if (item) item.scrollIntoView({ behavior: "smooth", block: "center" });
      });
    });
    return box;
  }

  // Its latest alert (only the latest is kept): active, or raised and since cleared.
  function alertFact(alert) {
    if (!alert) return "none";
    const what = `${alert.criteria.join(", ")}, raised at ${when(alert.raised_at)}`;
    return alert.active ? `⚠ active: ${what}` : `none now (the last: ${what}, since cleared)`;
  }

  function summary(score, alert) {
    const part = document.getElementById("summary");
    part.replaceChildren();
    const facts = [
      ["alert", alertFact(alert)],
      ["mortality risk", pct(score.mortality_prob)],
      ["remaining stay", num(score.los_remaining_days) + " d"],
      ["expected discharge", when(score.expected_discharge)],
      ["ward", score.ward || "–"],
      ["data freshness", freshnessText(score.freshness)],
      ["model", score.model],
    ];
    const list = el("dl");
    for (const [name, value] of facts) {
      list.appendChild(el("dt", {}, name));
      list.appendChild(el("dd", { class: name.replace(/ /g, "-") }, value));
    }
    const shown = list.querySelector("dd.alert");
    shown.classList.toggle("active", Boolean(alert && alert.active));
    if (alert) {
      shown.dataset.raisedAt = String(alert.raised_at);
      shown.dataset.active = String(alert.active);
    }
    part.appendChild(list);
    part.appendChild(el("h3", {}, "Top reasons now"));
    part.appendChild(reasonList(score.reasons, 5));
  }

  function timeline(history) {
    const list = document.getElementById("timeline");
    list.replaceChildren();
    for (let i = history.length - 1; i >= 0; i--) {
      const h = history[i], before = i > 0 ? history[i - 1] : null;
      const item = el("li", { id: `score-${i}` });
      item.appendChild(el("time", {}, when(h.feature_time)));
      let text = `scored ${pct(h.mortality_prob)}, ${num(h.los_remaining_days)} d to go`;
      if (before) {
        const delta = h.mortality_prob - before.mortality_prob;
        text += ` (${delta >= 0 ? "+" : "−"}${Math.abs(100 * delta).toFixed(1)} pts)`;
      } else {
        text += " (first score)";
      }
      if (h.ward && (!before || before.ward !== h.ward)) text += ` · on ${h.ward}`;
      item.appendChild(el("span", { class: "event" }, text));
      if (h.reasons && h.reasons.length) item.appendChild(reasonList(h.reasons, 5));
      list.appendChild(item);
    }
  }

  async function load() {
    const status = document.getElementById("status");
    const response = await fetch(`/ward/data/patient/${hadmId}`, { credentials: "same-origin" });
    if (response.status === 401) {
      window.location.assign("/ward/login");
      return;
    }
    if (!response.ok) {
      status.textContent = response.status === 404 ? "no current score" : "unavailable";
      status.className = "status down";
      return;
    }
    const data = await response.json();
    summary(data.score, data.alert);
    const part = document.getElementById("chart");
    part.replaceChildren(chart(data.history.length ? data.history : [data.score]));
    timeline(data.history);
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.className = "status live";
  }

  load();
  setInterval(load, REFRESH_MS);
})();
