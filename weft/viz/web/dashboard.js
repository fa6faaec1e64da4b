// weft viz dashboard: reads /api/graph, /api/stat and /api/traces and draws them, and
// listens to /api/tap (server-sent events: the agents' tap, relayed by the server).
// The figures are computed by the server (weft.viz.board); this only formats and draws.
// Every value from the API goes into the page as text (textContent), never as markup.
"use strict";

const $ = (sel) => document.querySelector(sel);
let intervalMs = 2000;
let cy = null;
let shape = "";  // the node and edge ids last laid out: a new layout only when they change

function pct(v) { return v === null || v === undefined ? "-" : (100 * v).toFixed(2) + "%"; }
function rps(v) { return v === null || v === undefined ? "-" : v.toFixed(1) + "rps"; }
function ms(v) {
  if (v === null || v === undefined) return "-";
  return v < 10 ? v.toFixed(1) + "ms" : v.toFixed(0) + "ms";
}
function successClass(v) {
  if (v === null || v === undefined) return "";
  return v >= 0.99 ? "ok" : v >= 0.9 ? "warn" : "bad";
}
function successColour(v) {
  if (v === null || v === undefined) return "#cbd5e1";
  return v >= 0.99 ? "#86efac" : v >= 0.9 ? "#fde68a" : "#fca5a5";
}
const SECURED = { yes: "mTLS", no: "plaintext", partly: "partly mTLS", "-": "-" };

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(path + " answered " + response.status);
  return response.json();
}

function banner(messages) {
  const el = $("#banner");
  const shown = messages.filter((m) => m);
  el.hidden = shown.length === 0;
  el.textContent = shown.join(" · ");
}

// -- the service graph ------------------------------------------------------------------------

function edgeLabel(e) {
  if (!e.active) return "idle";
  const parts = [];
  if (e.rps !== null) parts.push(rps(e.rps));
  if (e.success_rate !== null) parts.push(pct(e.success_rate));
  if (e.latency_ms_p99 !== null) parts.push("p99 " + ms(e.latency_ms_p99));
  if (parts.length === 0 && e.tcp_connections) parts.push(e.tcp_connections + " TCP");
  return parts.join(" · ");
}

function nodeLabel(n, multiNs) {
  const name = multiNs && n.namespace !== "default" ? n.namespace + "/" + n.name : n.name;
  const sr = n.success_rate === null ? "" : "\n" + pct(n.success_rate);
  return name + sr;
}

function drawGraph(doc) {
  const el = $("#graph");
  const namespaces = new Set(doc.nodes.map((n) => n.namespace));
  const multiNs = namespaces.size > 1;
  const elements = [];
  for (const n of doc.nodes) {
    elements.push({
      group: "nodes",
      data: { id: n.id, label: nodeLabel(n, multiNs), colour: successColour(n.success_rate) },
      classes: n.captured ? "meshed" : "unmeshed",
    });
  }
  for (const e of doc.edges) {
    const cls = !e.active ? "idle" : e.secured === "yes" ? "mtls" : e.secured === "partly" ? "partly" : "plaintext";
    elements.push({
      group: "edges",
      data: { id: e.id, source: e.source, target: e.target, label: edgeLabel(e) },
      classes: cls + (e.secured === "yes" ? " secured" : ""),
    });
  }
  const ids = elements.map((x) => x.data.id).sort().join(" ");
  if (cy === null) {
    cy = cytoscape({
      container: el,
      wheelSensitivity: 0.3,
      style: [
        { selector: "node", style: {
          "label": "data(label)", "text-wrap": "wrap", "text-valign": "center",
          "font-size": 12, "width": 92, "height": 44, "shape": "round-rectangle",
          "background-color": "data(colour)", "border-width": 2, "border-color": "#475569" } },
        { selector: "node.unmeshed", style: { "border-style": "dashed", "border-color": "#94a3b8" } },
        { selector: "edge", style: {
          "curve-style": "bezier", "target-arrow-shape": "triangle", "width": 4, "arrow-scale": 1.3,
          "label": "data(label)", "font-size": 11, "text-background-color": "#fff",
          "text-background-opacity": 0.85, "text-background-padding": 2, "text-margin-y": -12 } },
        { selector: "edge.mtls", style: { "line-color": "#15803d", "target-arrow-color": "#15803d" } },
        { selector: "edge.plaintext", style: { "line-color": "#d97706", "target-arrow-color": "#d97706", "line-style": "dashed" } },
        { selector: "edge.partly", style: { "line-color": "#b45309", "target-arrow-color": "#b45309", "line-style": "dotted" } },
        { selector: "edge.idle", style: { "line-color": "#9ca3af", "target-arrow-color": "#9ca3af", "width": 2 } },
        { selector: "node.tapped", style: { "border-width": 4, "border-color": "#2563eb" } },
      ],
      elements: [],
    });
    // Clicking a workload taps it; clicking the background taps every workload again.
    cy.on("tap", "node", (evt) => tapConnect(evt.target.id()));
    cy.on("tap", (evt) => { if (evt.target === cy && tapWorkload) tapConnect(""); });
  }
  if (ids !== shape) {
    cy.elements().remove();
    cy.add(elements);
    const roots = cy.nodes().filter((n) => n.indegree(false) === 0 && n.outdegree(false) > 0);
    // Callers on the left, the workloads they call to the right: labels read along edges.
    cy.layout({ name: "breadthfirst", directed: true, roots: roots.length ? roots : undefined,
                padding: 40, spacingFactor: 1.1, animate: false,
                transform: (node, pos) => ({ x: pos.y * 3, y: pos.x * 0.6 }) }).run();
    cy.fit(undefined, 40);
    if (cy.zoom() > 1.6) { cy.zoom(1.6); cy.center(); }
    shape = ids;
  } else {
    for (const x of elements) {
      const have = cy.getElementById(x.data.id);
      have.data(x.data);
      have.classes(x.classes);
    }
  }
  if (tapWorkload) cy.getElementById(tapWorkload).addClass("tapped");  // classes() reset it
  // What the graph drew, as the DOM can tell it (a canvas cannot): the browser test, and
  // anything that reads the page without eyes, see the same nodes and edges.
  el.dataset.nodes = cy.nodes().map((n) => n.id()).sort().join(" ");
  el.dataset.edges = cy.edges().map((e) => e.id() + (e.hasClass("secured") ? "|mtls" : "|" + (e.classes()[0] || ""))).sort().join(" ");
  el.dataset.rendered = "true";
  el.setAttribute("aria-label", "service graph: " + doc.nodes.length + " workloads, " + doc.edges.length + " edges");
}

