// The cluster view: nodes in ring order, their devices and memory, the layers each holds,
// and which node is working right now. Input is `GET /v1/topology`:
//   {node_id, nodes: {id: {node_id, address, capabilities: {model, chip, memory, available_memory,
//    gpu, gpu_memory, flops}}}, edges: [[a, b]], partitions: {model: [{node_id, address,
//    start_layer, end_layer}]}, left_out: {model: {id: why}}, active_node_ids: [id]}
// Every string from the cluster goes into the DOM as text, never as HTML.

const PALETTE = ["#ffd43b", "#4dabf7", "#69db7c", "#f783ac", "#b197fc", "#ffa94d", "#63e6be", "#ff8787"];
const SVG_NS = "http://www.w3.org/2000/svg";

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

function svg(tag, attrs = {}) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

/** Bytes -> "12.3 GiB" / "512 MiB". */
export function formatBytes(n) {
  if (!Number.isFinite(n) || n <= 0) return "unknown";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

function shortId(id) {
  return id.length > 14 ? `${id.slice(0, 8)}…` : id;
}

/** Node ids in ring order (from the first partition list), then any node not in a ring. */
function orderedNodeIds(topo) {
  const ids = [];
  for (const parts of Object.values(topo.partitions || {})) {
    for (const p of parts || []) if (!ids.includes(p.node_id)) ids.push(p.node_id);
  }
  for (const id of Object.keys(topo.nodes || {}).sort()) if (!ids.includes(id)) ids.push(id);
  return ids;
}

function activeSet(topo) {
  const s = new Set(topo.active_node_ids || []);
  for (const [id, n] of Object.entries(topo.nodes || {})) if (n && n.active) s.add(id);
  return s;
}

/** Render the whole view of `topo` into `container`; `colors` maps node id -> colour (kept stable across calls). */
export function renderTopology(container, topo, colors = new Map()) {
  const ids = orderedNodeIds(topo);
  ids.forEach((id) => { if (!colors.has(id)) colors.set(id, PALETTE[colors.size % PALETTE.length]); });
  const active = activeSet(topo);
  const nodes = topo.nodes || {};
  const totalMem = ids.reduce((s, id) => s + (nodes[id]?.capabilities?.memory || 0), 0);
  const partitions = Object.entries(topo.partitions || {});

  const summary = h("p", { class: "topo-summary" },
    h("strong", { text: `${ids.length} ${ids.length === 1 ? "node" : "nodes"}` }),
    ` · ${formatBytes(totalMem)} memory · `,
    active.size ? h("span", { class: "working-text", text: `${active.size} working` }) : "idle");

  const sections = [summary, ringDiagram(ids, topo, colors, active)];
  for (const [model, parts] of partitions) sections.push(layerBar(model, parts || [], colors, active));
  const list = h("ul", { id: "topology-nodes", class: "node-list" });
  for (const id of ids) list.append(nodeCard(id, nodes[id], topo, colors.get(id), active.has(id)));
  sections.push(list);
  container.replaceChildren(...sections);
}

function ringDiagram(ids, topo, colors, active) {
  const width = 320, c = width / 2, r = ids.length > 1 ? 70 : 0;
  const height = ids.length > 1 ? 240 : 90, cy = ids.length > 1 ? 120 : 32;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "ring", role: "img",
                            "aria-label": `Ring of ${ids.length} ${ids.length === 1 ? "node" : "nodes"}` });
  const pos = new Map(ids.map((id, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(ids.length, 1);
    return [id, [c + r * Math.cos(a), cy + r * Math.sin(a), a]];
  }));
  if (ids.length > 1) {
    // arcs along the ring order: activations flow from each node to the next
    const defs = svg("defs");
    const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 8, refY: 5, markerWidth: 5, markerHeight: 5, orient: "auto" });
    marker.append(svg("path", { d: "M0 0L10 5L0 10z", class: "ring-arrow" }));
    defs.append(marker);
    root.append(defs);
    const step = (2 * Math.PI) / ids.length, gap = 26 / r;  // radians left free around each node
    ids.forEach((id, i) => {
      const a1 = -Math.PI / 2 + step * i + gap, a2 = -Math.PI / 2 + step * (i + 1) - gap;
      const [x1, y1] = [c + r * Math.cos(a1), cy + r * Math.sin(a1)];
      const [x2, y2] = [c + r * Math.cos(a2), cy + r * Math.sin(a2)];
      const large = a2 - a1 > Math.PI ? 1 : 0;
      root.append(svg("path", { d: `M${x1} ${y1}A${r} ${r} 0 ${large} 1 ${x2} ${y2}`, class: "ring-link", "marker-end": "url(#arrow)" }));
    });
  }
  for (const id of ids) {
    const [x, y, a] = pos.get(id);
    const g = svg("g", { class: `ring-node${active.has(id) ? " active" : ""}${id === topo.node_id ? " self" : ""}` });
    if (active.has(id)) g.append(svg("circle", { cx: x, cy: y, r: 22, class: "pulse", fill: colors.get(id) }));
    g.append(svg("circle", { cx: x, cy: y, r: 18, fill: colors.get(id), class: "dot" }));
    // labels outside the ring (below a lone node), so no arc crosses them
    const cos = ids.length > 1 ? Math.cos(a) : 0, sin = ids.length > 1 ? Math.sin(a) : 1;
    const anchor = cos > 0.3 ? "start" : cos < -0.3 ? "end" : "middle";
    const label = svg("text", { x: x + 30 * cos, y: y + 36 * sin + 4, "text-anchor": anchor, class: "ring-label" });
    label.textContent = shortId(id);
    const title = svg("title");
    title.textContent = id;
    g.append(label, title);
    root.append(g);
  }
  return h("div", { class: "ring-wrap" }, root);
}

