// Tideflow console: plain JavaScript, no build step, no library.
//
// Every node is built with el()/svg() and textContent: text from a manifest or a
// status (task names, messages, labels) is never parsed as HTML.  The pages fetch
// JSON from /api/... and refetch when /api/events (server-sent events, fed by the
// console's one shared Kubernetes watch per kind) says something they show changed.
"use strict";

const PAGE = 50;
const SYMBOLS = { Succeeded: "✔", Failed: "✖", Running: "●", Retrying: "↻", Interrupted: "⚡",
  Pending: "◷", Assigned: "◷", Skipped: "○", Cancelled: "⊘", Unknown: "?" };
let current = null;       // { kinds: Set, key: string|null, render: () => Promise }
let refreshTimer = null;
let selectedTask = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = String(v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function duration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.max(0, s);
  if (s < 10) return s.toFixed(1) + "s";
  const w = Math.floor(s);
  if (w < 60) return w + "s";
  const m = Math.floor(w / 60), h = Math.floor(m / 60), d = Math.floor(h / 24);
  if (m < 60) return m + "m" + String(w % 60).padStart(2, "0") + "s";
  if (h < 24) return h + "h" + String(m % 60).padStart(2, "0") + "m";
  return d + "d" + String(h % 24).padStart(2, "0") + "h";
}

function phasePill(phase) {
  return el("span", { class: "pill phase-" + phase, "data-phase": phase },
    (SYMBOLS[phase] || "?") + " " + phase);
}

function params() {
  const [path, query] = location.hash.slice(1).split("?");
  return { path: path || "/fleet", query: new URLSearchParams(query || "") };
}

function setQuery(path, values) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(values)) if (v) q.set(k, v);
  const text = q.toString();
  location.hash = "#" + path + (text ? "?" + text : "");
}