function drawEdges(doc) {
  const body = $("#edges tbody");
  body.replaceChildren();
  for (const e of doc.edges) {
    const tr = document.createElement("tr");
    tr.dataset.edge = e.id;
    tr.dataset.secured = e.secured;
    cell(tr, e.source);
    cell(tr, e.target);
    cell(tr, (e.secured === "yes" ? "√ " : "") + SECURED[e.secured], e.secured === "yes" ? "mtls" : "plaintext");
    cell(tr, rps(e.rps), "num");
    cell(tr, pct(e.success_rate), "num " + successClass(e.success_rate)).dataset.success = e.success_rate ?? "";
    cell(tr, ms(e.latency_ms_p50), "num");
    cell(tr, ms(e.latency_ms_p99), "num");
    const ids = cell(tr, [e.client_id.join(","), e.server_id.join(",")].filter((x) => x).join(" → ") || "-", "ids");
    ids.title = ids.textContent;
    body.appendChild(tr);
  }
  if (doc.edges.length === 0) {
    const tr = document.createElement("tr");
    cell(tr, "no traffic between workloads seen yet").colSpan = 8;
    body.appendChild(tr);
  }
}

// -- golden metrics ---------------------------------------------------------------------------

function sparkline(trend) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const w = 90, h = 18;
  svg.setAttribute("width", w); svg.setAttribute("height", h); svg.setAttribute("class", "spark");
  const values = trend.map((p) => p.rps ?? 0);
  if (values.length > 1) {
    const top = Math.max(...values, 0.001);
    const pts = values.map((v, i) => (i * (w - 2) / (values.length - 1) + 1).toFixed(1) + "," + (h - 1 - v / top * (h - 2)).toFixed(1));
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", pts.join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", "#2563eb"); line.setAttribute("stroke-width", "1.5");
    svg.appendChild(line);
  }
  return svg;
}

function drawStat(doc) {
  const body = $("#stat tbody");
  body.replaceChildren();
  for (const r of doc.rows) {
    const tr = document.createElement("tr");
    tr.dataset.workload = r.namespace + "/" + r.name;
    cell(tr, r.namespace);
    cell(tr, r.name + (r.missing_agents.length ? " (agent of " + r.missing_agents.join(", ") + " unreachable)" : ""));
    cell(tr, r.meshed ?? "-");
    const sr = cell(tr, pct(r.success_rate), "num success " + successClass(r.success_rate));
    sr.dataset.success = r.success_rate ?? "";
    cell(tr, rps(r.rps), "num");
    cell(tr, ms(r.latency_ms_p50), "num");
    cell(tr, ms(r.latency_ms_p95), "num");
    cell(tr, ms(r.latency_ms_p99), "num");
    cell(tr, String(r.tcp_connections), "num");
    cell(tr, "").appendChild(sparkline(r.trend || []));
    body.appendChild(tr);
  }
}

