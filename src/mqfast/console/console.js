// The mqfast web console: plain DOM code over the gateway's own API, no library, nothing
// fetched from elsewhere. Every call carries the token the page was given (sessionStorage).
"use strict";

const TOKEN_KEY = "mqfast-token";
const REFRESH_MS = 5000;
const DLQ_PAGE = 50;
const RATE_WINDOW_MS = 15 * 60 * 1000;
const $ = (id) => document.getElementById(id);

let page = "";
let timer = 0;
let dlqOffset = 0;
let dlqTopics = [];
// Dead letters whose headers are unfolded: kept so across the page's refreshes.
const unfolded = new Set();

class Unauthorized extends Error {}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  const data = await resp.json().catch(() => ({}));
  if (resp.status === 401) throw new Unauthorized((data.error || {}).message || "unauthorized");
  if (!resp.ok) {
    const e = data.error || {};
    throw new Error(`${method} ${path}: ${resp.status} ${e.code || ""} ${e.message || ""}`);
  }
  return data;
}

// ---- formatting ------------------------------------------------------------------------------

const count = (n) => Number(n).toLocaleString("en-US");

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Number(n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return (i === 0 ? String(v) : v.toFixed(1)) + " " + units[i];
}

function duration(ns) {
  if (!ns) return "forever";
  let s = Number(ns) / 1e9;
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
    if (s >= size && s % size === 0) return s / size + unit;
  }
  return s < 1 ? Number(ns) / 1e6 + "ms" : s + "s";
}

