// edgeos console: a small script of its own (no library), loaded from the package. It fetches
// JSON from /api/*, updates values through server-sent events and draws trends as SVG.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

async function getJSON(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function fmtValue(v, kind) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "string") return v;
  if (kind === "bool") return v ? "true" : "false";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e7 || a < 1e-3)) return v.toExponential(4);
  return String(Math.round(v * 1e4) / 1e4);
}

function fmtAge(ns, nowNs) {
  if (!ns) return "–";
  const s = Math.max(0, (nowNs - ns) / 1e9);
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return (s / 60).toFixed(1) + " min";
  if (s < 86400) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

function fmtTime(ns) {
  if (!ns) return "–";
  return new Date(ns / 1e6).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "–";
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d} d ${h} h`;
  if (h) return `${h} h ${m} min`;
  return `${m} min ${Math.floor(s % 60)} s`;
}

function fill(dl, pairs) {
  dl.replaceChildren();
  for (const [k, v, cls] of pairs) {
    dl.append(el("dt", {}, k));
    dl.append(el("dd", cls ? { class: cls } : {}, v));
  }
}

// Skew between this browser's clock and the gateway's, from the last response (ns).
let skewNs = 0;
const nowNs = () => Date.now() * 1e6 + skewNs;

// -- overview ------------------------------------------------------------------------------

async function overview() {
  const tick = async () => {
    try {
      const o = await getJSON("/api/overview");
      skewNs = o.now_ns - Date.now() * 1e6;
      const g = o.gateway;
      $("#gw").textContent = g.id;
      fill($("#gateway"), [
        ["Gateway id", g.id], ["Version", g.version], ["Uptime", fmtDuration(g.uptime_s)],
        ["Filter kernels", g.kernels, g.kernels === "compiled" ? "good" : "uncertain"],
        ["Tags", g.tags], ["Samples read", g.read], ["Stored", g.stored], ["Dropped by filters", g.filtered_out],
      ]);
      const s = o.store;
      const pct = s.max_size && s.used_bytes !== undefined ? ` (${(100 * s.used_bytes / s.max_size).toFixed(1)} %)` : "";
      const drops = s.dropped_retention + s.dropped_budget + s.dropped_store_unavailable;
      fill($("#store"), [
        ["Size / budget", `${fmtBytes(s.used_bytes)} / ${fmtBytes(s.max_size)}${pct}`],
        ["Oldest sample", s.horizon_ns ? `${fmtAge(s.horizon_ns, o.now_ns)} ago (${fmtTime(s.horizon_ns)})` : "–"],
        ["Retention", s.retention_s ? fmtDuration(s.retention_s) : "until the budget is full"],
        ["Samples committed", s.committed_samples],
        ["Dropped", `${s.dropped_retention} by retention, ${s.dropped_budget} by budget, `
          + `${s.dropped_store_unavailable} while the disk refused`, drops ? "uncertain" : ""],
        ["Store errors", s.store_errors, s.store_errors ? "bad" : ""],
      ]);
      const u = o.upstream;
      fill($("#upstream"), u.enabled ? [
        ["Enabled", "yes"], ["Connected", u.connected ? "yes" : `no (${u.state})`, u.connected ? "good" : "bad"],
        ["Lag", u.lag_s === null ? "–" : u.lag_s.toFixed(1) + " s"],
        ["Backlog", `${u.backlog_samples} samples in ${u.backlog_units} units`],
        ["Last error", u.last_error || "–"],
      ] : [["Enabled", "no: every sample stays on this gateway"]]);
      const tb = $("#devices tbody");
      tb.replaceChildren();
      for (const d of o.devices) {
        const tr = el("tr");
        const cls = d.up ? "good" : d.state === "disabled" ? "muted" : "bad";
        const state = d.state === "running" && !d.up ? "running, no answer" : d.state;
        const L = d.lateness_ms;
        const late = !L ? "–" : L.p50 !== undefined
          ? `${L.p50.toFixed(1)} / ${L.p99.toFixed(1)} / ${L.max.toFixed(1)} ms` : `mean ${L.mean.toFixed(1)} ms`;
        tr.append(el("td", {}, d.name), el("td", {}, d.protocol), el("td", { class: cls }, state),
          el("td", {}, d.last_ok_ns ? `${fmtAge(d.last_ok_ns, o.now_ns)} ago` : "never"),
          el("td", { class: "num" + (d.errors ? " bad" : "") }, d.errors),
          el("td", {}, d.last_error ? `${d.last_error_code}: ${d.last_error}` : "–"), el("td", { class: "num" }, late));
        tb.append(tr);
      }
      $("#conn").textContent = "";
    } catch (e) {
      $("#conn").textContent = "gateway unreachable";
    }
  };
  await tick();
  setInterval(tick, 2000);
}

// -- tags ----------------------------------------------------------------------------------

async function tags() {
  const params = new URLSearchParams(location.search);
  const state = { q: params.get("q") || "", device: params.get("device") || "", offset: 0, limit: 100 };
  const rows = new Map(); // id -> {value, age, quality cells, row data}
  let source = null;
  let loaded = false;
  $("#q").value = state.q;

  const render = (data) => {
    skewNs = data.now_ns - Date.now() * 1e6;
    if (!loaded) {
      for (const d of data.devices) $("#device").append(el("option", { value: d }, d));
      $("#device").value = state.device;
      loaded = true;
    }
    const end = Math.min(data.offset + data.limit, data.matched);
    $("#count").textContent = data.matched
      ? `${data.offset + 1}–${end} of ${data.matched}` + (data.matched !== data.total ? ` (${data.total} tags)` : " tags")
      : `no tag matches (${data.total} tags)`;
    $("#prev").disabled = data.offset === 0;
    $("#next").disabled = end >= data.matched;
    const tb = $("#tags tbody");
    tb.replaceChildren();
    rows.clear();
    for (const r of data.rows) {
      const tr = el("tr", { "data-id": r.id });
      const key = `${r.device}/${r.name}`;
      const link = el("a", { href: "/trend?tag=" + encodeURIComponent(key) }, r.name);
      const name = el("td");
      name.append(link);
      const value = el("td", { class: "num value" });
      const quality = el("td");
      const age = el("td", { class: "num" });
      tr.append(name, el("td", {}, r.device), value, el("td", {}, r.unit), quality, age);
      tb.append(tr);
      const row = { r, value, quality, age };
      rows.set(r.id, row);
      update(row, r);
    }
    subscribe([...rows.keys()]);
  };

  const update = (row, live) => {
    Object.assign(row.r, live);
    row.value.textContent = fmtValue(row.r.value, row.r.kind);
    row.quality.textContent = row.r.quality;
    row.quality.className = row.r.severity;
    row.age.textContent = fmtAge(row.r.ts, nowNs());
  };

  const subscribe = (ids) => {
    if (source) source.close();
    if (!ids.length) return;
    source = new EventSource("/api/stream?ids=" + ids.join(","));
    source.onmessage = (ev) => {
      for (const live of JSON.parse(ev.data).rows) {
        const row = rows.get(live.id);
        if (row) update(row, live);
      }
      $("#conn").textContent = "live";
    };
    source.onerror = () => { $("#conn").textContent = "reconnecting…"; };
  };

  const load = async () => {
    const u = new URLSearchParams({ q: state.q, device: state.device, offset: state.offset, limit: state.limit });
    render(await getJSON("/api/tags?" + u));
    const shown = new URLSearchParams();
    if (state.q) shown.set("q", state.q);
    if (state.device) shown.set("device", state.device);
    history.replaceState(null, "", "/tags" + (shown.toString() ? "?" + shown : ""));
  };

  let timer = null;
  $("#q").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.q = $("#q").value; state.offset = 0; load(); }, 200);
  });
  $("#device").addEventListener("change", () => { state.device = $("#device").value; state.offset = 0; load(); });
  $("#prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); load(); });
  $("#next").addEventListener("click", () => { state.offset += state.limit; load(); });
  setInterval(() => { for (const row of rows.values()) row.age.textContent = fmtAge(row.r.ts, nowNs()); }, 1000);
  await load();
}

// -- trend ---------------------------------------------------------------------------------

const PAD = { left: 64, right: 16, top: 12, bottom: 28 };

function niceTicks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; lo = lo - 1; }
  const raw = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Math.round(v / step) * step);
  return out;
}

function timeTicks(lo, hi, n) {
  const spans = [1, 5, 15, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400].map((s) => s * 1e9);
  const step = spans.find((s) => (hi - lo) / s <= n) || spans[spans.length - 1];
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi; t += step) out.push(t);
  return { ticks: out, step };
}

function fmtTick(ns, step) {
  const d = new Date(ns / 1e6);
  const hm = d.toISOString().slice(11, step < 60e9 ? 19 : 16);
  return step >= 86400e9 ? d.toISOString().slice(5, 10) : step >= 3 * 3600e9 && d.getUTCHours() === 0 ? d.toISOString().slice(5, 10) : hm;
}

function toLocalInput(ns) {
  const d = new Date(ns / 1e6 - new Date().getTimezoneOffset() * 60000);
  return d.toISOString().slice(0, 19);
}

async function trend() {
  const params = new URLSearchParams(location.search);
  const state = { tags: params.getAll("tag"), since: params.get("since") || "24h", until: params.get("until") || "now" };
  const zooms = [];
  let data = null;
  const chart = $("#chart");

  const allTags = await getJSON("/api/tags?limit=500");
  for (const r of allTags.rows) $("#taglist").append(el("option", { value: `${r.device}/${r.name}` }));
  if (!state.tags.length && allTags.rows.length) {
    const firstNumber = allTags.rows.find((r) => r.kind === "number") || allTags.rows[0];
    state.tags = [`${firstNumber.device}/${firstNumber.name}`];
  }

  const chips = () => {
    const box = $("#chips");
    box.replaceChildren();
    state.tags.forEach((t, i) => {
      const c = el("span", { class: "chip" }, t);
      const x = el("button", { type: "button", title: "remove" }, "×");
      x.addEventListener("click", () => { state.tags.splice(i, 1); load(); });
      c.append(x);
      box.append(c);
    });
  };

  const query = () => {
    const u = new URLSearchParams();
    for (const t of state.tags) u.append("tag", t);
    u.set("since", state.since); // forms the server parses: 24h, now, @unix, ISO
    u.set("until", state.until);
    return u;
  };

  const load = async () => {
    chips();
    const shown = query();
    history.replaceState(null, "", "/trend?" + shown);
    if (!state.tags.length) { chart.replaceChildren(); $("#info").textContent = "add a tag"; return; }
    const width = Math.max(100, Math.round(chart.getBoundingClientRect().width - PAD.left - PAD.right));
    const u = query();
    u.set("width", width);
    data = await getJSON("/api/trend?" + u);
    // The CSV covers exactly the range drawn, in absolute times (what `edgeos export` would take).
    const csv = new URLSearchParams();
    for (const t of state.tags) csv.append("tag", t);
    csv.set("since", "@" + (data.since_ns / 1e9).toFixed(3));
    csv.set("until", "@" + (data.until_ns / 1e9).toFixed(3));
    $("#csv").setAttribute("href", "/api/export.csv?" + csv);
    $("#from").value = toLocalInput(data.since_ns);
    $("#to").value = toLocalInput(data.until_ns);
    const n = data.series.reduce((a, s) => a + s.samples, 0);
    $("#info").textContent = `${n} samples in ${data.buckets} buckets of ${(data.step_ns / 1e9).toFixed(1)} s`;
    draw();
  };

  const draw = () => {
    chart.replaceChildren();
    const box = chart.getBoundingClientRect();
    const W = Math.round(box.width), H = Math.round(box.height);
    chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
    const pw = W - PAD.left - PAD.right, ph = H - PAD.top - PAD.bottom;
    const t0 = data.since_ns, t1 = data.until_ns, step = data.step_ns;
    let lo = Infinity, hi = -Infinity;
    for (const s of data.series) for (let i = 0; i < data.buckets; i++) {
      if (s.min[i] !== null) lo = Math.min(lo, s.min[i]);
      if (s.max[i] !== null) hi = Math.max(hi, s.max[i]);
    }
    if (lo === Infinity) { lo = 0; hi = 1; }
    if (hi === lo) { hi += 1; lo -= 1; }
    const m = (hi - lo) * 0.05;
    lo -= m; hi += m;
    const X = (t) => PAD.left + ((t - t0) / (t1 - t0)) * pw;
    const Y = (v) => PAD.top + (1 - (v - lo) / (hi - lo)) * ph;
    for (const v of niceTicks(lo, hi, 6)) {
      chart.append(svg("line", { class: "axis", x1: PAD.left, x2: W - PAD.right, y1: Y(v), y2: Y(v) }));
      const t = svg("text", { x: PAD.left - 6, y: Y(v) + 4, "text-anchor": "end" });
      t.textContent = fmtValue(v);
      chart.append(t);
    }
    const tt = timeTicks(t0, t1, Math.max(2, Math.floor(pw / 110)));
    for (const t of tt.ticks) {
      chart.append(svg("line", { class: "axis", x1: X(t), x2: X(t), y1: PAD.top, y2: H - PAD.bottom }));
      const l = svg("text", { x: X(t), y: H - 8, "text-anchor": "middle" });
      l.textContent = fmtTick(t, tt.step);
      chart.append(l);
    }
    const legend = $("#legend");
    legend.replaceChildren();
    data.series.forEach((s, k) => {
      const cls = "s" + (k % 8);
      // Bad periods: shaded, and the line is broken across them.
      const bad = s.bad.map(([a, b]) => [Math.max(a, t0), Math.min(b, t1)]).filter(([a, b]) => b >= a);
      for (const [a, b] of bad) {
        chart.append(svg("rect", { class: "badzone", "data-series": k, "data-from": a, "data-to": b,
          x: X(a), y: PAD.top, width: Math.max(2, X(b) - X(a)), height: ph }));
      }
      const crossesBad = (ta, tb) => bad.some(([a, b]) => a <= tb && b >= ta);
      const pts = [];
      for (let i = 0; i < data.buckets; i++) if (s.mean[i] !== null) pts.push(i);
      const maxGap = Math.max(2 * step, 3 * (s.interval_ns || 0));
      const segments = [];
      let cur = [];
      for (const i of pts) {
        const prev = cur.length ? cur[cur.length - 1] : null;
        if (prev !== null && ((i - prev) * step > maxGap || crossesBad(t0 + prev * step + step / 2, t0 + i * step + step / 2))) {
          segments.push(cur);
          cur = [];
        }
        cur.push(i);
      }
      if (cur.length) segments.push(cur);
      const cx = (i) => X(t0 + i * step + step / 2).toFixed(1);
      let band = "", line = "";
      for (const seg of segments) {
        line += seg.map((i, j) => `${j ? "L" : "M"}${cx(i)},${Y(s.mean[i]).toFixed(1)}`).join("");
        if (seg.length === 1) line += `h0.5`;
        band += seg.map((i, j) => `${j ? "L" : "M"}${cx(i)},${Y(s.max[i]).toFixed(1)}`).join("");
        band += seg.slice().reverse().map((i) => `L${cx(i)},${Y(s.min[i]).toFixed(1)}`).join("") + "Z";
      }
      chart.append(svg("path", { class: "band " + cls, d: band || "M0,0" }));
      chart.append(svg("path", { class: "mean " + cls, id: "mean-" + k, "data-segments": segments.length, d: line || "M0,0" }));
      const item = el("span");
      const sw = svg("svg", { width: 12, height: 12, class: "swatch" });
      sw.append(svg("rect", { width: 12, height: 12, class: cls }));
      item.append(sw, document.createTextNode(`${s.tag}${s.unit ? " [" + s.unit + "]" : ""}: ${s.samples} samples`
        + (s.bad.length ? `, ${s.bad.length} Bad period${s.bad.length > 1 ? "s" : ""}` : "")));
      legend.append(item);
    });
    chart.append(svg("rect", { class: "axis", x: PAD.left, y: PAD.top, width: pw, height: ph, fill: "none" }));
    chart.dataset.ready = "1";
  };

  // Zoom: drag across the chart to select a range.
  let drag = null;
  const tAt = (clientX) => {
    const box = chart.getBoundingClientRect();
    const f = (clientX - box.left - PAD.left) / (box.width - PAD.left - PAD.right);
    return data.since_ns + Math.min(1, Math.max(0, f)) * (data.until_ns - data.since_ns);
  };
  chart.addEventListener("mousedown", (e) => {
    if (!data) return;
    const box = chart.getBoundingClientRect();
    drag = { x: e.clientX - box.left, rect: svg("rect", { class: "sel", x: e.clientX - box.left, y: PAD.top, width: 0, height: box.height - PAD.top - PAD.bottom }), t: tAt(e.clientX) };
    chart.append(drag.rect);
  });
  chart.addEventListener("mousemove", (e) => {
    if (!drag) return;
    const x = e.clientX - chart.getBoundingClientRect().left;
    drag.rect.setAttribute("x", Math.min(x, drag.x));
    drag.rect.setAttribute("width", Math.abs(x - drag.x));
  });
  window.addEventListener("mouseup", (e) => {
    if (!drag) return;
    const a = drag.t, b = tAt(e.clientX);
    drag.rect.remove();
    drag = null;
    if (Math.abs(b - a) < (data.until_ns - data.since_ns) / 500) return;
    zooms.push([state.since, state.until]);
    state.since = "@" + (Math.min(a, b) / 1e9).toFixed(3);
    state.until = "@" + (Math.max(a, b) / 1e9).toFixed(3);
    load();
  });
  $("#back").addEventListener("click", () => {
    if (zooms.length) [state.since, state.until] = zooms.pop();
    else {
      const span = (data.until_ns - data.since_ns) / 1e9;
      state.since = "@" + (data.since_ns / 1e9 - span / 2).toFixed(3);
      state.until = "@" + (Math.min(Date.now() / 1e3, data.until_ns / 1e9 + span / 2)).toFixed(3);
    }
    load();
  });
  for (const b of document.querySelectorAll("[data-range]")) {
    b.addEventListener("click", () => { zooms.length = 0; state.since = b.dataset.range; state.until = "now"; load(); });
  }
  $("#apply").addEventListener("click", () => {
    const a = Date.parse($("#from").value), b = Date.parse($("#to").value);
    if (isNaN(a) || isNaN(b) || b <= a) { $("#info").textContent = "the custom range needs a start before its end"; return; }
    zooms.push([state.since, state.until]);
    state.since = "@" + a / 1e3;
    state.until = "@" + b / 1e3;
    load();
  });
  const add = () => {
    const t = $("#tag").value.trim();
    if (t && !state.tags.includes(t) && state.tags.length < 8) { state.tags.push(t); $("#tag").value = ""; load(); }
  };
  $("#add").addEventListener("click", add);
  $("#tag").addEventListener("keydown", (e) => { if (e.key === "Enter") add(); });
  window.addEventListener("resize", () => { if (data) draw(); });
  try {
    await load();
  } catch (e) {
    $("#info").textContent = String(e.message || e);
  }
}

// -- config --------------------------------------------------------------------------------

function toml(obj) {
  const lines = [];
  const scalar = (v) => (typeof v === "string" ? JSON.stringify(v) : Array.isArray(v) ? "[" + v.map(scalar).join(", ") + "]"
    : v !== null && typeof v === "object" ? "{ " + Object.entries(v).map(([k, x]) => `${k} = ${scalar(x)}`).join(", ") + " }" : String(v));
  const isTable = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
  const isTableArray = (v) => Array.isArray(v) && v.length > 0 && v.every(isTable);
  const table = (prefix, o, arrayItem) => {
    const entries = Object.entries(o);
    if (prefix) lines.push(arrayItem ? `[[${prefix}]]` : `[${prefix}]`);
    let plain = 0;
    for (const [k, v] of entries) if (!isTable(v) && !isTableArray(v)) { lines.push(`${k} = ${scalar(v)}`); plain++; }
    if (prefix || plain) lines.push("");
    for (const [k, v] of entries) {
      const name = prefix ? `${prefix}.${k}` : k;
      if (isTable(v)) table(name, v, false);
      else if (isTableArray(v)) for (const item of v) table(name, item, true);
    }
  };
  table("", obj, false);
  return lines.join("\n");
}

async function config() {
  const c = await getJSON("/api/config");
  $("#file").textContent = c.file;
  $("#config").textContent = toml(c.config);
}

// -- start ---------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  for (const a of document.querySelectorAll("nav a")) if (a.dataset.nav === page) a.classList.add("active");
  const run = { overview, tags, trend, config }[page];
  if (run) run().catch((e) => { $("#conn").textContent = String(e.message || e); });
  if (page !== "overview") getJSON("/api/overview").then((o) => { $("#gw").textContent = o.gateway.id; }).catch(() => {});
});