// -- traces -----------------------------------------------------------------------------------

function drawTraces(doc) {
  const body = $("#traces tbody");
  body.replaceChildren();
  $("#traces-where").textContent = doc.enabled ? "from " + doc.receiver + " (" + doc.how + ")" : "";
  $("#traces-note").textContent = doc.enabled ? (doc.error || (doc.traces.length ? "" : "no traces received yet")) : doc.note;
  $("#traces").hidden = !doc.enabled || doc.traces.length === 0;
  for (const t of doc.traces) {
    const tr = document.createElement("tr");
    tr.dataset.trace = t.trace_id;
    cell(tr, t.trace_id.slice(0, 12) + "…").title = t.trace_id;
    cell(tr, t.root);
    const hops = (t.hops || []).map((h) =>
      h.name + " " + (h.src || "?") + "→" + (h.dst || "?") + (h.node ? " @" + h.node : "") +
      (h.status !== "" ? " " + h.status : "") + " " + ms(h.duration_ms));
    cell(tr, hops.join(" · ") || "-", "hops");
    cell(tr, String(t.spans), "num");
    cell(tr, ms(t.duration_ms), "num");
    cell(tr, new Date(t.start_unix_ns / 1e6).toLocaleTimeString());
    body.appendChild(tr);
  }
}

// -- the live tap -----------------------------------------------------------------------------

const TAP_ROWS = 200;  // rows kept: the oldest go as new ones come, whatever the traffic
let tap = null;        // the EventSource
let tapWorkload = "";  // "NS/NAME", or "" for every workload
let tapPaused = false;
let tapCounts = { received: 0, skipped: 0 };
let tapLast = null;    // the server's last status message

function tapStatusClass(r) {
  if (r.error || r.status_code === null || r.status_code >= 500) return "bad";
  return r.status_code >= 400 ? "warn" : "ok";
}

function tapMatches(tr) {
  const q = $("#tap-filter").value.trim().toLowerCase();
  return q === "" || tr.dataset.text.includes(q);
}

function addTapRow(r) {
  const body = $("#tap tbody");
  const tr = document.createElement("tr");
  tr.className = "tap-row";
  tr.dataset.direction = r.direction;
  tr.dataset.status = r.status_code === null ? "" : String(r.status_code);
  tr.dataset.src = r.src;
  tr.dataset.dst = r.dst;
  tr.dataset.clientId = r.client_id;
  tr.dataset.serverId = r.server_id;
  tr.dataset.text = [r.direction, r.node, r.method, r.authority, r.path, r.status, r.latency,
    r.src, r.dst, r.client_id, r.server_id, r.route].join(" ").toLowerCase();
  cell(tr, r.time ? new Date(r.time * 1000).toLocaleTimeString() : "-");
  cell(tr, r.direction, "dir");
  cell(tr, r.node);
  cell(tr, r.method);
  cell(tr, r.authority);
  cell(tr, r.path, "path").title = r.path;
  cell(tr, r.status, "status " + tapStatusClass(r));
  cell(tr, r.latency, "num");
  cell(tr, r.src);
  cell(tr, r.dst);
  const ids = cell(tr, r.client_id + " → " + r.server_id + (r.tls ? "" : " (plaintext)"), "ids");
  ids.title = ids.textContent;
  tr.hidden = !tapMatches(tr);
  body.prepend(tr);
  while (body.rows.length > TAP_ROWS) body.lastElementChild.remove();
}

function drawTapStatus() {
  const parts = [];
  const s = tapLast;
  if (s) {
    parts.push("tapping " + (s.workload || "every workload") + " on " + s.tapping + " of " +
      s.agents.length + " agents");
    for (const [agent, why] of Object.entries(s.ended)) parts.push(agent + ": " + why);
    const byAgents = Object.values(s.agent_dropped).reduce((a, b) => a + b, 0);
    if (s.dropped || byAgents) {
      parts.push("dropped " + s.dropped + " here, " + byAgents + " by the agents (the page is slower than the traffic: tap one workload)");
    }
  }
  parts.push(tapCounts.received + " requests");
  const rows = $("#tap tbody").rows;
  const shown = Array.from(rows).filter((tr) => !tr.hidden).length;
  parts.push("showing " + shown + " of the last " + rows.length);
  if (tapPaused) parts.push("paused: " + tapCounts.skipped + " not shown");
  $("#tap-status").textContent = parts.join(" · ");
  $("#tap-panel").dataset.requests = String(tapCounts.received);
}

