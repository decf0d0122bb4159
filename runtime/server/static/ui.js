// kvrt live view: polls GET /ui/state once a second and redraws (runtime/server/ui_routes.py
// says why polling). Plain DOM and inline SVG; every string from the daemon goes in through
// textContent, never as markup.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
const STATE_LABEL = { generating: "running", queued: "queued", tool_call: "in tool call",
                      waiting: "waiting", idle: "idle", done: "done" };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c));
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---- runs -----------------------------------------------------------------------------------

function stateBadge(agent) {
  let text = STATE_LABEL[agent.state] || agent.state;
  if (agent.state === "tool_call" && agent.tool) text += ": " + agent.tool;
  if (agent.state === "waiting" && agent.waiting) text += ": " + agent.waiting;
  return el("span", { class: "badge state s-" + agent.state }, text);
}

function kvCell(kv, scale) {
  const width = (n) => Math.max(n ? 2 : 0, Math.round(90 * n / scale)) + "px";
  const bar = el("span", { class: "kv" });
  const own = kv.device_blocks - kv.shared_blocks;
  for (const [n, color, what] of [[own, "var(--dev)", "device"],
                                  [kv.shared_blocks, "var(--shared)", "shared"],
                                  [kv.host_blocks, "var(--host)", "host"]]) {
    const part = el("span", { title: n + " blocks " + what });
    part.style.width = width(n);
    part.style.background = color;
    bar.append(part);
  }
  const words = `device ${kv.device_blocks} · shared ${kv.shared_blocks} · host ${kv.host_blocks}`;
  return el("td", { class: "kv-cell" }, bar, " ", el("span", { class: "mute" }, words));
}

function runCard(run, graphName, tenant) {
  const scale = Math.max(1, ...run.agents.map((a) => a.kv.device_blocks + a.kv.host_blocks));
  const rows = run.agents.map((a) => el("tr", { "data-run": run.id, "data-agent": a.name },
    el("td", {}, a.on_critical_path ? el("span", { class: "crit", title: "on the critical path" },
                                         a.name + " ★") : a.name),
    el("td", {}, stateBadge(a)),
    el("td", {}, priorityBar(a.priority), a.priority.toFixed(2)),
    kvCell(a.kv, scale),
    el("td", { class: "mute" }, a.kv.decision || "")));
  const head = el("h3", {}, run.id + " ", el("span", { class: "mute" },
    `${graphName}${tenant ? " · tenant " + tenant : ""}${run.key ? " · key " + run.key : ""}` +
    (run.replicas.length ? ` · replica ${run.replicas.join(", ")}` : "") +
    ` · ${run.event_count} events · critical path left ${run.critical_path_seconds.toFixed(1)} s` +
    (run.critical_path.length ? ": " + run.critical_path.join(" → ") : "")));
  const table = el("table", {}, el("thead", {}, el("tr", {},
    ...["agent", "state", "priority", "KV blocks", "policy"].map((h) =>
      el("th", {}, h)))), el("tbody", {}, ...rows));
  return el("div", { class: "run", "data-run": run.id }, head, table);
}

function priorityBar(priority) {
  const bar = el("span", { class: "bar" });
  bar.style.width = Math.round(40 * Math.min(priority, 1)) + "px";
  return bar;
}

// ---- graphs: layered DAG, critical path in red ----------------------------------------------

function layers(graph) {
  const layer = Object.fromEntries(graph.agents.map((a) => [a.name, 0]));
  const dag = graph.edges.filter((e) => !e.in_loop);
  for (let pass = 0; pass < graph.agents.length; pass++) {  // longest path; the DAG ends it
    let moved = false;
    for (const e of dag) {
      if (layer[e.to] < layer[e.from] + 1) { layer[e.to] = layer[e.from] + 1; moved = true; }
    }
    if (!moved) break;
  }
  // A loop's member reached only from inside its loop goes after the member that leads to it.
  const fed = new Set(dag.map((e) => e.to));
  for (const e of graph.edges.filter((e) => e.in_loop && e.from !== e.to && !fed.has(e.to))) {
    layer[e.to] = Math.max(layer[e.to], layer[e.from] + 1);
    fed.add(e.to);
  }
  return layer;
}

