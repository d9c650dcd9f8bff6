// The task list: search, status tabs with live counts, type, sort, and "load more" pages.
//
// What is shown is read over HTTP (GET api/graph/tasks with the filters and `limit`, then the
// server's `next_cursor` for each further page) and kept live by the shared, unfiltered stream:
// the filters are applied here to its events (the same rules as the server's, PROTOCOL v1.1).
// Rows are keyed by task_id and updated in place; every task keeps the highest version seen.
//
// Bounded by design (10,000 retained tasks, 50 new ones a second): the tab holds only the rows it
// shows (at most MAX_ROWS), never every task the stream mentions. Stream events are queued and
// applied once per animation frame (one DOM pass per frame, however many events arrived), and the
// counts are read again at most once a second while events arrive.
//
// Why "load more" rather than a virtual window: rows stay real DOM (find in page, Tab order, screen
// readers see the list as it is), a page of PAGE_SIZE rows renders in a frame, and the server's
// cursor paging maps onto it one to one. Once the list holds LIVE_ROWS, tasks that would enter it
// live are counted ("N new — show the newest") instead of added.
import { $, h, setText, announce } from "./dom.js";
import { api } from "./api.js";
import { age, clampProgress, duration, isTerminal, shortId, statusLabel } from "./format.js";

export const PAGE_SIZE = 50;
const MAX_ROWS = 500;  // rows a tab holds at most ("load more" stops there)
const LIVE_ROWS = 200; // live arrivals join the list only while it is shorter: inserting into a longer
                       // list costs a long frame of style and layout (measured: 50-77 ms at 450-500 rows)
const ROWS_PER_FRAME = 12;
const FRAME_BUDGET_MS = 4; // script time per frame for new rows; style and layout come on top
const COUNTS_EVERY_MS = 1000;
const COUNTS_QUIET_MS = 30_000;
const MAX_TYPES = 200;
const TYPES_KEY = "taskmon.types";
export const STATUSES = ["pending", "processing", "completed", "failed"];
export const SORTS = ["-created", "created", "-updated", "updated"];
export const DEFAULT_FILTERS = Object.freeze({ q: "", status: "", task_type: "", sort: "-created" });

/** The filters as query parameters (defaults left out): the same for the URL and the API. */
export function filterParams(filters, { withStatus = true, withSort = true } = {}) {
  const params = new URLSearchParams();
  if (filters.q) params.set("q", filters.q);
  if (withStatus && filters.status) params.set("status", filters.status);
  if (filters.task_type) params.set("task_type", filters.task_type);
  if (withSort && filters.sort !== "-created") params.set("sort", filters.sort);
  return params;
}

export function parseFilters(query) {
  const params = new URLSearchParams(query);
  const status = params.get("status") ?? "";
  const sort = params.get("sort") ?? "-created";
  return {
    q: (params.get("q") ?? "").trim().slice(0, 200),
    status: STATUSES.includes(status) ? status : "",
    task_type: (params.get("task_type") ?? "").trim(),
    sort: SORTS.includes(sort) ? sort : "-created",
  };
}

export const sameFilters = (a, b) => a.q === b.q && a.status === b.status && a.task_type === b.task_type && a.sort === b.sort;

function metadataText(value, out) {
  const stack = [value];
  while (stack.length) {
    const item = stack.pop();
    if (Array.isArray(item)) stack.push(...item);
    else if (item && typeof item === "object") stack.push(...Object.values(item));
    else if (item !== null && item !== undefined && typeof item !== "boolean") out.push(String(item));
  }
}

/** The server's `q` rule: case-insensitive substring of type, message, error, metadata values; id prefix. */
function matchesQ(task, q) {
  if (String(task.task_id).startsWith(q)) return true;
  const parts = [task.task_type, task.message ?? "", task.error ?? ""];
  metadataText(task.metadata, parts);
  return parts.join("\n").toLowerCase().includes(q);
}

