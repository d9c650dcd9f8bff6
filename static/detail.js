// One task in detail: progress, message, a running log, progress_detail, the outcome, and the graph.
import { $, h, setText, announce } from "./dom.js";
import { api, ApiError } from "./api.js";
import { age, clampProgress, clock, dateTime, describeDetail, isTerminal, statusLabel, valueText, humanize } from "./format.js";
import { drawGraph } from "./graph.js";

const LOG_LIMIT = 500;
const GRAPH_COUNT_KEYS = new Set(["node_count", "edge_count", "chunk_count"]);

function fillKv(dl, rows) {
  dl.replaceChildren(...rows.map(([label, text]) => h("div", {}, h("dt", {}, label), h("dd", {}, text))));
  dl.hidden = rows.length === 0;
}

export class TaskDetail {
  constructor() {
    this.id = null;
    this.task = null;
    this.graphFor = null; // graph_id whose data is shown or loading
  }

  /** Start showing task `id` (nothing loaded yet). */
  reset(id) {
    this.id = id;
    this.task = null;
    this.graphFor = null;
    $("detail").hidden = true;
    setText($("detail-error"), "");
    $("detail-log").replaceChildren();
    $("graph").hidden = true;
    $("graph-figure").replaceChildren();
    $("graph-counts").replaceChildren();
    setText($("graph-status"), "");
  }

  showError(text) {
    setText($("detail-error"), text);
  }

  /** Apply a snapshot (read with GET, or a `task` event of the shared stream). Returns true if it was new. */
  apply(task) {
    if (!task || task.task_id !== this.id) return false;
    const previous = this.task;
    if (previous && task.version <= previous.version) return false; // duplicate or stale
    this.task = task;
    setText($("detail-error"), "");
    $("detail").hidden = false;
    $("detail").dataset.status = task.status;

    const pct = clampProgress(task.progress);
    setText($("detail-type"), task.task_type);
    setText($("detail-id"), task.task_id);
    const badge = $("detail-status");
    badge.className = `badge badge-${task.status}`;
    setText(badge, statusLabel(task.status));
    $("detail-progress").value = pct;
    setText($("detail-progress-label"), `${pct}%`);
    setText($("detail-message"), task.message);
    // Once completed, the result says it all; while running (or after a failure) the detail matters.
    fillKv($("detail-progress-detail"), task.status === "completed" ? [] : describeDetail(task.progress_detail));
    this.#times();
    setText($("detail-version"), task.version);
    document.title = `${isTerminal(task) ? statusLabel(task.status) : `${pct}%`} · ${task.task_type} · taskmon`;

    if (!previous || previous.message !== task.message || previous.status !== task.status || previous.progress !== task.progress) {
      this.#log(task);
    }
    if (previous && previous.status !== task.status) {
      announce(`Task ${task.task_type} is now ${statusLabel(task.status).toLowerCase()}.${task.status === "failed" && task.error ? ` ${task.error}` : ""}`);
    }

    const failed = task.status === "failed";
    $("detail-error-box").hidden = !failed;
    setText($("detail-error-text"), failed ? (task.error || "The task failed without a message.") : "");

    const result = task.status === "completed" && task.result && typeof task.result === "object" ? task.result : null;
    $("detail-result").hidden = !result;
    // Graph counts get their own display below; the rest of the result is listed here.
    const shown = result ? Object.entries(result).filter(([k]) => !(result.graph_id && GRAPH_COUNT_KEYS.has(k))) : [];
    fillKv($("detail-result-kv"), shown.map(([k, v]) => [humanize(k), valueText(v)]));
    // The producer's own keys, as it wrote them (text, never HTML).
    const metadata = task.metadata && typeof task.metadata === "object" && !Array.isArray(task.metadata) ? Object.entries(task.metadata) : [];
    fillKv($("detail-metadata-kv"), metadata.map(([k, v]) => [k, valueText(v)]));
    $("detail-metadata").hidden = metadata.length === 0;
    if (result && result.graph_id) this.#loadGraph(result);
    return true;
  }

  tick() {
    if (this.task) this.#times();
  }

  #times() {
    const t = this.task;
    for (const [id, iso] of [["detail-created", t.created_at], ["detail-updated", t.updated_at]]) {
      const el = $(id);
      el.dateTime = iso;
      el.title = dateTime(iso);
      setText(el, `${age(iso)} (${clock(iso)})`);
    }
  }

  #log(task) {
    const log = $("detail-log");
    const nearBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    const entry = h("li", { class: `log-entry log-${task.status}` },
      h("time", { datetime: task.updated_at }, clock(task.updated_at)),
      h("span", { class: "log-pct" }, `${clampProgress(task.progress)}%`),
      h("span", { class: "log-msg" }, task.status === "failed" && task.error ? `${task.message ? `${task.message} — ` : ""}${task.error}` : (task.message || statusLabel(task.status))));
    log.append(entry);
    while (log.childElementCount > LOG_LIMIT) log.firstElementChild.remove();
    if (nearBottom) log.scrollTop = log.scrollHeight;
  }

  async #loadGraph(result) {
    const graphId = String(result.graph_id);
    if (this.graphFor === graphId) return;
    this.graphFor = graphId;
    const taskId = this.id;
    $("graph").hidden = false;
    this.#counts(result, null);
    setText($("graph-status"), "Loading graph data…");
    try {
      const body = await api(`api/graph/data/${encodeURIComponent(graphId)}`);
      if (this.id !== taskId) return;
      const data = body?.data ?? {};
      const nodes = Array.isArray(data.nodes) ? data.nodes : [];
      const edges = Array.isArray(data.edges) ? data.edges : [];
      this.#counts(result, data);
      setText($("graph-status"), nodes.length ? "" : "The graph has no nodes to draw.");
      const figure = $("graph-figure");
      figure.replaceChildren(nodes.length ? drawGraph(nodes, edges, figure.clientWidth) : "");
    } catch (err) {
      if (this.id !== taskId) return;
      this.graphFor = null; // allow a later retry
      const why = err instanceof ApiError ? err.message : "the server could not be reached";
      setText($("graph-status"), `Could not load the graph data: ${why}.`);
    }
  }

  #counts(result, data) {
    const count = (key, list) => result[key] ?? data?.[key] ?? (Array.isArray(list) ? list.length : undefined);
    const items = [
      ["Nodes", count("node_count", data?.nodes), "nodes"],
      ["Edges", count("edge_count", data?.edges), "edges"],
      ["Chunks", result.chunk_count ?? data?.chunk_count, "chunks"],
    ].filter(([, v]) => v !== undefined && v !== null);
    $("graph-counts").replaceChildren(...items.map(([label, v, key]) =>
      h("li", { "data-count": key }, h("span", { class: "count-value" }, valueText(v)), h("span", { class: "count-label" }, label))));
  }
}

/** GET a task snapshot; null when it does not exist. Network failures throw. */
export async function fetchTask(id) {
  try {
    const body = await api(`api/graph/task/${encodeURIComponent(id)}`);
    return body.data;
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) return null;
    throw err;
  }
}