async function getJSON(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" } });
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r.json();
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

function cacheNotes(status) {
  const notes = [];
  for (const [kind, s] of Object.entries(status || {})) {
    if (s.error) notes.push(el("p", { class: "error" }, kind + ": " + s.error));
    else if (!s.synced) notes.push(el("p", { class: "muted" }, kind + ": loading…"));
  }
  return notes;
}

function pager(total, offset, go) {
  const pages = Math.max(1, Math.ceil(total / PAGE));
  const page = Math.floor(offset / PAGE) + 1;
  return el("div", { class: "pager" },
    el("button", { disabled: page <= 1, onclick: () => go(offset - PAGE) }, "‹ previous"),
    el("span", { id: "page-info" }, `page ${page} of ${pages} · ${total} in all`),
    el("button", { disabled: page >= pages, onclick: () => go(offset + PAGE) }, "next ›"));
}

// ---------------------------------------------------------------- fleet
function timeline(points, now) {
  const bar = el("span", { class: "timeline", title: "connectivity seen by this console, last 24 h" });
  const start = now - 86400;
  let prev = start, state = null;
  const parts = [];
  for (const [t, up] of points || []) {
    if (t > prev) parts.push([prev, Math.min(t, now), state]);
    prev = Math.max(prev, t); state = up;
  }
  parts.push([prev, now, state]);
  for (const [a, b, s] of parts) {
    const w = ((b - a) / 86400) * 100;
    if (w <= 0) continue;
    bar.append(el("span", { class: s === null ? "unknown" : s ? "up" : "down", style: null }));
    bar.lastChild.style.width = w + "%";
  }
  return bar;
}

async function renderFleet() {
  const { query } = params();
  const selector = query.get("selector") || "";
  const offset = Number(query.get("offset") || 0);
  const url = `/api/sites?limit=${PAGE}&offset=${offset}&selector=${encodeURIComponent(selector)}`;
  const data = await getJSON(url);
  const input = el("input", { id: "selector", value: selector, placeholder: "label selector, e.g. region=eu", size: 32 });
  const form = el("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); setQuery("/fleet", { selector: input.value }); } },
    el("label", {}, "Labels ", input), el("button", { type: "submit" }, "Filter"));
  const rows = data.items.map((s) => el("tr", { class: s.connected ? "" : "dark", "data-site": s.name },
    el("td", {}, s.name),
    el("td", { class: "connected " + (s.connected ? "conn-yes" : "conn-no") }, s.connected ? "● connected" : "✖ dark"),
    el("td", {}, s.lastSeen ? duration(s.lastSeenAgoSeconds) + " ago" : "never"),
    el("td", {}, s.connected ? "" : duration(s.offlineForSeconds)),
    el("td", { class: "num" }, s.running ?? "-"),
    el("td", { class: "num" }, s.outboxDepth ?? "-"),
    el("td", {}, s.agentVersion || "-"),
    el("td", {}, Object.entries(s.labels).map(([k, v]) => k + "=" + v).join(", ")),
    el("td", {}, timeline(s.timeline, data.now))));
  show(el("h1", {}, "Fleet"),
    el("p", { id: "fleet-summary" }, `${data.total} sites · `, el("span", { class: data.dark ? "conn-no" : "" }, `${data.dark} dark`)),
    ...cacheNotes(data.status), form,
    el("table", { id: "sites" },
      el("thead", {}, el("tr", {}, ...["Site", "Connectivity", "Last seen", "Offline for", "Running", "Backlog", "Version", "Labels", "24 h"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...rows)),
    pager(data.total, offset, (o) => setQuery("/fleet", { selector, offset: String(o) })));
}

// ------------------------------------------------------------ workflows
function select(id, label, options, value) {
  return el("label", {}, label + " ",
    el("select", { id }, el("option", { value: "" }, "all"),
      ...options.map((o) => el("option", { value: o, selected: o === value }, o))));
}

async function renderWorkflows() {
  const { query } = params();
  const f = { namespace: query.get("namespace") || "", site: query.get("site") || "", phase: query.get("phase") || "" };
  const offset = Number(query.get("offset") || 0);
  const q = new URLSearchParams({ ...f, offset: String(offset), limit: String(PAGE) });
  const data = await getJSON("/api/workflows?" + q);
  const form = el("form", { class: "filters", onchange: () => setQuery("/workflows", {
      namespace: document.getElementById("f-namespace").value, site: document.getElementById("f-site").value,
      phase: document.getElementById("f-phase").value }) },
    select("f-namespace", "Namespace", data.facets.namespaces, f.namespace),
    select("f-site", "Site", data.facets.sites, f.site),
    select("f-phase", "Phase", data.facets.phases.map((p) => p[0].toUpperCase() + p.slice(1)), f.phase));
  const rows = data.items.map((w) => el("tr", { "data-workflow": w.namespace + "/" + w.name },
    el("td", {}, w.namespace),
    el("td", {}, el("a", { href: `#/wf/${encodeURIComponent(w.namespace)}/${encodeURIComponent(w.name)}` }, w.name)),
    el("td", {}, phasePill(w.phase)),
    el("td", {}, w.site || "-", w.siteConnected === false ? el("span", { class: "conn-no" }, " · dark") : null),
    el("td", { class: "num" }, w.progress),
    el("td", { class: "num" }, duration(w.durationSeconds)),
    el("td", {}, w.message || "")));
  show(el("h1", {}, "Workflows"), ...cacheNotes(data.status), form,
    el("table", { id: "workflows" },
      el("thead", {}, el("tr", {}, ...["Namespace", "Name", "Phase", "Site", "Progress", "Duration", "Message"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...rows)),
    pager(data.total, offset, (o) => setQuery("/workflows", { ...f, offset: String(o) })));
}

async function renderCrons() {
  const { query } = params();
  const offset = Number(query.get("offset") || 0);
  const data = await getJSON(`/api/cronworkflows?offset=${offset}&limit=${PAGE}&namespace=${encodeURIComponent(query.get("namespace") || "")}`);
  const rows = data.items.map((c) => el("tr", {},
    el("td", {}, c.namespace), el("td", {}, c.name), el("td", {}, c.schedule + (c.timezone ? " (" + c.timezone + ")" : "")),
    el("td", { class: "num" }, c.siteCount), el("td", { class: "num" }, c.active),
    el("td", {}, c.lastScheduleTime || "never"), el("td", {}, c.suspend ? "suspended" : ""),
    el("td", {}, el("a", { href: `#/workflows?namespace=${encodeURIComponent(c.namespace)}` }, "runs"))));
  show(el("h1", {}, "CronWorkflows"),
    el("table", { id: "crons" },
      el("thead", {}, el("tr", {}, ...["Namespace", "Name", "Schedule", "Sites", "Active", "Last scheduled", "", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...rows)),
    pager(data.total, offset, (o) => setQuery("/crons", { offset: String(o) })));
}

// ------------------------------------------------------------- one run
const NODE_W = 160, NODE_H = 40, GAP_X = 60, GAP_Y = 18, PAD = 16;

function layout(tasks) {
  // Columns by depth (the server's DAG order), rows in order within a column.
  const pos = {}, perColumn = {};
  for (const t of tasks) {
    const row = perColumn[t.depth] = (perColumn[t.depth] ?? -1) + 1;
    pos[t.name] = { x: PAD + t.depth * (NODE_W + GAP_X), y: PAD + row * (NODE_H + GAP_Y) };
  }
  const cols = Object.keys(perColumn).length, rows = Math.max(0, ...Object.values(perColumn)) + 1;
  return { pos, width: PAD * 2 + cols * NODE_W + (cols - 1) * GAP_X, height: PAD * 2 + rows * NODE_H + (rows - 1) * GAP_Y };
}

function dag(tasks, id, onPick) {
  const { pos, width, height } = layout(tasks);
  const root = svg("svg", { class: "dag", id, width: Math.max(width, 200), height: Math.max(height, 60),
    viewBox: `0 0 ${Math.max(width, 200)} ${Math.max(height, 60)}`, role: "img" });
  for (const t of tasks) {
    for (const d of t.dependsOn) {
      const a = pos[d], b = pos[t.name];
      if (!a || !b) continue;
      const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x, y2 = b.y + NODE_H / 2, mx = (x1 + x2) / 2;
      root.append(svg("path", { class: "edge", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`,
        "data-from": d, "data-to": t.name }));
    }
  }
  for (const t of tasks) {
    const p = pos[t.name];
    const g = svg("g", { class: "node" + (t.name === selectedTask ? " selected" : ""), "data-task": t.name,
      "data-phase": t.phase, transform: `translate(${p.x},${p.y})` });
    g.append(svg("rect", { class: "fill-" + t.phase, width: NODE_W, height: NODE_H, rx: 6 }));
    const label = (SYMBOLS[t.phase] || "?") + " " + (t.name.length > 20 ? t.name.slice(0, 19) + "…" : t.name);
    g.append(svg("text", { x: 8, y: 16 }, label));
    g.append(svg("text", { x: 8, y: 32, class: "muted" },
      t.phase + (t.attempt > 1 ? ` · ${t.attempt} attempts` : "") + (t.durationSeconds !== null ? " · " + duration(t.durationSeconds) : "")));
    g.append(svg("title", {}, t.name + ": " + t.phase + (t.message ? " — " + t.message : "")));
    g.addEventListener("click", () => onPick(t.name));
    root.append(g);
  }
  return root;
}

function taskPanel(detail, name) {
  const t = [...detail.tasks, ...detail.onFailure].find((x) => x.name === name);
  if (!t) return el("p", { class: "muted" }, "Click a task to see its attempts, message and log tail.");
  const logs = detail.logs[name];
  const facts = [["Phase", phasePill(t.phase)], ["Attempts", String(t.attempt) + (t.interruptions ? ` (${t.interruptions} interrupted)` : "")],
    ["Started", t.startedAt || "-"], ["Finished", t.finishedAt || "-"], ["Duration", duration(t.durationSeconds)],
    ["Exit code", t.exitCode ?? "-"], ["Depends on", t.dependsOn.join(", ") || "-"], ["Message", el("span", { id: "task-message" }, t.message || "")]];
  for (const [k, v] of Object.entries(t.outputs || {})) facts.push(["output " + k, v]);
  const logNodes = logs && Object.keys(logs).length
    ? Object.entries(logs).map(([stream, text]) => el("div", {}, el("h3", {}, stream), el("pre", { class: "log" }, text)))
    : [el("p", { class: "muted", id: "no-logs" }, t.phase === "Pending" || t.phase === "Unknown"
        ? "No log tail: the site has not synced this task yet."
        : "No log tail in the cloud for this task (on the site: tideflow-agent logs).")];
  return el("section", { id: "task-panel" }, el("h2", {}, "Task ", el("span", { id: "task-name" }, t.name)),
    el("dl", { class: "summary" }, ...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])), ...logNodes);
}

async function renderWorkflow(ns, name) {
  let detail;
  try {
    detail = await getJSON(`/api/workflows/${encodeURIComponent(ns)}/${encodeURIComponent(name)}`);
  } catch (e) {
    show(el("h1", {}, ns + "/" + name), el("p", { class: "error", id: "error" }, String(e.message)));
    return;
  }
  const pick = (task) => { selectedTask = task; renderWorkflow(ns, name); };
  const site = detail.site
    ? el("span", { id: "site-state", class: detail.siteConnected ? "conn-yes" : detail.siteConnected === false ? "conn-no" : "" },
        detail.site + (detail.siteConnected ? " · connected" : detail.siteConnected === false
          ? " · dark" + (detail.siteOfflineForSeconds !== null ? " for " + duration(detail.siteOfflineForSeconds) : "") : ""))
    : "not placed yet";
  const trace = detail.traceId
    ? (detail.traceUrl ? el("a", { id: "trace-link", href: detail.traceUrl, target: "_blank", rel: "noopener noreferrer" }, detail.traceId)
                       : el("code", {}, detail.traceId))
    : "-";
  const facts = [["Phase", el("span", { id: "run-phase" }, phasePill(detail.phase))], ["Reason", detail.reason || "-"],
    ["Message", el("span", { id: "run-message" }, detail.message || "")], ["Site", site], ["Progress", detail.progress],
    ["Duration", duration(detail.durationSeconds)], ["Trace", trace]];
  const nodes = [el("h1", {}, el("a", { href: "#/workflows?namespace=" + encodeURIComponent(ns) }, ns), " / ", el("span", { id: "run-name" }, name)),
    el("dl", { class: "summary" }, ...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    el("h2", {}, "Tasks"), dag(detail.tasks, "dag", pick)];
  if (detail.tasksTruncated) nodes.push(el("p", { class: "muted" }, "The status lists only some tasks; the others show as Unknown."));
  if (detail.onFailure.length) nodes.push(el("h2", {}, "onFailure"), dag(detail.onFailure, "dag-onfailure", pick));
  nodes.push(taskPanel(detail, selectedTask));
  show(...nodes);
}

// --------------------------------------------------------------- router
function route() {
  const { path } = params();
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", path.startsWith(a.getAttribute("href").slice(1)));
  const m = path.match(/^\/wf\/([^/]+)\/([^/]+)$/);
  if (m) {
    const ns = decodeURIComponent(m[1]), name = decodeURIComponent(m[2]);
    if (!current || current.key !== ns + "/" + name) selectedTask = null;
    current = { kinds: new Set(["workflows", "edgesites"]), key: ns + "/" + name, render: () => renderWorkflow(ns, name) };
  } else if (path.startsWith("/workflows")) {
    current = { kinds: new Set(["workflows", "edgesites"]), key: null, render: renderWorkflows };
  } else if (path.startsWith("/crons")) {
    current = { kinds: new Set(["cronworkflows"]), key: null, render: renderCrons };
  } else {
    current = { kinds: new Set(["edgesites"]), key: null, render: renderFleet };
  }
  refresh();
}

async function refresh() {
  const page = current;
  try {
    await page.render();
    document.body.dataset.rendered = String(Date.now());
  } catch (e) {
    show(el("p", { class: "error", id: "error" }, "Could not load: " + e.message));
  }
}

function concerns(change) {
  const [kind, key] = change;
  if (!current || !current.kinds.has(kind)) return false;
  if (current.key && kind === "workflows") return key === "*" || key === current.key;
  return true;
}

function connect() {
  const live = document.getElementById("live");
  const events = new EventSource("/api/events");
  events.addEventListener("hello", () => { live.textContent = "● live"; live.classList.add("on"); });
  events.onerror = () => { live.textContent = "○ reconnecting"; live.classList.remove("on"); };
  // Give the connection back when the page goes away: a browser holds at most six
  // HTTP/1.1 connections per server, and a stream left open would hold one of them.
  window.addEventListener("pagehide", () => events.close());
  events.onmessage = (msg) => {
    const { changes } = JSON.parse(msg.data);
    if (!changes.some(concerns)) return;
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refresh, 150);  // one refetch per burst
  };
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => { route(); connect(); });