function tapStopped(message) {
  if (tap) tap.close();
  tap = null;
  $("#tap-status").textContent = message;
  $("#tap-panel").dataset.state = "stopped";
}

function tapConnect(workload) {
  if (tap) tap.close();
  tapWorkload = workload;
  tapCounts = { received: 0, skipped: 0 };
  tapLast = null;
  $("#tap tbody").replaceChildren();
  const select = $("#tap-workload");
  if (workload && !Array.from(select.options).some((o) => o.value === workload)) {
    select.add(new Option(workload, workload));
  }
  select.value = workload;
  if (cy) {
    cy.nodes().removeClass("tapped");
    if (workload) cy.getElementById(workload).addClass("tapped");
  }
  const panel = $("#tap-panel");
  panel.dataset.workload = workload;
  panel.dataset.state = "connecting";
  $("#tap-status").textContent = "connecting…";
  const es = new EventSource("/api/tap" + (workload ? "?workload=" + encodeURIComponent(workload) : ""));
  tap = es;
  es.addEventListener("open", () => { panel.dataset.state = "open"; });
  es.addEventListener("status", (m) => { tapLast = JSON.parse(m.data); drawTapStatus(); });
  es.addEventListener("request", (m) => {
    tapCounts.received += 1;
    if (tapPaused) tapCounts.skipped += 1;
    else addTapRow(JSON.parse(m.data));
    drawTapStatus();
  });
  for (const kind of ["unavailable", "refused"]) {
    es.addEventListener(kind, (m) => tapStopped(JSON.parse(m.data).message));
  }
  es.addEventListener("error", () => {
    if (tap !== es) return;
    panel.dataset.state = es.readyState === EventSource.CLOSED ? "closed" : "reconnecting";
    $("#tap-status").textContent = es.readyState === EventSource.CLOSED
      ? "the tap stream closed: reload the page"
      : "the tap stream broke: reconnecting…";
  });
}

function tapWorkloads(doc) {
  const select = $("#tap-workload");
  const have = new Set(Array.from(select.options).map((o) => o.value));
  for (const n of doc.nodes) {
    if (!have.has(n.id)) select.add(new Option(n.id, n.id));
  }
}

// -- polling ----------------------------------------------------------------------------------

async function refresh() {
  try {
    const kind = $("#kind").value;
    const [graph, stat] = await Promise.all([getJSON("/api/graph"), getJSON("/api/stat?kind=" + kind)]);
    intervalMs = Math.max(500, (graph.interval_seconds || 2) * 1000);
    $("#source").textContent = graph.source;
    $("#updated").textContent = "updated " + new Date(graph.updated_unix * 1000).toLocaleTimeString() +
      " · poll " + graph.polls;
    $("#graph-window").textContent = graph.window_seconds === null ? "(warming up)" :
      "(last " + graph.window_seconds.toFixed(0) + " s)";
    const down = (graph.unreachable || []).map((u) => "could not read the agent of " + u.source + " (" + u.where + "): " + u.reason);
    banner([graph.error, ...down]);
    if (graph.nodes) { drawGraph(graph); drawEdges(graph); tapWorkloads(graph); }
    if (stat.rows) drawStat(stat);
  } catch (err) {
    banner(["the dashboard's server cannot be reached: " + err.message]);
  }
}

async function refreshTraces() {
  try {
    drawTraces(await getJSON("/api/traces"));
  } catch (err) {
    $("#traces-note").textContent = "traces cannot be read: " + err.message;
  }
}

async function loop() {
  await refresh();
  setTimeout(loop, intervalMs);
}

async function tracesLoop() {
  await refreshTraces();
  setTimeout(tracesLoop, 5000);
}

$("#kind").addEventListener("change", refresh);
$("#tap-workload").addEventListener("change", (e) => tapConnect(e.target.value));
$("#tap-filter").addEventListener("input", () => {
  for (const tr of $("#tap tbody").rows) tr.hidden = !tapMatches(tr);
  drawTapStatus();
});
$("#tap-pause").addEventListener("click", (e) => {
  tapPaused = !tapPaused;
  tapCounts.skipped = 0;
  e.target.textContent = tapPaused ? "resume" : "pause";
  e.target.setAttribute("aria-pressed", String(tapPaused));
  drawTapStatus();
});
loop();
tracesLoop();
// ?tap=NS/NAME opens the page tapping that workload (a link to it, and the browser test).
tapConnect(new URLSearchParams(window.location.search).get("tap") || "");