export class TaskList {
  constructor() {
    this.filters = { ...DEFAULT_FILTERS };
    this.order = [];          // task_ids shown, in list order
    this.tasks = new Map();   // task_id -> task shown
    this.rows = new Map();    // task_id -> row elements
    this.cursor = null;       // next_cursor of the last page read (null: the end is shown)
    this.counts = null;       // {pending, processing, completed, failed} for the filters (status ignored)
    this.waiting = new Set(); // ids of matching tasks not shown because the list is full
    this.types = new Set();   // task types seen (rows and every event): the type filter's suggestions
    this.typesSaved = null;   // null while restoring
    this.#restoreTypes();
    this.visible = false;
    this.loaded = false;
    this.generation = 0;      // bumped by every new read of the first page: older answers are dropped
    this.reading = null;      // Map task_id -> newest event task while the first page is being read
    this.queue = new Map();   // events waiting for the next animation frame
    this.frame = 0;
    this.countsTimer = null;
    this.countsDirty = false;
    this.countsAt = 0;
    this.ul = $("task-list");
    $("list-more").addEventListener("click", () => this.more());
    $("list-new").addEventListener("click", () => this.load());
  }

  matches(task) {
    const { q, status, task_type } = this.filters;
    return (!status || task.status === status) && (!task_type || task.task_type === task_type)
      && (!q || matchesQ(task, q.toLowerCase()));
  }

