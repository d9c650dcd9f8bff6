// The browser profile's one connection to taskmon: a SharedWorker holding one EventSource on the
// unfiltered `tasks/stream` and passing every event to the tabs that need it (over MessagePorts).
// Browsers allow six HTTP/1.1 connections per host; with a stream per tab the seventh tab never
// loaded (issue 14). Closing any tab, including the one that started the worker, leaves the stream
// alone; the worker closes it when no tab needs it any more and ends with the last tab.
//
// Why a SharedWorker rather than a leader tab (Web Locks + BroadcastChannel): the connection lives
// outside every tab, so closing, reloading or freezing any tab never drops it: no hand-over, no gap,
// no missed version (the all-tasks stream has no ids to resume from). A leader tab would reopen the
// stream on every hand-over, and a throttled background leader delays every tab. Cost: no
// SharedWorker on Chrome for Android (the tab then opens its own stream), and its console lives at
// chrome://inspect/#workers (Firefox: about:debugging#workers).
//
// tab -> worker: {type: "hello", tab}                  the tab holds the Web Lock "taskmon-tab:<tab>"
//                {type: "want", need, url, token}      url: absolute `tasks/stream`; token or null
//                {type: "retry", token}                the tab's probe says the server answers again
//                {type: "bye"}                         pagehide
// worker -> tab: {type: "welcome"}                     the worker runs
//                {type: "state", state, epoch}         see stream-core.js
//                {type: "event", name, data}           data: the event's raw JSON text
import { StreamCore, allTasksUrl } from "./stream-core.js";

const ports = new Map(); // MessagePort -> {need, url, token}
let token = null;        // a token a tab gave (tabs keep theirs in session storage)
let base = null;

const core = new StreamCore({
  onState: (state, epoch) => post({ type: "state", state, epoch }),
  onEvent: (name, data) => {
    if (name === "snapshot") return; // the epoch says it; each tab re-reads what it shows
    post({ type: "event", name, data });
  },
});

function post(message, only = null) {
  for (const [port, info] of ports) {
    if ((only === null || port === only) && info.need) port.postMessage(message);
  }
}

function update() {
  const needed = [...ports.values()].some((info) => info.need);
  if (!needed) {
    core.stop();
    return;
  }
  core.start(allTasksUrl(base, token));
}

function forget(port) {
  if (!ports.delete(port)) return;
  port.close();
  update();
}

/** The tab is gone once its lock is free: a closed or crashed tab sends no "bye". */
function watchTab(port, tab) {
  if (!self.navigator.locks) return; // then "bye" (pagehide) is all we have
  self.navigator.locks.request(`taskmon-tab:${tab}`, () => forget(port)).catch((err) => {
    console.warn("taskmon worker: cannot watch a tab's lock", err);
  });
}

self.onconnect = (event) => {
  const port = event.ports[0];
  ports.set(port, { need: false });
  port.onmessage = ({ data }) => {
    const info = ports.get(port);
    if (!info || !data || typeof data !== "object") return;
    switch (data.type) {
      case "hello":
        watchTab(port, String(data.tab));
        port.postMessage({ type: "welcome" });
        break;
      case "want":
        info.need = Boolean(data.need);
        if (data.url) base = data.url;
        // A token just typed may be wrong: it replaces a working one only through "retry", which a
        // tab sends once the server accepted its token.
        if (data.token && !token) token = data.token;
        update();
        // Sent after the port counts as needing: every event from now on reaches this tab, so a
        // read it starts after this message misses nothing.
        if (info.need) post({ type: "state", state: core.state, epoch: core.epoch }, port);
        break;
      case "retry":
        if (data.token) token = data.token;
        if (base && [...ports.values()].some((i) => i.need)) core.retryNow(allTasksUrl(base, token));
        break;
      case "bye":
        forget(port);
        break;
      default:
        console.warn("taskmon worker: unknown message", data.type);
    }
  };
  port.start();
};