function layerBar(model, parts, colors, active) {
  const total = parts.reduce((m, p) => Math.max(m, p.end_layer + 1), 0) || 1;
  const bar = h("div", { class: "layer-bar", role: "img", "aria-label": `Layers of ${model} by node` });
  for (const p of parts) {
    const n = p.end_layer - p.start_layer + 1;
    bar.append(h("div", {
      class: `segment${active.has(p.node_id) ? " active" : ""}`,
      style: `flex-grow:${n};background:${colors.get(p.node_id) || "#888"}`,
      title: `${p.node_id}: layers ${p.start_layer}–${p.end_layer}`,
    }, h("span", { text: `${p.start_layer}–${p.end_layer}` })));
  }
  return h("div", { class: "layers" },
    h("div", { class: "layers-head" }, h("span", { text: model }), h("span", { class: "muted", text: `${total} layers` })),
    bar);
}

function nodeCard(id, info, topo, color, isActive) {
  const caps = (info && info.capabilities) || {};
  const rows = [];
  const device = [caps.model, caps.chip].filter((x) => x && x !== "Unknown").join(" · ") || "unknown device";
  rows.push(["Device", device]);
  if (caps.gpu) rows.push(["GPU", caps.gpu_memory ? `${caps.gpu} (${formatBytes(caps.gpu_memory)})` : caps.gpu]);
  const mem = caps.available_memory ? `${formatBytes(caps.memory)} (${formatBytes(caps.available_memory)} free)` : formatBytes(caps.memory);
  rows.push(["Memory", mem]);
  const fp = caps.flops && (caps.flops.fp16 || caps.flops.fp32);
  if (fp) rows.push(["Compute", `${fp.toFixed(1)} TFLOPS`]);
  for (const [model, parts] of Object.entries(topo.partitions || {})) {
    const total = (parts || []).reduce((m, p) => Math.max(m, p.end_layer + 1), 0);
    const mine = (parts || []).filter((p) => p.node_id === id);
    const why = topo.left_out && topo.left_out[model] && topo.left_out[model][id];
    const text = mine.length
      ? mine.map((p) => `${p.start_layer}–${p.end_layer}`).join(", ") +
        ` (${mine.reduce((s, p) => s + p.end_layer - p.start_layer + 1, 0)} of ${total})`
      : why ? `none: ${why}` : "none";
    rows.push([Object.keys(topo.partitions).length > 1 ? `Layers (${model})` : "Layers", text]);
  }
  if (info && info.address) rows.push(["Address", info.address]);

  const badges = h("span", { class: "badges" },
    id === topo.node_id ? h("span", { class: "badge self", text: "this node" }) : null,
    h("span", { class: `badge ${isActive ? "working" : "idle"}`, text: isActive ? "working" : "idle" }));
  return h("li", { class: `node-card${isActive ? " active" : ""}`, "data-node-id": id },
    h("div", { class: "node-head" },
      h("span", { class: "swatch", style: `background:${color}`, "aria-hidden": "true" }),
      h("span", { class: "node-id", text: id, title: id }),
      badges),
    h("dl", {}, rows.map(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })])));
}
