"use strict";
// Draws /api/state (ops/dashboard.py) every 2 s. Every number sits in an element with data-field
// (and data-stage, data-partition, ... saying whose it is), which the tests read from the DOM.

const REFRESH_MS = 2000;
const HELD = "HELD (dead letters)";
const esc = v => String(v ?? "-").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
const hms = t => t ? new Date(t * 1000).toTimeString().slice(0, 8) : "-";
const num = (v, d) => v === null || v === undefined ? "-" : Number(v).toFixed(d);
const data = attrs => Object.entries(attrs).map(([k, v]) => ` data-${k}="${esc(v)}"`).join("");
const cell = (attrs, value, cls) => "<td" + data(attrs) + (cls ? ` class="${cls}"` : "") + ">" + esc(value) + "</td>";

// -- charts: a line chart with a title, a y axis in the unit's values, a time axis, and a legend --

function niceMax(max) {
  if (!(max > 0)) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(max)));
  for (const m of [1, 2, 2.5, 5, 10]) if (max <= m * step) return m * step;
  return 10 * step;
}

// id: unique on the page; t: sample times (epoch s); series: [{name, values}] aligned with t.
function chart(id, title, unit, t, series) {
  const W = 400, H = 170, L = 56, R = 12, T = 22, B = 36, w = W - L - R, h = H - T - B;
  const all = series.flatMap(s => s.values).filter(v => v !== null && v !== undefined);
  const ymax = niceMax(Math.max(0, ...all));
  const t0 = t.length ? t[0] : 0, t1 = t.length > 1 ? t[t.length - 1] : t0 + 1;
  const x = v => L + (v - t0) / (t1 - t0) * w, y = v => T + h - v / ymax * h;
  const c = {chart: id};
  let s = `<svg class="chart" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img"${data({...c, field: "chart"})}>`
    + `<text class="title" x="${L}" y="14"${data({...c, field: "chart_title"})}>${esc(title)} (${esc(unit)})</text>`;
  for (let i = 0; i <= 4; i++) {  // y ticks and grid: 0 to the rounded-up maximum
    const v = ymax * i / 4, yy = y(v).toFixed(1);
    s += `<line class="grid" x1="${L}" x2="${L + w}" y1="${yy}" y2="${yy}"></line>`
      + `<text class="tick" x="${L - 4}" y="${yy}" dy="3" text-anchor="end"${data({...c, field: "y_tick", tick: i})}>`
      + `${esc(+v.toPrecision(3))}</text>`;
  }
  const n = t.length > 1 ? 3 : t.length;
  for (let i = 0; i < n; i++) {  // x ticks: first, middle, last sample time
    const v = n === 1 ? t0 : t0 + (t1 - t0) * i / (n - 1);
    s += `<line class="axis" x1="${x(v).toFixed(1)}" x2="${x(v).toFixed(1)}" y1="${T + h}" y2="${T + h + 4}"></line>`
      + `<text class="tick" x="${x(v).toFixed(1)}" y="${T + h + 15}" text-anchor="${["start", "middle", "end"][n === 1 ? 0 : i]}"`
      + `${data({...c, field: "x_tick", tick: i})}>${hms(v)}</text>`;
  }
  s += `<line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${T + h}"${data({...c, field: "y_axis"})}></line>`
    + `<line class="axis" x1="${L}" x2="${L + w}" y1="${T + h}" y2="${T + h}"${data({...c, field: "x_axis"})}></line>`
    + `<text class="label" transform="translate(12 ${T + h / 2}) rotate(-90)" text-anchor="middle"`
    + `${data({...c, field: "y_label"})}>${esc(unit)}</text>`
    + `<text class="label" x="${L + w / 2}" y="${H - 4}" text-anchor="middle"${data({...c, field: "x_label"})}>time (this host)</text>`;
  series.forEach((ser, k) => {
    const pts = ser.values.map((v, i) => [t[i], v]).filter(p => p[1] !== null && p[1] !== undefined);
    if (pts.length > 1) {
      s += `<polyline class="series s${k}" points="${pts.map(([a, b]) => `${x(a).toFixed(1)},${y(b).toFixed(1)}`).join(" ")}"></polyline>`;
    } else if (pts.length === 1) {
      s += `<circle class="series s${k}" r="2" cx="${x(pts[0][0]).toFixed(1)}" cy="${y(pts[0][1]).toFixed(1)}"></circle>`;
    }
    if (series.length > 1) {
      s += `<text class="legend s${k}" x="${L + w - 60 + 32 * k}" y="${H - 4}"${data({...c, field: "legend", series: ser.name})}>`
        + `&#9644; ${esc(ser.name)}</text>`;
    }
  });
  if (!all.length) s += `<text class="empty" x="${L + w / 2}" y="${T + h / 2}" text-anchor="middle">no data yet</text>`;
  return s + "</svg>";
}

