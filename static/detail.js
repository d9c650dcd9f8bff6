// One task in detail: progress, message, timing (duration, last update, rate, ETA), stale and
// cancel, progress_detail, the outcome, the graph, and the task's whole message log: read from the
// server's event log (GET api/tasks/{id}/events, paged with next_after) and extended by the stream's
// events, so a reload or a late visitor sees every change the server holds, not only what this tab saw.
import { $, h, setText, announce } from "./dom.js";
import { api, ApiError } from "./api.js";
import {
  age, clampProgress, clock, dateTime, describeDetail, duration, isTerminal, rateText, statusLabel, valueText, humanize,
} from "./format.js";
import { drawGraph } from "./graph.js";

const LOG_LIMIT = 5000;     // entries shown (the server keeps TASKMON_HISTORY changes, default 256)
const LOG_PAGE = 500;       // events read per request
const LOG_PAGES = 20;       // requests per catch-up
const QUIET_READ_MS = 60_000; // a live task with no news this long is read again (its `stale` key)
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
    this.stale = false;
    this.logVersion = 0;  // the newest version the log holds
    this.logPrev = null;  // the snapshot of the last version logged (entries only when something shown changed)
    this.logRun = null;   // the catch-up read in flight: {again}
    this.heard = 0;       // when this task last had news (a snapshot or a stale event)
    this.onQuiet = null;  // (id) => read the task again
    $("detail-cancel").addEventListener("click", () => this.cancel());
  }

  /** Start showing task `id` (nothing loaded yet). */
  reset(id) {
    this.id = id;
    this.task = null;
    this.graphFor = null;
    this.stale = false;
    this.logVersion = 0;
    this.logPrev = null;
    this.logRun = null;
    setText($("detail-log-status"), "");
    setText($("detail-cancel-error"), "");
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
    if (previous && task.version <= previous.version) {
      // A read of the same version that says stale (no change, no version bump): the badge shows it.
      if (task.version === previous.version && task.stale && !this.stale) this.applyStale(task);
      return false; // duplicate or older
    }
    this.task = task;
    this.heard = Date.now();
    this.stale = Boolean(task.stale) && !isTerminal(task);
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

    this.#logLive(task);
    this.#liveState();
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

  tick(now = Date.now()) {
    if (!this.task) return;
    this.#times(now);
    if (!isTerminal(this.task) && !this.stale && now - this.heard > QUIET_READ_MS && this.onQuiet) {
      this.heard = now;
      this.onQuiet(this.id);
    }
  }

  /** `stale` event: {task_id, stale}. Not a change (no version): only the badge and "last update". */
  applyStale({ task_id, stale }) {
    if (task_id !== this.id || !this.task) return;
    this.heard = Date.now();
    this.stale = Boolean(stale) && !isTerminal(this.task);
    this.#liveState();
    this.#times();
  }

  #liveState() {
    const t = this.task;
    const live = !isTerminal(t);
    $("detail-stale").hidden = !this.stale;
    $("detail").dataset.stale = String(this.stale);
    $("detail-cancel-state").hidden = !(live && t.cancel_requested);
    $("detail-actions").hidden = !live;
    $("detail-cancel").hidden = !live || Boolean(t.cancel_requested);
  }

  /** POST api/tasks/{id}/cancel; a 401 asks for the producer token (api.js) and retries. */
  async cancel() {
    const id = this.id;
    const button = $("detail-cancel");
    setText($("detail-cancel-error"), "");
    button.disabled = true;
    try {
      const body = await api(`api/tasks/${encodeURIComponent(id)}/cancel`, {
        method: "POST", reason: "Cancelling a task needs the server's producer (API) token.",
      });
      if (this.id === id && body?.data) this.apply(body.data);
      announce("Cancel requested.");
    } catch (err) {
      if (this.id !== id) return;
      const why = err instanceof ApiError
        ? (err.status === 409 ? "The task has already finished." : err.message)
        : "the server could not be reached";
      setText($("detail-cancel-error"), `Could not cancel: ${why}`);
    } finally {
      button.disabled = false;
    }
  }

  #times(now = Date.now()) {
    const t = this.task;
    for (const [id, iso] of [["detail-created", t.created_at], ["detail-updated", t.updated_at]]) {
      const el = $(id);
      el.dateTime = iso;
      el.title = dateTime(iso);
      setText(el, `${age(iso, now)} (${clock(iso)})`);
    }
    const started = Date.parse(t.started_at ?? "");
    const finished = Date.parse(t.finished_at ?? "");
    let ran = "not started";
    if (!Number.isNaN(started)) {
      ran = duration(((Number.isNaN(finished) ? now : finished) - started) / 1000);
      if (Number.isNaN(finished)) ran += " so far";
    } else if (isTerminal(t)) {
      ran = "—";
    }
    setText($("detail-duration"), ran);
    const quiet = (now - Date.parse(t.updated_at)) / 1000;
    setText($("detail-last-update"), this.stale ? `no update for ${duration(quiet)}` : age(t.updated_at, now));
    setText($("detail-rate"), isTerminal(t) ? "—" : rateText(t.rate));
    const eta = Number(t.eta_s);
    const known = !isTerminal(t) && t.eta_s !== null && t.eta_s !== undefined && Number.isFinite(eta);
    setText($("detail-eta"), !known ? "—" : eta < 1 ? "under 1 s" : `about ${duration(eta)}`);
  }

  /** A snapshot from a read or the stream: the next version is logged at once; a gap is read from the log. */
  #logLive(task) {
    if (task.version <= this.logVersion) return;
    if (!this.logRun && task.version === this.logVersion + 1) this.#logEntry(task);
    else this.#catchUp();
  }

  /** Read the server's event log after the newest version held, page by page (next_after). */
  async #catchUp() {
    if (this.logRun) {
      this.logRun.again = true;
      return;
    }
    const id = this.id;
    const run = { again: true };
    this.logRun = run;
    try {
      while (run.again && this.logRun === run) {
        run.again = false;
        let after = this.logVersion;
        for (let page = 0; page < LOG_PAGES; page++) {
          const body = await api(`api/tasks/${encodeURIComponent(id)}/events?after=${after}&limit=${LOG_PAGE}`);
          if (this.logRun !== run) return; // another task is shown now
          for (const snapshot of body?.data ?? []) this.#logEntry(snapshot);
          if (body?.next_after === null || body?.next_after === undefined) break;
          after = body.next_after;
        }
      }
      setText($("detail-log-status"), "");
    } catch (err) {
      if (this.logRun !== run) return;
      if (err instanceof ApiError && err.status === 404) return; // the task is gone: the detail says so
      // Unreachable: the stream's next epoch reads the task (and so the log) again.
      setText($("detail-log-status"), "Some messages could not be read yet.");
      console.debug("taskmon: reading the event log failed", err);
    } finally {
      if (this.logRun === run) this.logRun = null;
    }
    // Versions that arrived on the stream while reading and are newer than the log held.
    if (this.id === id && this.task && this.task.version > this.logVersion && !this.logRun) this.#logLive(this.task);
  }

  #logEntry(task) {
    if (task.version <= this.logVersion) return;
    this.logVersion = task.version;
    const previous = this.logPrev;
    this.logPrev = task;
    if (previous && previous.message === task.message && previous.status === task.status && previous.progress === task.progress) return;
    const log = $("detail-log");
    const nearBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    const entry = h("li", { class: `log-entry log-${task.status}`, "data-version": task.version },
      h("time", { datetime: task.updated_at, title: dateTime(task.updated_at) }, clock(task.updated_at)),
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