function graphDrawing(graph) {
  const layer = layers(graph), rows = {}, pos = {};
  for (const a of graph.agents) (rows[layer[a.name]] ||= []).push(a.name);
  const W = 130, H = 34, GX = 50, GY = 16;
  const depth = Math.max(...Object.values(layer)) + 1;
  const height = Math.max(...Object.values(rows).map((r) => r.length));
  for (const [l, names] of Object.entries(rows)) {
    names.forEach((n, i) => { pos[n] = { x: 10 + l * (W + GX), y: 10 + i * (H + GY) }; });
  }
  const width = 20 + depth * W + (depth - 1) * GX, tall = 44 + height * H + (height - 1) * GY;
  const root = svg("svg", { width, height: tall, viewBox: `0 0 ${width} ${tall}`,
                            role: "img", "aria-label": "graph " + graph.name });
  const marker = svg("marker", { id: "arrow-" + graph.id, viewBox: "0 0 10 10", refX: 10, refY: 5,
                                 markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
  marker.append(svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "context-stroke" }));
  const defs = svg("defs");
  defs.append(marker);
  root.append(defs);
  const onPath = new Set(graph.critical_path);
  const pathEdges = new Set(graph.critical_path.slice(1).map((t, i) => graph.critical_path[i] + "\u0000" + t));
  for (const e of graph.edges) {
    const a = pos[e.from], b = pos[e.to], crit = pathEdges.has(e.from + "\u0000" + e.to);
    const stroke = crit ? "var(--crit)" : "#868e96", common = { fill: "none", stroke,
      "stroke-width": crit ? 2.5 : 1.2, "marker-end": `url(#arrow-${graph.id})` };
    if (e.from === e.to) {  // a self-loop: an arc above the node
      root.append(svg("path", { ...common, d: `M${a.x + W * 0.35},${a.y} C${a.x + W * 0.35},${a.y - 14} ${a.x + W * 0.65},${a.y - 14} ${a.x + W * 0.65},${a.y}` }));
    } else if (b.x > a.x) {
      root.append(svg("path", { ...common, d: `M${a.x + W},${a.y + H / 2} C${a.x + W + GX / 2},${a.y + H / 2} ${b.x - GX / 2},${b.y + H / 2} ${b.x},${b.y + H / 2}` }));
    } else {  // back (a loop) or within a layer: an arc under the two nodes
      const low = Math.max(a.y, b.y) + H + 22;
      root.append(svg("path", { ...common, d: `M${a.x + W * 0.4},${a.y + H} C${a.x + W * 0.4},${low} ${b.x + W * 0.6},${low} ${b.x + W * 0.6},${b.y + H}` }));
    }
  }
  for (const agent of graph.agents) {
    const p = pos[agent.name], crit = onPath.has(agent.name);
    const node = svg("g", { class: "node", "data-agent": agent.name });
    node.append(svg("title", {}, `${agent.name}: priority ${agent.priority.toFixed(2)}, ` +
                                  `${agent.expected_seconds.toFixed(1)} s expected`));
    node.append(svg("rect", { x: p.x, y: p.y, width: W, height: H, rx: 6,
                              fill: crit ? "#fff4e6" : "#f1f3f5",
                              stroke: crit ? "var(--crit)" : "#adb5bd", "stroke-width": crit ? 2 : 1 }));
    node.append(svg("text", { x: p.x + 8, y: p.y + 15 }, agent.name.slice(0, 18)));
    node.append(svg("text", { x: p.x + 8, y: p.y + 28, fill: "#6b7280" },
                    `${agent.expected_seconds.toFixed(1)} s · p ${agent.priority.toFixed(2)}`));
    root.append(node);
  }
  return root;
}

function graphCard(graph) {
  return el("div", { class: "graph", "data-graph": graph.id },
    el("h3", {}, graph.name + " ", el("span", { class: "mute" },
      `${graph.id} · ${graph.live_runs} live runs · critical path ` +
      `${graph.critical_path_seconds.toFixed(1)} s: ${graph.critical_path.join(" → ")}`)),
    graphDrawing(graph));
}

// ---- the KV pool over time ------------------------------------------------------------------