  #key(task) {
    return this.filters.sort.endsWith("created") ? task.created_at : task.updated_at;
  }

  /** Negative when task a comes first in the list's order (the server's: time, then id). */
  #compare(a, b) {
    const ka = this.#key(a);
    const kb = this.#key(b);
    const c = ka < kb ? -1 : ka > kb ? 1 : a.task_id < b.task_id ? -1 : a.task_id > b.task_id ? 1 : 0;
    return this.filters.sort.startsWith("-") ? -c : c;
  }

  /** Read the first page (and the counts) for the current filters; what the stream delivers meanwhile is kept. */
  async load() {
    const generation = ++this.generation;
    const filters = this.filters;
    this.reading = new Map();
    this.#loadCounts();
    const params = filterParams(filters);
    params.set("limit", String(PAGE_SIZE));
    let body;
    try {
      body = await api(`api/graph/tasks?${params}`);
    } catch (err) {
      if (generation === this.generation) this.reading = null; // the next epoch reads again
      throw err;
    }
    if (generation !== this.generation) return; // a newer read (or other filters) took over
    const touched = this.reading;
    this.reading = null;
    // Events that arrived while reading are newer than what the page says, or new tasks.
    const fresh = new Map((body?.data ?? []).map((t) => [t.task_id, t]));
    for (const [id, task] of touched) {
      const read = fresh.get(id);
      if (!read || read.version < task.version) fresh.set(id, task);
    }
    const chosen = [...fresh.values()].filter((t) => this.matches(t)).sort((a, b) => this.#compare(a, b));
    this.cursor = body?.next_cursor ?? null;
    // A task the stream brought that sorts past the page's end comes with the next page instead.
    const last = (body?.data ?? []).at(-1);
    const shown = this.cursor && last ? chosen.filter((t) => this.#compare(t, last) <= 0) : chosen;
    const keep = new Set(shown.map((t) => t.task_id));
    for (const id of [...this.rows.keys()]) if (!keep.has(id)) this.#drop(id);
    this.waiting.clear();
    for (const task of shown) this.#put(task, true);
    this.order = shown.map((t) => t.task_id);
    this.#reorder();
    this.loaded = true;
    this.#summary();
  }

  /** The next page, after the server's cursor. */
  async more() {
    const room = MAX_ROWS - this.order.length;
    if (!this.cursor || room <= 0) return;
    const generation = this.generation;
    const params = filterParams(this.filters);
    params.set("limit", String(Math.min(PAGE_SIZE, room))); // never past MAX_ROWS: no row is skipped
    params.set("cursor", this.cursor);
    const button = $("list-more");
    button.disabled = true;
    try {
      const body = await api(`api/graph/tasks?${params}`);
      if (generation !== this.generation) return;
      this.cursor = body?.next_cursor ?? null;
      for (const task of body?.data ?? []) {
        const shown = this.tasks.get(task.task_id);
        if (shown && shown.version >= task.version) continue;
        if (!this.matches(task)) continue;
        this.#put(task, true);
        if (!shown) this.order.push(task.task_id);
      }
      this.#reorder();
      this.#summary();
    } finally {
      button.disabled = false;
    }
  }

  #seeType(type) {
    if (typeof type !== "string" || this.types.has(type) || this.types.size >= MAX_TYPES) return;
    this.types.add(type);
    $("known-types").append(h("option", { value: type }));
    if (this.typesSaved !== null) this.#saveTypes(); // at most MAX_TYPES writes in a tab's life
  }

  // Kept for the browser profile (local storage) so a reload still suggests them.
  #restoreTypes() {
    try {
      const saved = JSON.parse(localStorage.getItem(TYPES_KEY) ?? "[]");
      if (Array.isArray(saved)) for (const type of saved.slice(0, MAX_TYPES)) this.#seeType(type);
    } catch (err) {
      console.debug("taskmon: no saved task types", err);
    }
    this.typesSaved = 0;
  }

  #saveTypes() {
    this.typesSaved += 1;
    try {
      localStorage.setItem(TYPES_KEY, JSON.stringify([...this.types]));
    } catch (err) {
      console.debug("taskmon: cannot save the task types", err);
    }
  }

  /** `task` event (every task of the unfiltered stream): applied at the next animation frame. */
  upsert(task) {
    this.#seeType(task.task_type);
    if (this.reading) {
      const known = this.reading.get(task.task_id);
      if (!known || known.version < task.version) this.reading.set(task.task_id, task);
    }
    const queued = this.queue.get(task.task_id);
    if (queued && queued.version >= task.version) return;
    this.queue.set(task.task_id, task);
    this.#countsChanged();
    this.#schedule();
  }

  /** `removed` event. */
  remove({ task_id }) {
    this.reading?.delete(task_id);
    this.queue.set(task_id, null);
    this.#countsChanged();
    this.#schedule();
  }

  #schedule() {
    if (this.frame) return;
    // Hidden tabs get no animation frames; a timer keeps their list from growing a backlog.
    const run = () => { this.frame = 0; this.#flush(); };
    this.frame = document.hidden ? setTimeout(run, 250) : requestAnimationFrame(run);
  }

  #flush() {
    if (!this.loaded) {
      this.queue.clear(); // the read in flight holds them (this.reading)
      return;
    }
    // At most ROWS_PER_FRAME new rows (and FRAME_BUDGET_MS of script) a frame: style and layout
    // grow with the rows added, so a burst is spread over a few frames rather than one long task.
    // The rest waits in the queue, in arrival order, for the next frame.
    const events = this.queue;
    const started = performance.now();
    let added = 0;
    let moved = false;
    const end = this.cursor ? this.tasks.get(this.order.at(-1)) : null;
    for (const [id, task] of events) {
      if (added >= ROWS_PER_FRAME || (added && performance.now() - started > FRAME_BUDGET_MS)) break;
      events.delete(id);
      const shown = this.tasks.get(id);
      if (task === null) {
        if (shown) { this.#drop(id); moved = true; }
        this.waiting.delete(id);
        continue;
      }
      if (shown && task.version <= shown.version) continue;
      if (!this.matches(task)) {
        if (shown) { this.#drop(id); moved = true; }
        this.waiting.delete(id);
        continue;
      }
      if (shown) {
        if (this.#key(shown) !== this.#key(task)) moved = true;
        this.#put(task, false, shown);
        continue;
      }
      // A matching task not shown: it enters the list if it sorts within what is shown.
      if (end && this.#compare(task, end) > 0) continue; // further down: the next page brings it
      if (this.order.length >= LIVE_ROWS) {
        if (this.waiting.size < MAX_ROWS) this.waiting.add(id);
        continue;
      }
      this.#put(task, false);
      this.order.push(id);
      moved = true;
      added += 1;
    }
    if (moved) {
      this.order = this.order.filter((id) => this.tasks.has(id));
      this.order.sort((a, b) => this.#compare(this.tasks.get(a), this.tasks.get(b)));
      this.#reorder();
    }
    this.#summary();
    if (this.queue.size) this.#schedule();
  }

  #countsChanged() {
    this.countsDirty = true;
    if (this.countsTimer || !this.visible) return;
    const wait = Math.max(0, this.countsAt + COUNTS_EVERY_MS - Date.now());
    this.countsTimer = setTimeout(() => {
      this.countsTimer = null;
      if (this.countsDirty && this.visible) this.#loadCounts();
    }, wait);
  }

  async #loadCounts() {
    this.countsDirty = false;
    this.countsAt = Date.now();
    const generation = this.generation;
    const params = filterParams(this.filters, { withStatus: false, withSort: false });
    try {
      const body = await api(`api/tasks/counts${params.size ? `?${params}` : ""}`);
      if (generation !== this.generation) return;
      this.counts = body?.data ?? null;
      this.#summary();
    } catch (err) {
      console.debug("taskmon: reading the counts failed", err);
    }
  }

  /** `stale` event {task_id, stale}: not a change (no version), only what the row says. */
  applyStale({ task_id, stale }) {
    const task = this.tasks.get(task_id);
    if (!task || isTerminal(task)) return;
    task.stale = Boolean(stale);
    this.#age(this.rows.get(task_id), task);
  }

  /** Refresh the relative ages ("12 s ago"), and now and then the counts (retention removes tasks silently). */
  tick(now = Date.now()) {
    if (this.visible && this.loaded && now - this.countsAt > COUNTS_QUIET_MS) this.#loadCounts();
    for (const [id, row] of this.rows) {
      const task = this.tasks.get(id);
      if (task) this.#age(row, task, now);
    }
  }

  #age(row, task, now = Date.now()) {
    const stale = Boolean(task.stale) && !isTerminal(task);
    row.li.dataset.stale = String(stale);
    setText(row.age, stale ? `no update for ${duration((now - Date.parse(task.updated_at)) / 1000)}` : `updated ${age(task.updated_at, now)}`);
  }

  #put(task, quiet, previous = this.tasks.get(task.task_id)) {
    this.tasks.set(task.task_id, task);
    let row = this.rows.get(task.task_id);
    if (!row) {
      row = this.#createRow(task);
      this.rows.set(task.task_id, row);
    }
    const pct = clampProgress(task.progress);
    row.li.dataset.status = task.status;
    row.badge.className = `badge badge-${task.status}`;
    setText(row.badge, statusLabel(task.status));
    setText(row.type, task.task_type);
    if (row.progress.value !== pct) row.progress.value = pct;
    setText(row.pct, `${pct}%`);
    setText(row.message, task.status === "failed" && task.error ? task.error : task.message);
    row.age.dateTime = task.updated_at;
    row.age.title = `Created ${task.created_at}, last update ${task.updated_at}`;
    this.#age(row, task);
    this.#seeType(task.task_type);
    if (!quiet && this.visible && previous && previous.status !== task.status) {
      announce(`${task.task_type} ${shortId(task.task_id)} is now ${statusLabel(task.status).toLowerCase()}.`);
    }
  }

  #createRow(task) {
    const id = task.task_id;
    const type = h("span", { class: "task-type" });
    const link = h("a", { class: "task-link", href: `#/task/${encodeURIComponent(id)}` },
      type, " ", h("span", { class: "task-id" }, shortId(id)));
    const badge = h("span", { class: "badge" });
    const progress = h("progress", { max: 100, value: 0, "aria-label": `Progress of ${task.task_type}` });
    const pct = h("span", { class: "pct" });
    const message = h("p", { class: "task-message" });
    const ageEl = h("time", { class: "task-age" });
    const li = h("li", { class: "task", "data-task-id": id },
      h("div", { class: "task-head" }, link, badge),
      h("div", { class: "progress-row" }, progress, pct),
      h("div", { class: "task-foot" }, message, ageEl));
    return { li, type, badge, progress, pct, message, age: ageEl };
  }

  #drop(id) {
    this.tasks.delete(id);
    const row = this.rows.get(id);
    if (row) row.li.remove();
    this.rows.delete(id);
  }

  #reorder() {
    // Move only rows that are out of place, so focus inside a row survives.
    let cursor = this.ul.firstElementChild;
    for (const id of this.order) {
      const li = this.rows.get(id).li;
      if (li === cursor) cursor = cursor.nextElementSibling;
      else this.ul.insertBefore(li, cursor);
    }
  }

  #summary() {
    const { q, status, task_type } = this.filters;
    const filtered = Boolean(q || status || task_type);
    let total = null;
    if (this.counts) total = status ? this.counts[status] : STATUSES.reduce((sum, s) => sum + (this.counts[s] ?? 0), 0);
    const n = this.order.length;
    let text = "Loading…";
    if (this.loaded) {
      const all = total ?? n;
      text = `${all.toLocaleString()} ${all === 1 ? "task" : "tasks"}${filtered ? " match the filters" : ""}`;
      if (all > n && n > 0) text += ` (showing ${n.toLocaleString()})`;
    }
    setText($("list-count"), text);
    for (const tab of document.querySelectorAll("#status-tabs [data-status]")) {
      const s = tab.dataset.status;
      const value = this.counts ? (s ? this.counts[s] ?? 0 : STATUSES.reduce((sum, k) => sum + (this.counts[k] ?? 0), 0)) : null;
      setText(tab.querySelector(".tab-count"), value === null ? "" : value.toLocaleString());
    }
    const empty = $("list-empty");
    empty.hidden = !this.loaded || n > 0;
    setText(empty, filtered ? "No tasks match these filters." : "No tasks yet. Start a graph build, or report one through the producer API.");
    $("list-more").hidden = !this.loaded || !this.cursor || n >= MAX_ROWS;
    setText($("list-full"), this.loaded && this.cursor && n >= MAX_ROWS ? `The first ${MAX_ROWS} are shown: search or filter to find the others.` : "");
    const fresh = $("list-new");
    fresh.hidden = this.waiting.size === 0;
    const waiting = this.waiting.size >= MAX_ROWS ? `${MAX_ROWS}+` : String(this.waiting.size);
    setText(fresh, this.filters.sort.startsWith("-") ? `${waiting} new — show the newest` : `${waiting} more match — read the list again`);
  }

  setFilters(filters) {
    const changed = !sameFilters(filters, this.filters);
    this.filters = { ...filters };
    if (changed) {
      // Rows that no longer match go at once; the read that follows brings the ones that now do.
      for (const [id, task] of [...this.tasks]) if (!this.matches(task)) this.#drop(id);
      this.order = this.order.filter((id) => this.tasks.has(id));
      this.generation += 1;
      this.reading = null;
      this.counts = null;
      this.cursor = null;
      this.waiting.clear();
    }
    for (const tab of document.querySelectorAll("#status-tabs [data-status]")) {
      tab.setAttribute("aria-pressed", String(tab.dataset.status === filters.status));
    }
    if ($("filter-q").value.trim() !== filters.q) $("filter-q").value = filters.q;
    if ($("filter-type").value.trim() !== filters.task_type) $("filter-type").value = filters.task_type;
    $("filter-sort").value = filters.sort;
  }

  /** Called while the list for new filters is being read. */
  markLoading() {
    this.loaded = false;
    this.#summary();
  }
}
