// A small node-link drawing of a graph in SVG: a few hundred steps of a plain force layout
// (repulsion between every pair, springs along edges, a pull to the centre), no library.
import { svg, h } from "./dom.js";

const MAX_NODES = 120;

const nodeId = (n, i) => String(n.uuid ?? n.id ?? n.node_id ?? n.name ?? i);
const nodeName = (n) => String(n.name ?? n.label ?? n.uuid ?? n.id ?? "");
const edgeEnds = (e) => [
  e.source_node_uuid ?? e.source ?? e.source_id ?? e.from ?? e.src,
  e.target_node_uuid ?? e.target ?? e.target_id ?? e.to ?? e.dst,
].map((v) => (v === undefined || v === null ? null : String(v)));

/** Keep the best-connected nodes when a graph is too big to draw legibly. */
function pick(nodes, edges) {
  const ids = nodes.map(nodeId);
  const degree = new Map(ids.map((id) => [id, 0]));
  for (const e of edges) {
    for (const end of edgeEnds(e)) if (degree.has(end)) degree.set(end, degree.get(end) + 1);
  }
  let chosen = nodes.map((n, i) => ({ id: ids[i], name: nodeName(n), degree: degree.get(ids[i]) }));
  if (chosen.length > MAX_NODES) {
    chosen = chosen.sort((a, b) => b.degree - a.degree).slice(0, MAX_NODES);
  }
  const index = new Map(chosen.map((n, i) => [n.id, i]));
  const links = [];
  for (const e of edges) {
    const [s, t] = edgeEnds(e);
    if (index.has(s) && index.has(t) && s !== t) links.push([index.get(s), index.get(t)]);
  }
  return { nodes: chosen, links };
}

function layout(count, links, width, height) {
  // Deterministic start on a spiral, so the same graph always looks the same.
  const pos = Array.from({ length: count }, (_, i) => {
    const angle = i * 2.399963; // golden angle
    const r = 10 * Math.sqrt(i + 1);
    return { x: width / 2 + r * Math.cos(angle), y: height / 2 + r * Math.sin(angle), vx: 0, vy: 0 };
  });
  const k = Math.sqrt((width * height) / Math.max(count, 1)) * 0.6; // ideal edge length
  const far2 = (3 * k) ** 2; // no repulsion beyond 3k: separate components stay near each other
  const steps = count > 60 ? 200 : 300;
  for (let step = 0; step < steps; step++) {
    const cooling = 1 - step / steps;
    for (let i = 0; i < count; i++) {
      for (let j = i + 1; j < count; j++) {
        let dx = pos[i].x - pos[j].x;
        let dy = pos[i].y - pos[j].y;
        let d2 = dx * dx + dy * dy;
        if (d2 > far2) continue;
        if (d2 < 0.01) { dx = 0.1 * ((i % 3) - 1) || 0.1; dy = 0.1; d2 = dx * dx + dy * dy; }
        const f = (k * k) / d2;
        pos[i].vx += dx * f; pos[i].vy += dy * f;
        pos[j].vx -= dx * f; pos[j].vy -= dy * f;
      }
    }
    for (const [a, b] of links) {
      const dx = pos[a].x - pos[b].x;
      const dy = pos[a].y - pos[b].y;
      const d = Math.sqrt(dx * dx + dy * dy) || 0.1;
      const f = d / k;
      pos[a].vx -= dx * f; pos[a].vy -= dy * f;
      pos[b].vx += dx * f; pos[b].vy += dy * f;
    }
    const limit = (width / 12) * cooling + 0.5;
    for (const p of pos) {
      p.vx += (width / 2 - p.x) * 0.05;
      p.vy += (height / 2 - p.y) * 0.05;
      const speed = Math.sqrt(p.vx * p.vx + p.vy * p.vy) || 1;
      const scale = Math.min(speed, limit) / speed;
      p.x += p.vx * scale;
      p.y += p.vy * scale;
      p.vx = 0; p.vy = 0;
    }
  }
  return pos;
}

/** Fit positions into the box with a margin. */
function fit(pos, width, height, margin) {
  if (!pos.length) return pos;
  const xs = pos.map((p) => p.x), ys = pos.map((p) => p.y);
  const minX = Math.min(...xs), maxX = Math.max(...xs), minY = Math.min(...ys), maxY = Math.max(...ys);
  // Scale each axis on its own (at most 2.5x apart): a node-link picture need not keep its
  // aspect ratio, and filling the box keeps labels apart.
  let sx = (width - 2 * margin) / Math.max(maxX - minX, 1);
  let sy = (height - 2 * margin) / Math.max(maxY - minY, 1);
  sx = Math.min(sx, sy * 2.5);
  sy = Math.min(sy, sx * 2.5);
  const ox = (width - (maxX - minX) * sx) / 2, oy = (height - (maxY - minY) * sy) / 2;
  return pos.map((p) => ({ x: ox + (p.x - minX) * sx, y: oy + (p.y - minY) * sy }));
}

/**
 * Returns a <figure> with an SVG drawing of the graph and a caption, `boxWidth` CSS pixels wide.
 * nodes/edges in the shapes the graph backends use (uuid/name, source_node_uuid/target_node_uuid).
 */
export function drawGraph(rawNodes, rawEdges, boxWidth = 640) {
  // Draw at the size it is shown, so 11px labels stay 11px on a phone.
  const width = Math.round(Math.max(280, Math.min(boxWidth, 960)));
  const height = Math.round(Math.max(260, Math.min(width * 0.6, 440)));
  const { nodes, links } = pick(rawNodes ?? [], rawEdges ?? []);
  const pos = fit(layout(nodes.length, links, width, height), width, height, 24);
  const showLabels = nodes.length <= width / 24;

  const title = `Graph drawing: ${rawNodes.length} nodes and ${rawEdges.length} edges` +
    (nodes.length < rawNodes.length ? ` (showing the ${nodes.length} best-connected nodes)` : "");
  const picture = svg("svg", {
    viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title, class: "graph-svg",
    preserveAspectRatio: "xMidYMid meet",
  });
  const edgeLayer = svg("g", { class: "edges" });
  for (const [a, b] of links) {
    edgeLayer.append(svg("line", { x1: pos[a].x.toFixed(1), y1: pos[a].y.toFixed(1), x2: pos[b].x.toFixed(1), y2: pos[b].y.toFixed(1) }));
  }
  const nodeLayer = svg("g", { class: "nodes" });
  nodes.forEach((n, i) => {
    const r = Math.min(4 + Math.sqrt(n.degree) * 2, 12);
    const g = svg("g", { class: "node", transform: `translate(${pos[i].x.toFixed(1)} ${pos[i].y.toFixed(1)})` });
    g.append(svg("circle", { r: r.toFixed(1) }, svg("title", {}, n.name)));
    if (showLabels) {
      const label = n.name.length > 24 ? `${n.name.slice(0, 23)}…` : n.name;
      const flip = pos[i].x > width - 8 * label.length - 16; // near the right edge: label on the left
      g.append(svg("text", { x: ((r + 3) * (flip ? -1 : 1)).toFixed(1), y: "4", "text-anchor": flip ? "end" : "start" }, label));
    }
    nodeLayer.append(g);
  });
  picture.append(edgeLayer, nodeLayer);

  const caption = h("figcaption", { class: "muted" }, title);
  const names = h("ul", { class: "node-names" }, ...nodes.slice(0, 60).map((n) => h("li", {}, n.name)));
  const list = h("details", { class: "node-list" }, h("summary", {}, "Node names"), names);
  return h("figure", {}, picture, caption, nodes.length ? list : null);
}