function age(seconds) {
  if (seconds === undefined || seconds === null) return "—";
  if (seconds < 60) return seconds.toFixed(1) + " s";
  if (seconds < 3600) return (seconds / 60).toFixed(1) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function when(ms) {
  if (!ms) return "—";
  return new Date(Number(ms)).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

function fill(bodyId, emptyId, rows) {
  $(bodyId).replaceChildren(...rows);
  $(bodyId).closest("table").hidden = rows.length === 0;
  $(emptyId).hidden = rows.length > 0;
}

// ---- pages ------------------------------------------------------------------------------

async function describeAll() {
  const { topics } = await api("GET", "/api/v1/topics");
  const infos = await Promise.all(
    topics.map((t) =>
      api("GET", "/api/v1/topics/" + encodeURIComponent(t.name)).catch(() => null)
    )
  );
  const byName = new Map();
  for (const info of infos) if (info) byName.set(info.name, info);
  return byName;
}

const isDlq = (name) => name.endsWith(".dlq");

async function showTopics() {
  const infos = await describeAll();
  const rows = [];
  for (const t of infos.values()) {
    if (isDlq(t.name)) continue;
    const dlq = infos.get(t.name + ".dlq");
    const dead = dlq ? dlq.messages : 0;
    rows.push(
      el("tr", { "data-topic": t.name },
        el("td", {}, t.name, t.encrypted ? el("span", { class: "tag" }, "encrypted") : ""),
        el("td", { class: "num", "data-field": "partitions" }, t.partitions),
        el("td", { class: "num", "data-field": "messages" }, count(t.messages)),
        el("td", { class: "num", "data-field": "bytes", "data-value": t.bytes,
                   title: count(t.bytes) + " bytes" }, bytes(t.bytes)),
        el("td", { "data-field": "retention" }, duration(t.retention)),
        el("td", { class: "num", "data-field": "dead_letters" },
          dead ? el("a", { href: "#dlq/" + encodeURIComponent(t.name) }, count(dead)) : "0"),
        el("td", { class: "num", "data-field": "groups" }, t.consumer_groups.length)
      )
    );
  }
  fill("topics-body", "topics-empty", rows);
}

async function showGroups() {
  const [infos, health] = await Promise.all([describeAll(), api("GET", "/health")]);
  const cg = health.consumer_groups || {};
  const behind = new Map();
  for (const b of cg.behind || []) behind.set(b.group_id + "\u0000" + b.topic, b);
  const rows = [];
  for (const t of infos.values()) {
    for (const g of t.consumer_groups) {
      const b = behind.get(g.group_id + "\u0000" + t.name);
      const state = b ? "behind: " + b.reasons.join(", ") : "ok";
      rows.push(
        el("tr", { "data-group": g.group_id, "data-topic": t.name },
          el("td", {}, g.group_id),
          el("td", {}, t.name),
          el("td", { class: "num", "data-field": "lag" }, count(g.lag)),
          el("td", { class: "num", "data-field": "oldest_unacked" },
            age(g.oldest_unacked_age_s)),
          el("td", {}, el("span", { class: b ? "tag warn" : "tag ok" }, state))
        )
      );
    }
  }
  const limits = cg.max_lag === undefined ? "" :
    ` A group is behind above a lag of ${count(cg.max_lag)} or with a delivery not ` +
    `acknowledged for more than ${age(cg.max_unacked_age_s)}.`;
  $("groups-note").textContent =
    `Checked ${cg.checked_at || "not yet"}: ${cg.groups ?? 0} group/topic pairs, ` +
    `${cg.behind_total ?? 0} behind.` + limits;
  fill("groups-body", "groups-empty", rows);
}

async function showConsumers() {
  const { consumers } = await api("GET", "/api/v1/consumers");
  const rows = consumers.map((c) =>
    el("tr", { "data-consumer": c.consumer_id },
      el("td", {}, c.consumer_id),
      el("td", {}, c.group_id),
      el("td", {}, c.topics.join(", ")),
      el("td", { class: "num" }, c.max_concurrency ?? "—"),
      el("td", { class: "num" }, c.rate_limit === null ? "—" : c.rate_limit + "/s"),
      el("td", {}, when(c.last_seen)),
      el("td", {}, el("span", { class: c.active ? "tag ok" : "tag" },
        c.active ? "active" : "inactive"))
    )
  );
  fill("consumers-body", "consumers-empty", rows);
}

async function showRates() {
  const start = new Date(Date.now() - RATE_WINDOW_MS).toISOString();
  const h = await api("GET", "/api/v1/metrics?start_time=" + encodeURIComponent(start));
  const series = new Map();  // interval start (unix ms) -> [produced, consumed]
  for (const p of h.points) {
    const t = Date.parse(p.time);
    const s = series.get(t) || [0, 0];
    s[0] += p.produced;
    s[1] += p.consumed;
    series.set(t, s);
  }
  const step = h.step_s || h.interval_s || 1;
  // The history has a point per interval with traffic only: the idle ones between are zero.
  const times = [...series.keys()].sort((a, b) => a - b);
  const points = [];
  if (times.length) {
    const end = Math.max(times[times.length - 1], Date.now() - 2 * step * 1000);
    for (let t = times[0]; t <= end; t += step * 1000) {
      const s = series.get(t) || [0, 0];
      points.push({ t, produced: s[0] / step, consumed: s[1] / step });
    }
  }
  const last = points[points.length - 1];
  const peak = (key) => Math.max(0, ...points.map((p) => p[key])).toFixed(1);
  $("rates-note").textContent = last
    ? `All topics, up to the last ${RATE_WINDOW_MS / 60000} minutes, one point per ${step} s ` +
      `(GET /api/v1/metrics). Latest: ${last.produced.toFixed(1)} produced/s, ` +
      `${last.consumed.toFixed(1)} consumed/s; peak ${peak("produced")} produced/s, ` +
      `${peak("consumed")} consumed/s.`
    : "No interval recorded yet: the history gets a point every metrics interval.";
  drawChart($("chart"), points);
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// The x axis spans the history there is (a fresh server has seconds of it), from one
// minute up to RATE_WINDOW_MS; ticks at a round number of seconds or minutes before now.
const TICKS_S = [10, 30, 60, 120, 300, 600];

function drawChart(box, points) {
  const W = 880, H = 280, L = 64, R = 24, T = 16, B = 32;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
                            "aria-label": "produce and consume rates" });
  const now = Date.now();
  const span = Math.min(RATE_WINDOW_MS, Math.max(60000, points.length ? now - points[0].t : 0));
  const t0 = now - span;
  let top = 1;
  for (const p of points) top = Math.max(top, p.produced, p.consumed);
  top = niceCeil(top);
  const x = (t) => L + ((t - t0) / span) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    root.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    root.append(svg("text", { x: L - 8, y: y(v) + 4, "text-anchor": "end", class: "axis" },
      v >= 100 ? count(Math.round(v)) : String(+v.toFixed(1))));
  }
  const tick = TICKS_S.find((s) => span / 1000 / s <= 6) || 600;
  for (let back = 0; back * 1000 <= span; back += tick) {
    const label = back === 0 ? "now" : back < 60 ? `-${back} s` : `-${back / 60} min`;
    root.append(svg("text", { x: x(now - back * 1000), y: H - 10, "text-anchor": "middle",
                              class: "axis" }, label));
  }
  for (const key of ["produced", "consumed"]) {
    const shown = points.filter((p) => p.t >= t0);
    if (!shown.length) continue;
    const coords = shown.map((p) => `${x(p.t)},${y(p[key])}`);
    const base = `${x(shown[shown.length - 1].t)},${y(0)} ${x(shown[0].t)},${y(0)}`;
    root.append(svg("polygon", { points: coords.join(" ") + " " + base, class: "area " + key }));
    root.append(svg("polyline", { points: coords.join(" "), class: "line " + key }));
    if (shown.length < 40) {
      for (const p of shown) {
        root.append(svg("circle", { cx: x(p.t), cy: y(p[key]), r: 3, class: "dot " + key }));
      }
    }
  }
  box.replaceChildren(root);
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

async function showDlq(topic) {
  const infos = await describeAll();
  dlqTopics = [...infos.values()].filter((t) => !isDlq(t.name)).map((t) => ({
    name: t.name,
    dead: (infos.get(t.name + ".dlq") || { messages: 0 }).messages,
  }));
  dlqTopics.sort((a, b) => b.dead - a.dead || a.name.localeCompare(b.name));
  const select = $("dlq-topic");
  const chosen = topic || select.value || (dlqTopics[0] || {}).name || "";
  select.replaceChildren(
    ...dlqTopics.map((t) =>
      el("option", { value: t.name, selected: t.name === chosen },
        `${t.name} (${count(t.dead)})`)
    )
  );
  const current = dlqTopics.find((t) => t.name === chosen);
  $("redrive-all").disabled = !current || current.dead === 0;
  if (!chosen) {
    fill("dlq-body", "dlq-empty", []);
    return;
  }
  const path = `/api/v1/topics/${encodeURIComponent(chosen)}/dlq?limit=${DLQ_PAGE}` +
    `&offset=${dlqOffset}`;
  const shown = await api("GET", path);
  const rows = shown.messages.map((m) => dlqRow(chosen, m));
  fill("dlq-body", "dlq-empty", rows);
  const more = $("dlq-more");
  more.hidden = shown.next_offset === null;
  more.onclick = () => {
    dlqOffset = shown.next_offset;
    refresh();
  };
}

function headerList(m) {
  const details = el("details", { open: unfolded.has(m.message_id) },
    el("summary", {}, `${Object.keys(m.headers).length} headers`),
    el("dl", {}, ...Object.entries(m.headers).flatMap(([k, v]) =>
      [el("dt", {}, k), el("dd", {}, v)])));
  details.ontoggle = () => {
    if (details.open) unfolded.add(m.message_id);
    else unfolded.delete(m.message_id);
  };
  return details;
}

function dlqRow(topic, m) {
  const o = m.origin;
  const button = el("button", { type: "button", class: "redrive" }, "Redrive");
  button.onclick = async () => {
    button.disabled = true;
    try {
      const r = await api("POST", `/api/v1/topics/${encodeURIComponent(topic)}/redrive`,
        { message_id: m.message_id });
      $("dlq-result").textContent = `Moved ${r.moved} message back to ${topic}.`;
    } catch (e) {
      report(e);
    }
    refresh();
  };
  return el("tr", { "data-message": m.message_id },
    el("td", { class: "num" }, m.offset),
    el("td", { class: "when" }, when(m.dead_lettered_at)),
    el("td", {}, el("span", { class: "tag warn" }, m.reason || "—")),
    el("td", { class: "error-text" }, m.error || "—"),
    el("td", { class: "origin" },
      `${o.topic ?? "?"}[${o.partition ?? "?"}]@${o.offset ?? "?"}`,
      el("br"), el("small", {}, `group ${o.group_id ?? "?"}, ${o.delivery_count ?? "?"} deliveries`)),
    el("td", { class: "content" }, el("code", {}, m.content.length > 200
      ? m.content.slice(0, 200) + "…" : m.content)),
    el("td", { class: "headers" }, headerList(m)),
    el("td", {}, button)
  );
}

$("redrive-all").onclick = async () => {
  const b = $("redrive-all");
  const topic = $("dlq-topic").value;
  if (b.dataset.armed !== "1") {
    b.dataset.armed = "1";
    b.textContent = "Confirm: redrive all of " + topic;
    return;
  }
  b.dataset.armed = "";
  b.textContent = "Redrive all";
  try {
    const r = await api("POST", `/api/v1/topics/${encodeURIComponent(topic)}/redrive`, {});
    $("dlq-result").textContent = `Moved ${count(r.moved)} messages back to ${topic}.`;
  } catch (e) {
    report(e);
  }
  dlqOffset = 0;
  refresh();
};

$("dlq-topic").onchange = () => {
  dlqOffset = 0;
  $("dlq-result").textContent = "";
  location.hash = "#dlq/" + encodeURIComponent($("dlq-topic").value);
};

// ---- navigation and sign-in ------------------------------------------------------------------

const PAGES = {
  topics: showTopics,
  groups: showGroups,
  consumers: showConsumers,
  rates: showRates,
  dlq: () => showDlq(decodeURIComponent(location.hash.split("/")[1] || "")),
};

function report(e) {
  if (e instanceof Unauthorized) {
    showLogin(e.message);
    return;
  }
  $("error").textContent = String(e.message || e);
}

function showLogin(reason) {
  clearTimeout(timer);
  for (const s of document.querySelectorAll(".page")) s.hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = sessionStorage.getItem(TOKEN_KEY)
    ? "The token was refused: " + reason : "";
  $("status").textContent = "not signed in";
}

async function refresh() {
  clearTimeout(timer);
  try {
    await PAGES[page]();
    $("error").textContent = "";
    $("login").hidden = true;
    $("page-" + page).hidden = false;
    $("status").textContent = "updated " + new Date().toLocaleTimeString("en-GB");
    $("signout").hidden = !sessionStorage.getItem(TOKEN_KEY);
    document.body.dataset.loaded = page;
  } catch (e) {
    report(e);
    if (e instanceof Unauthorized) return;
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function route() {
  const name = (location.hash.slice(1).split("/")[0] || "topics");
  page = name in PAGES ? name : "topics";
  delete document.body.dataset.loaded;
  for (const s of document.querySelectorAll(".page")) s.hidden = s.id !== "page-" + page;
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.page === page);
  }
  refresh();
}

$("login-form").onsubmit = (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  route();
};

$("signout").onclick = () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin("");
};

window.addEventListener("hashchange", route);
route();