function drawPool(pool) {
  const chart = $("pool");
  chart.replaceChildren();
  if (!pool) {
    $("pool-section").hidden = true;
    return;
  }
  $("pool-section").hidden = false;
  // Each tier as a share of its own capacity: the host tier is often many times the device's.
  const W = 480, H = 200, top = Math.max(pool.total_blocks, 1);
  const hostScale = pool.host_blocks ? top / pool.host_blocks : 0;
  const samples = pool.samples;
  // Seconds shown: what has been sampled, from 30 s up to the 5 minutes kept.
  const span = Math.min(300, Math.max(30, samples.length ? pool.now - samples[0][0] : 0));
  $("pool-total").textContent = `${pool.total_blocks} device blocks` +
    (pool.host_blocks ? ` · ${pool.host_blocks} host blocks` : "");
  const x = (t) => W - (pool.now - t) / span * W, y = (n) => H - 4 - n / top * (H - 8);
  for (const share of [0.5, 1]) {
    chart.append(svg("line", { x1: 0, x2: W, y1: y(top * share), y2: y(top * share),
                               stroke: "#ced4da", "stroke-dasharray": "4 3" }));
    chart.append(svg("text", { x: 4, y: y(top * share) + 12, fill: "#868e96" },
                     `${share * 100}%`));
  }
  const area = (pick, fill) => {
    if (!samples.length) return;
    const pts = samples.map((s) => `${x(s[0]).toFixed(1)},${y(pick(s)).toFixed(1)}`);
    const d = `M${x(samples[0][0]).toFixed(1)},${y(0)} L${pts.join(" L")} L${x(samples.at(-1)[0]).toFixed(1)},${y(0)} Z`;
    chart.append(svg("path", { d, fill, stroke: "none" }));
  };
  // [t, in_use, pinned, cached, host]: cached stacked over in use; pinned is part of in use.
  area((s) => s[1] + s[3], "#a5d8ff");
  area((s) => s[1], "var(--dev)");
  area((s) => s[2], "var(--pin)");
  if (pool.host_blocks) {
    const pts = samples.map((s) => `${x(s[0]).toFixed(1)},${y(s[4] * hostScale).toFixed(1)}`).join(" ");
    chart.append(svg("polyline", { points: pts, fill: "none", stroke: "var(--host)",
                                   "stroke-width": 2 }));
  }
  const last = samples.at(-1);
  $("pool-note").textContent = last ? `now: ${last[1]} in use (${last[2]} pinned), ${last[3]} ` +
    `cached, ${last[4]} on the host · the last ${Math.round(span)} s, sampled each second` : "";
}

// ---- decisions ------------------------------------------------------------------------------

function drawDecisions(decisions) {
  $("decisions").replaceChildren(...decisions.map((d) => el("tr", {},
    el("td", { class: "mute" }, d.age_s < 60 ? d.age_s.toFixed(1) + " s" : Math.round(d.age_s / 60) + " min"),
    el("td", {}, d.kind), el("td", d.run ? { title: d.run } : {}, d.agent || "—"),
    el("td", { class: "mute" }, d.cause), el("td", { class: "mute" }, d.detail))));
  if (!decisions.length) {
    $("decisions").append(el("tr", {}, el("td", { colspan: 5, class: "mute" }, "None yet.")));
  }
}

// ---- polling --------------------------------------------------------------------------------

function render(state) {
  $("model").textContent = state.model;
  $("view").textContent = state.view === "operator" ? "operator's view (every tenant)"
                                                    : "tenant " + state.tenant;
  const names = Object.fromEntries(state.graphs.map((g) => [g.id, g.name]));
  $("runs").replaceChildren(...(state.runs.length ? state.runs.map((r) =>
    runCard(r, names[r.graph_id] || r.graph_id, state.run_tenants[r.id])) :
    [el("p", { class: "mute" }, "No live run.")]));
  $("runs-more").textContent = state.more_runs ? `(and ${state.more_runs} older)` : "";
  $("graphs").replaceChildren(...(state.graphs.length ? state.graphs.map(graphCard) :
    [el("p", { class: "mute" }, "No graph declared.")]));
  $("graphs-more").textContent = state.more_graphs ? `(and ${state.more_graphs} older)` : "";
  drawPool(state.pool);
  drawDecisions(state.decisions);
}

async function poll() {
  const key = sessionStorage.getItem("kvrt-key");
  let reply;
  try {
    reply = await fetch("/ui/state", { cache: "no-store",
      headers: key ? { Authorization: "Bearer " + key } : {} });
  } catch (error) {
    setStatus("the daemon is not answering", true);
  }
  try {
    if (!reply) {
      // nothing to draw: the status says why
    } else if (reply.status === 401) {
      $("key-section").hidden = false;
      setStatus("needs an API key", true);
    } else if (!reply.ok) {
      setStatus(`/ui/state answered ${reply.status}`, true);
    } else {
      $("key-section").hidden = true;
      render(await reply.json());
      setStatus("updated " + new Date().toLocaleTimeString(), false);
    }
  } finally {
    setTimeout(poll, POLL_MS);  // a drawing error shows in the console, and the next poll comes
  }
}

function setStatus(text, bad) {
  $("status").textContent = text;
  $("status").className = bad ? "meta bad" : "meta";
  document.body.dataset.updated = String(Date.now());
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("kvrt-key", $("key").value.trim());
  $("key").value = "";
});

poll();
