// The task list: rows keyed by task_id, updated in place (focus and scroll stay put).
//
// Fed by the shared, unfiltered stream (every change of every task) and by a read of the list
// (GET api/graph/tasks with the filters) whenever the view appears, the filters change or the
// stream starts a new epoch. The filters are applied here to stream events. Every task keeps the
// highest version seen, from either source; anything older is ignored, so nothing goes backwards.
import { $, h, setText, announce } from "./dom.js";
import { api } from "./api.js";
import { age, clampProgress, shortId, statusLabel } from "./format.js";

const byNewest = (a, b) => (Date.parse(b.created_at) - Date.parse(a.created_at)) || (a.task_id < b.task_id ? -1 : 1);
const GONE = Number.MAX_SAFE_INTEGER; // the version of a removed task: nothing of it comes back

export class TaskList {
  constructor() {
    this.tasks = new Map();   // task_id -> task shown
    this.rows = new Map();    // task_id -> row elements
    this.seen = new Map();    // task_id -> highest version seen (shown or not)
    this.types = new Set();
    this.filters = { status: "", task_type: "" };
    this.visible = false;
    this.loaded = false;
    this.reading = null;      // the read in flight: {filters, touched: Set of task_ids changed meanwhile}
    this.ul = $("task-list");
  }

  matches(task) {
    const { status, task_type } = this.filters;
    return (!status || task.status === status) && (!task_type || task.task_type === task_type);
  }

  /** Read the list for the current filters and merge it with what the stream delivered meanwhile. */
  async load() {
    const filters = this.filters;
    const reading = { filters, touched: new Set() };
    this.reading = reading;
    const params = new URLSearchParams();
    if (filters.status) params.set("status", filters.status);
    if (filters.task_type) params.set("task_type", filters.task_type);
    const query = params.toString();
    const body = await api(`api/graph/tasks${query ? `?${query}` : ""}`);
    if (this.reading !== reading) return; // a newer read (or other filters) took over
    this.reading = null;
    this.#merge(body?.data ?? [], reading.touched);
  }

  /** A task read at some moment: the rows not in it are gone, unless the stream changed them since. */
  #merge(tasks, touched) {
    const fresh = new Set();
    for (const task of tasks) {
      fresh.add(task.task_id);
      const seen = this.seen.get(task.task_id);
      if (seen !== undefined && task.version < seen) continue; // the stream brought a newer one
      this.seen.set(task.task_id, task.version);
      const shown = this.tasks.get(task.task_id);
      if (this.matches(task) && !(shown && shown.version >= task.version)) this.#put(task, { quiet: true });
    }
    for (const id of [...this.rows.keys()]) {
      if (!fresh.has(id) && !touched.has(id)) this.#drop(id);
    }
    this.#reorder();
    this.loaded = true;
    this.#summary();
  }

  #older(task) {
    const seen = this.seen.get(task.task_id);
    return seen !== undefined && task.version <= seen;
  }

  /** `task` event (every task; the filters are applied here). */
  upsert(task) {
    if (this.#older(task)) return; // stale or duplicate
    this.seen.set(task.task_id, task.version);
    this.reading?.touched.add(task.task_id);
    const known = this.tasks.get(task.task_id);
    if (!this.matches(task)) {
      if (known) {
        this.#drop(task.task_id);
        this.#summary();
      }
      return;
    }
    this.#put(task, { quiet: false, previous: known });
    if (!known) this.#reorder();
    this.#summary();
  }

  /** `removed` event. */
  remove({ task_id }) {
    this.seen.set(task_id, GONE);
    this.reading?.touched.add(task_id);
    if (!this.tasks.has(task_id)) return;
    this.#drop(task_id);
    this.#summary();
  }

  /** Refresh the relative ages ("12 s ago"). */
  tick(now = Date.now()) {
    for (const [id, row] of this.rows) {
      const task = this.tasks.get(id);
      if (task) setText(row.age, `updated ${age(task.updated_at, now)}`);
    }
  }

  #put(task, { quiet, previous }) {
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
    setText(row.age, `updated ${age(task.updated_at)}`);
    if (!this.types.has(task.task_type)) {
      this.types.add(task.task_type);
      $("known-types").append(h("option", { value: task.task_type }));
    }
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
    const ordered = [...this.tasks.values()].sort(byNewest);
    // Move only rows that are out of place, so focus inside a row survives.
    let cursor = this.ul.firstElementChild;
    for (const task of ordered) {
      const li = this.rows.get(task.task_id).li;
      if (li === cursor) cursor = cursor.nextElementSibling;
      else this.ul.insertBefore(li, cursor);
    }
  }

  #summary() {
    const n = this.tasks.size;
    const filtered = Boolean(this.filters.status || this.filters.task_type);
    setText($("list-count"), this.loaded ? `${n} ${n === 1 ? "task" : "tasks"}${filtered ? " match the filters" : ""}` : "Loading…");
    const empty = $("list-empty");
    empty.hidden = !this.loaded || n > 0;
    setText(empty, filtered ? "No tasks match these filters." : "No tasks yet. Start a graph build, or report one through the producer API.");
  }

  setFilters(filters) {
    const changed = filters.status !== this.filters.status || filters.task_type !== this.filters.task_type;
    this.filters = filters;
    if (changed) {
      // Rows that no longer match go at once; the read that follows brings the ones that now do.
      for (const [id, task] of [...this.tasks]) if (!this.matches(task)) this.#drop(id);
      this.reading = null;
    }
    $("filter-status").value = filters.status;
    if ($("filter-type").value !== filters.task_type) $("filter-type").value = filters.task_type;
  }

  /** Called while the list for new filters is being read. */
  markLoading() {
    this.loaded = false;
    this.#summary();
  }
}