// -- stages ----------------------------------------------------------------------------------

const stateText = s => s.held ? HELD : String(s.state).toUpperCase();
const stateClass = s => s.held ? "held" : "state-" + s.state;

function overviewHtml(stages) {
  return stages.map(s => `<span class="badge${s.held || s.state === "down" || s.state === "stuck" ? " bad" : ""}">`
    + `${esc(s.stage)} <span class="${stateClass(s)}"${data({stage: s.stage, field: "overview_state"})}>${esc(stateText(s))}</span></span>`).join("");
}

function aheadText(ahead) {
  return ahead === null || ahead === undefined ? "" : `timestamp ${num(ahead, 1)} s ahead of this host (clock skew)`;
}

function stageHtml(s, history) {
  const st = {stage: s.stage}, owner = {}, joins = s.open_joins !== null && s.open_joins !== undefined;
  for (const w of s.workers) for (const p of w.partitions) owner[p] = w.member + " (" + (w.device ?? "?") + ")";
  let h = `<section data-stage="${esc(s.stage)}"><h2>${esc(s.stage)}</h2>`
    + `<div class="meta">group ${esc(s.group)} (${esc(s.group_state)}) reading ${esc(s.topic)}</div>`
    + "<table><tr><th>state</th><th>lag, records</th><th>time lag, s</th><th>stuck</th><th>throughput, records/s</th><th>workers</th>"
    + (joins ? "<th>open joins</th><th>oldest join, s</th>" : "") + "</tr><tr>"
    + cell({...st, field: "state"}, stateText(s), stateClass(s))
    + cell({...st, field: "lag"}, s.lag) + cell({...st, field: "time_lag_s"}, num(s.time_lag_s, 1))
    + cell({...st, field: "stuck"}, s.stuck ? "STUCK" : "no", s.stuck ? "stuck" : "")
    + cell({...st, field: "throughput"}, num(s.throughput, 1)) + cell({...st, field: "workers"}, s.workers.length)
    + (joins ? cell({...st, field: "open_joins"}, s.open_joins) + cell({...st, field: "oldest_open_join_s"}, num(s.oldest_open_join_s, 1)) : "")
    + "</tr></table>";
  if (s.clock_ahead_s !== null && s.clock_ahead_s !== undefined) {
    h += `<div class="skew"${data({...st, field: "clock_ahead"})}>time lag reads 0: the oldest waiting record's ${aheadText(s.clock_ahead_s)}</div>`;
  }
  h += `<div class="charts">`
    + chart(`lag-${s.stage}`, `Lag of ${s.stage}`, "records", history.t, [{name: "lag", values: history.lag[s.stage] || []}])
    + chart(`throughput-${s.stage}`, `Throughput of ${s.stage}`, "records/s", history.t,
            [{name: "throughput", values: (history.throughput || {})[s.stage] || []}])
    + "</div>";
  h += "<table><tr><th>partition</th><th>committed</th><th>log-end</th><th>lag, records</th><th>time lag, s</th><th>stuck</th><th class=l>worker</th></tr>";
  for (const p of s.partitions) {
    const pa = {...st, partition: p.partition};
    h += "<tr>" + cell({...pa, field: "partition"}, p.partition) + cell({...pa, field: "committed"}, p.committed)
      + cell({...pa, field: "log_end"}, p.log_end) + cell({...pa, field: "lag"}, p.lag)
      + cell({...pa, field: "time_lag_s"}, num(p.time_lag_s, 1) + (p.clock_ahead_s !== null && p.clock_ahead_s !== undefined ? " (skew)" : ""))
      + cell({...pa, field: "stuck"}, p.stuck ? "STUCK" : "no", p.stuck ? "stuck" : "")
      + cell({...pa, field: "worker"}, owner[p.partition] ?? "-", "l") + "</tr>";
  }
  h += "</table><table><tr><th class=l>worker</th><th class=l>device</th><th class=l>partitions</th><th class=l>host</th><th class=l>metrics</th><th class=l>input</th></tr>";
  for (const w of s.workers) {
    const wa = {...st, member: w.member};
    h += "<tr>" + cell({...wa, field: "member"}, w.member, "l") + cell({...wa, field: "device"}, w.device, "l")
      + cell({...wa, field: "partitions"}, w.partitions.join(","), "l") + cell({...wa, field: "host"}, w.host, "l")
      + cell({...wa, field: "metrics"}, w.metrics, "l")
      + cell({...wa, field: "held"}, w.held ? HELD : w.held === false ? "reading" : "-", w.held ? "l held" : "l") + "</tr>";
  }
  if (!s.workers.length) h += `<tr><td class=l colspan=6>no members</td></tr>`;
  return h + "</table></section>";
}

// -- latency ---------------------------------------------------------------------------------

