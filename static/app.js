// taskmon live page: routes (#/, #/task/{id}, #/new) and the single stream that feeds them.
//
// Which stream is open:
//   * detail view of a task that is still running -> /tasks/{id}/stream?last_event_id=<fetched version>
//   * everything else                             -> /tasks/stream?status=..&task_type=.. (the list)
// Switching views switches the one EventSource; the tab never holds two.
import { $, setText } from "./dom.js";
import { api, onTokenWait, streamUrl } from "./api.js";
import { Connection } from "./stream.js";
import { TaskList } from "./list.js";
import { TaskDetail, fetchTask } from "./detail.js";
import { setupBuildForm } from "./build.js";
import { isTerminal } from "./format.js";

const conn = new Connection();
const list = new TaskList();
const detail = new TaskDetail();
let view = null;

const CONN_LABELS = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  offline: "Offline — retrying",
  token: "Token needed",
};

conn.onState((state) => {
  const el = $("conn");
  el.dataset.state = state;
  setText(el.querySelector(".conn-label"), CONN_LABELS[state] ?? state);
});

onTokenWait((waiting) => conn.hold(waiting ? "token" : null));

// ---- streams ------------------------------------------------------------------------------

function openListStream() {
  const { status, task_type } = list.filters;
  conn.open(`list?status=${status}&task_type=${task_type}`, {
    url: () => streamUrl("tasks/stream", { status, task_type }),
    events: {
      snapshot: (data) => {
        list.loadSnapshot(data);
        if (view === "detail") for (const task of data.tasks ?? []) detail.apply(task);
      },
      task: (task) => {
        list.upsert(task);
        if (view === "detail") detail.apply(task);
      },
      removed: (data) => list.remove(data),
    },
    // The browser gave up (e.g. 401 or 503): probe with fetch, which asks for a token on a 401.
    recover: async () => {
      await api("api/graph/tasks?limit=1");
      return true;
    },
  });
}

function openTaskStream(id) {
  conn.open(`task:${id}`, {
    url: () => streamUrl(`tasks/${encodeURIComponent(id)}/stream`, { last_event_id: detail.task?.version }),
    events: {
      task: (task) => detail.apply(task),
      end: () => taskFinished(id),
    },
    // The browser gave up (204 after the terminal event, 404, 401, 503): reload the snapshot and decide.
    recover: async () => {
      const task = await fetchTask(id);
      if (!task) {
        taskMissing(id);
        return false;
      }
      detail.apply(task);
      if (isTerminal(task)) {
        taskFinished(id);
        return false;
      }
      return true;
    },
  });
}

function taskFinished(id) {
  if (view !== "detail" || detail.id !== id) return;
  // The per-task stream is over; keep the page live through the list stream instead.
  openListStream();
}

function taskMissing(id) {
  if (detail.id !== id) return;
  detail.showError("There is no task with this id (it may have been removed by retention cleanup).");
  openListStream();
}

// ---- views --------------------------------------------------------------------------------

function show(name, focusHeading) {
  const changed = view !== name;
  view = name;
  $("view-list").hidden = name !== "list";
  $("view-detail").hidden = name !== "detail";
  $("view-new").hidden = name !== "new";
  list.visible = name === "list";
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (changed && focusHeading) {
    const heading = document.querySelector(`#view-${name} h1`);
    heading.setAttribute("tabindex", "-1");
    heading.focus({ preventScroll: false });
  }
}

function showList(filters, focus) {
  show("list", focus);
  document.title = "Tasks · taskmon";
  const changed = filters.status !== list.filters.status || filters.task_type !== list.filters.task_type;
  list.setFilters(filters);
  if (changed || !list.loaded) list.markLoading();
  openListStream();
}

async function showDetail(id, focus) {
  if (view === "detail" && detail.id === id) return;
  detail.reset(id);
  show("detail", false);
  document.title = "Task · taskmon";
  let task;
  try {
    task = await fetchTask(id);
  } catch (err) {
    // Server unreachable: open the stream anyway; EventSource keeps retrying and starts with the snapshot.
    console.debug("taskmon: snapshot fetch failed, relying on the stream", err);
    task = undefined;
  }
  if (detail.id !== id || view !== "detail") return; // navigated away meanwhile
  if (task === null) {
    taskMissing(id);
    return;
  }
  if (task) detail.apply(task);
  if (focus) {
    const heading = $("detail-title");
    heading.setAttribute("tabindex", "-1");
    heading.focus();
  }
  if (task && isTerminal(task)) openListStream();
  else openTaskStream(id);
}

function showNew(focus) {
  show("new", focus);
  document.title = "New graph build · taskmon";
  openListStream(); // keeps the task list current in the background, one stream as always
}

function parseFilters(query) {
  const params = new URLSearchParams(query);
  const status = params.get("status") ?? "";
  return {
    status: ["pending", "processing", "completed", "failed"].includes(status) ? status : "",
    task_type: (params.get("task_type") ?? "").trim(),
  };
}

function route(focus = true) {
  let hash = location.hash || "#/";
  if (!hash.startsWith("#/")) {
    if (view) return; // an in-page anchor, not a route
    hash = "#/";
  }
  const task = hash.match(/^#\/task\/([^/?#]+)/);
  if (task) {
    showDetail(decodeURIComponent(task[1]), focus);
  } else if (hash.startsWith("#/new")) {
    showNew(focus);
  } else {
    const q = hash.indexOf("?");
    showList(parseFilters(q >= 0 ? hash.slice(q + 1) : ""), focus);
  }
}

// ---- filters ------------------------------------------------------------------------------

function applyFilters() {
  const params = new URLSearchParams();
  const status = $("filter-status").value;
  const type = $("filter-type").value.trim();
  if (status) params.set("status", status);
  if (type) params.set("task_type", type);
  const query = params.toString();
  history.replaceState(null, "", `#/${query ? `?${query}` : ""}`);
  route(false);
}

let typeTimer = null;
$("filter-status").addEventListener("change", applyFilters);
$("filter-type").addEventListener("input", () => {
  clearTimeout(typeTimer);
  typeTimer = setTimeout(applyFilters, 300);
});
$("filters").addEventListener("submit", (event) => {
  event.preventDefault();
  clearTimeout(typeTimer);
  applyFilters();
});

// ---- start --------------------------------------------------------------------------------

setupBuildForm((taskId) => { location.hash = `#/task/${encodeURIComponent(taskId)}`; });
// The skip link must not change the route (the hash holds it): move focus instead.
document.querySelector(".skip-link").addEventListener("click", (event) => {
  event.preventDefault();
  $("main").focus();
});
window.addEventListener("hashchange", () => route(true));
setInterval(() => {
  list.tick();
  detail.tick();
}, 5000);
route(false);
