// taskmon live page: routes (#/, #/task/{id}, #/new) fed by one live connection per browser.
//
// The stream: the unfiltered `tasks/stream`, shared by every tab of this profile through a
// SharedWorker (stream.js; one EventSource per tab where that does not exist). Each view reads what
// it shows when it appears and again at every new epoch of the stream (it was (re)opened: what
// happened meanwhile is known only from a fresh read), then applies the stream's events with a
// higher version: the list (a page of GET api/graph/tasks with the filters of the address, whose
// rules list.js also applies to events; counts from GET api/tasks/counts) and a task (GET
// api/graph/task/{id}, its log from GET api/tasks/{id}/events; `stale` events drive its badge).
import { $, setText } from "./dom.js";
import { api, currentToken, onTokenWait } from "./api.js";
import { ConnState, openHub } from "./stream.js";
import { TaskList, filterParams, parseFilters, sameFilters } from "./list.js";
import { TaskDetail, fetchTask } from "./detail.js";
import { setupBuildForm } from "./build.js";

const conn = new ConnState();
const list = new TaskList();
const detail = new TaskDetail();
// A live task that has been quiet for a while is read again now and then: the all-tasks stream
// announces `stale` only for tasks it knows the tab may hold (see README "The live page").
detail.onQuiet = (id) => { if (view === "detail") loadDetail(id); };
let view = null;

// `?test` in the page address keeps a log of every task version this tab received (the tab tests
// check that none is missed or out of order). Nothing is recorded otherwise.
const TEST_LOG = new URLSearchParams(location.search).has("test") ? (window.__taskmonSeen = []) : null;
const record = (via, task) => TEST_LOG?.push({ via, id: task.task_id, version: task.version });

const CONN_LABELS = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  offline: "Offline — retrying",
  token: "Token needed",
};

conn.onChange((state) => {
  const el = $("conn");
  el.dataset.state = state;
  setText(el.querySelector(".conn-label"), CONN_LABELS[state] ?? state);
});

// ---- the stream ---------------------------------------------------------------------------

const hub = openHub("tasks/stream", {
  state: (state) => {
    $("conn").dataset.mode = hub?.mode ?? "";
    conn.stream(state);
  },
  epoch: () => resync(),
  event: (name, data) => {
    if (name === "task") {
      record("event", data);
      list.upsert(data);
      detail.apply(data);
    } else if (name === "stale") {
      detail.applyStale(data);
      list.applyStale(data);
    } else if (name === "removed") {
      list.remove(data);
      if (detail.id === data.task_id && view === "detail") taskMissing(data.task_id);
    }
  },
  // The browser gave up on the stream (e.g. 401 or 503): probe with fetch, which asks for a token on
  // a 401. Retry at once only with a new token; otherwise the stream's own backoff decides.
  probe: async () => {
    const before = currentToken();
    await api("api/graph/tasks?limit=1");
    return currentToken() !== before;
  },
});
$("conn").dataset.mode = hub.mode;
hub.need(true, currentToken());
onTokenWait((waiting) => {
  conn.hold(waiting ? "token" : null);
  hub.need(!waiting, currentToken());
});
window.addEventListener("offline", () => conn.browserOffline());

/** The stream (re)started: read again what this tab shows. */
function resync() {
  if (view === "detail") loadDetail(detail.id);
  else if (view) loadList();
}

function loadList() {
  list.load().catch((err) => {
    // Server unreachable: the stream's next epoch reads again.
    console.debug("taskmon: reading the list failed", err);
  });
}

async function loadDetail(id) {
  let task;
  try {
    task = await fetchTask(id);
  } catch (err) {
    console.debug("taskmon: reading the task failed, the next epoch reads again", err);
    return;
  }
  if (detail.id !== id || view !== "detail") return; // navigated away meanwhile
  if (task === null) {
    taskMissing(id);
    return;
  }
  record("read", task);
  detail.apply(task);
}

function taskMissing(id) {
  if (detail.id !== id) return;
  detail.showError("There is no task with this id (it may have been removed by retention cleanup).");
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
  const changed = !sameFilters(filters, list.filters);
  list.setFilters(filters);
  if (changed || !list.loaded) list.markLoading();
  loadList();
}

async function showDetail(id, focus) {
  if (view === "detail" && detail.id === id) return;
  detail.reset(id);
  show("detail", false);
  document.title = "Task · taskmon";
  await loadDetail(id);
  if (focus && detail.id === id && view === "detail") {
    const heading = $("detail-title");
    heading.setAttribute("tabindex", "-1");
    heading.focus();
  }
}

function showNew(focus) {
  show("new", focus);
  document.title = "New graph build · taskmon";
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

/** The filters live in the address (#/?q=...&status=...&task_type=...&sort=...): share it, reload it. */
function applyFilters(changes = {}) {
  const filters = {
    q: $("filter-q").value.trim(),
    status: list.filters.status,
    task_type: $("filter-type").value.trim(),
    sort: $("filter-sort").value,
    ...changes,
  };
  const query = filterParams(filters).toString();
  history.replaceState(null, "", `#/${query ? `?${query}` : ""}`);
  route(false);
}

const debounced = (fn, ms) => {
  let timer = null;
  const run = () => { clearTimeout(timer); fn(); };
  run.later = () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
  run.cancel = () => clearTimeout(timer);
  return run;
};
const typed = debounced(() => applyFilters(), 300);
for (const tab of document.querySelectorAll("#status-tabs [data-status]")) {
  tab.addEventListener("click", () => { typed.cancel(); applyFilters({ status: tab.dataset.status }); });
}
$("filter-sort").addEventListener("change", () => { typed.cancel(); applyFilters(); });
$("filter-q").addEventListener("input", () => typed.later());
$("filter-type").addEventListener("input", () => typed.later());
$("filters").addEventListener("submit", (event) => {
  event.preventDefault();
  typed();
});

// ---- start --------------------------------------------------------------------------------

setupBuildForm((taskId) => { location.hash = `#/task/${encodeURIComponent(taskId)}`; });
// The skip link must not change the route (the hash holds it): move focus instead.
document.querySelector(".skip-link").addEventListener("click", (event) => {
  event.preventDefault();
  $("main").focus();
});
window.addEventListener("hashchange", () => route(true));
setInterval(() => list.tick(), 5000);
setInterval(() => { if (view === "detail") detail.tick(); }, 1000); // duration, "no update for"
route(false);