function pcells(attrs, p) {
  return cell({...attrs, field: "p50_ms"}, num(p.p50_ms, 1)) + cell({...attrs, field: "p95_ms"}, num(p.p95_ms, 1))
    + cell({...attrs, field: "p99_ms"}, num(p.p99_ms, 1));
}

function latencyHtml(l, history) {
  const la = {"latency-stage": l.stage};
  let h = `<h3>${esc(l.stage)} results (topic ${esc(l.topic)})</h3>`
    + "<table><tr><th class=l>window</th><th>results</th><th>p50, ms</th><th>p95, ms</th><th>p99, ms</th><th>skewed</th></tr><tr>"
    + cell({...la, field: "window"}, `last ${num(l.window_s, 0)} s`, "l") + cell({...la, field: "samples"}, l.results)
    + pcells(la, l) + cell({...la, field: "skewed"}, l.skewed) + "</tr></table>";
  let note;
  if (l.error) note = `results not followed: ${l.error}`;
  else if (!l.watching_since) note = "waiting for the results topic";
  else if (!l.results) note = `no result became visible in the last ${num(l.window_s, 0)} s (watching since ${hms(l.watching_since)})`;
  if (note) h += `<div class="meta"${data({...la, field: "latency_note"})}>${esc(note)}</div>`;
  if (l.skewed) h += `<div class="skew"${data({...la, field: "skew_note"})}>${esc(l.skewed)} result(s) crossed hosts whose clocks disagree: their negative spans read 0</div>`;
  h += "<table><tr><th class=l>span</th><th>results</th><th>p50, ms</th><th>p95, ms</th><th>p99, ms</th></tr>";
  const row = (span, label, n, p) => {
    const a = {...la, span};
    return "<tr>" + cell({...a, field: "span"}, label, "l") + cell({...a, field: "results"}, n) + pcells(a, p) + "</tr>";
  };
  for (const s of l.stages || []) {
    h += row(`before:${s.stage}`, `before ${s.stage}`, s.results, s.before) + row(s.stage, `${s.stage} processing`, s.results, s.processing);
  }
  h += row("to_visible", "to visible (send, commit, fetch)", l.results, l.to_visible || {});
  h += "</table>";
  const series = (history.latency || {})[l.stage] || {p50_ms: [], p99_ms: []};
  return h + `<div class="charts">` + chart(`latency-${l.stage}`, `End-to-end latency of ${l.stage}, last ${num(l.window_s, 0)} s`,
    "ms", history.t, [{name: "p50", values: series.p50_ms}, {name: "p99", values: series.p99_ms}]) + "</div>";
}

// -- the page --------------------------------------------------------------------------------

function render(state) {
  document.getElementById("pipeline").textContent = state.pipeline;
  document.getElementById("measured").textContent = hms(state.measured_at);
  const banner = document.getElementById("banner");
  if (state.ok === false) {
    banner.className = "down";
    banner.textContent = `broker unreachable since ${hms(state.down_since)}: ${state.error}`
      + (state.measured_at ? ` (numbers below are from ${hms(state.measured_at)})` : "");
  } else if (state.ok === null) {
    banner.className = "wait"; banner.textContent = "waiting for the first sample...";
  } else { banner.className = ""; banner.textContent = ""; }
  document.body.classList.toggle("stale", state.ok === false);
  document.getElementById("overview").innerHTML = overviewHtml(state.stages);
  document.getElementById("stages").innerHTML = state.stages.map(s => stageHtml(s, state.history)).join("");
  document.getElementById("latency").innerHTML = state.latency.length
    ? state.latency.map(l => latencyHtml(l, state.history)).join("") : `<div class="meta">no sink stage</div>`;
  let dt = `<div class="meta">topic ${esc(state.dlq.topic)}${state.dlq.complete ? "" : " (still counting)"}</div>`
    + "<table><tr><th class=l>stage</th><th class=l>reason</th><th>count</th></tr>";
  for (const d of state.dlq.counts) {
    const da = {"dlq-stage": d.stage, reason: d.reason};
    dt += "<tr>" + cell({...da, field: "stage"}, d.stage, "l") + cell({...da, field: "reason"}, d.reason, "l")
      + cell({...da, field: "count"}, d.count) + "</tr>";
  }
  dt += `<tr><th class=l colspan=2>total</th>` + cell({field: "dlq_total"}, state.dlq.total) + "</tr>";
  document.getElementById("dlq").innerHTML = dt + "</table>";
}

async function refresh() {
  try {
    const r = await fetch("api/state", {cache: "no-store"});
    render(await r.json());
  } catch (e) {
    const banner = document.getElementById("banner");
    banner.className = "down"; banner.textContent = "dashboard server unreachable: " + e;
  }
  setTimeout(refresh, REFRESH_MS);
}
refresh();
