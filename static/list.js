// The task list: rows keyed by task_id, updated in place (focus and scroll stay put).
import { $, h, setText, announce } from "./dom.js";
import { age, clampProgress, shortId, statusLabel } from "./format.js";

const byNewest = (a, b) => (Date.parse(b.created_at) - Date.parse(a.created_at)) || (a.task_id < b.task_id ? -1 : 1);

export class TaskList {
  constructor() {
    this.tasks = new Map();   // task_id -> task
    this.rows = new Map();    // task_id -> row elements
    this.types = new Set();
    this.filters = { status: "", task_type: "" };
    this.visible = false;
    this.loaded = false;
    this.ul = $("task-list");
  }

  /** `snapshot` event: the full list for the current filters (also after every reconnect). */
  loadSnapshot({ tasks }) {
    const fresh = new Map((tasks ?? []).map((t) => [t.task_id, t]));
    for (const id of [...this.rows.keys()]) if (!fresh.has(id)) this.#dropRow(id);
    this.tasks = new Map();
    for (const task of fresh.values()) this.#put(task, { quiet: true });
    this.#reorder();
    this.loaded = true;
    this.#summary();
  }

  /** `task` event. */
  upsert(task) {
    const known = this.tasks.get(task.task_id);
    if (known && task.version <= known.version) return; // stale or duplicate
    const isNew = !known;
    this.#put(task, { quiet: false, previous: known });
    if (isNew) this.#reorder();
    this.#summary();
  }

  /** `removed` event. */
  remove({ task_id }) {
    if (!this.tasks.has(task_id)) return;
    this.tasks.delete(task_id);
    this.#dropRow(task_id);
    this.#summary();
  }

  /** Refresh the relative ages ("12 s ago"). */
  tick(now = Date.now()) {
    for (const [id, row] of this.rows) {
      const task = this.tasks.get(id);
      if (task) setText(row.age, age(task.created_at, now));
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
    row.age.dateTime = task.created_at;
    row.age.title = `Created ${task.created_at}`;
    setText(row.age, age(task.created_at));
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

  #dropRow(id) {
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
    this.filters = filters;
    $("filter-status").value = filters.status;
    if ($("filter-type").value !== filters.task_type) $("filter-type").value = filters.task_type;
  }

  /** Called while a new filtered stream is being opened. */
  markLoading() {
    this.loaded = false;
    this.#summary();
  }
}
