// The tab's side of the live connection.
//
// One connection per browser profile, not per tab (issue 14): the tabs share one EventSource on the
// unfiltered `tasks/stream`, held by a SharedWorker (stream-worker.js). Where SharedWorker does not
// exist (Chrome on Android, old Safari) or the worker fails to start, the tab holds its own
// EventSource (the same StreamCore), as before.
//
// The hub tells the page three things: the connection state, every stream event, and the epoch (a
// new `snapshot` arrived: the stream was (re)opened and what happened before is known only from a
// fresh read). Views read what they show (GET) when they appear and whenever the epoch changes, and
// apply events with a higher version than the one they hold.
import { StreamCore, allTasksUrl } from "./stream-core.js";

const OFFLINE_AFTER_MS = 10_000;
const WORKER_ANSWER_MS = 3000;

/** The conn indicator: connecting / live / reconnecting / offline, plus "token" held by the page. */
export class ConnState {
  constructor() {
    this.state = "connecting";
    this.shown = "connecting";
    this.override = null;
    this.listeners = new Set();
    this.downSince = null;
    this.offlineTimer = null;
  }

  onChange(fn) {
    this.listeners.add(fn);
    fn(this.shown);
  }

  /** A state of the stream (stream-core.js). */
  stream(state) {
    if (state === "live") {
      this.downSince = null;
      clearTimeout(this.offlineTimer);
      this.#set("live");
    } else if (state === "down" || state === "closed") {
      this.#markDown();
    } else if (state === "connecting" && this.downSince === null) {
      this.#set("connecting");
    }
  }

  browserOffline() {
    this.#markDown();
  }

  /** Show a state the stream cannot see itself ("token") unless it is live; hold(null) undoes it. */
  hold(state) {
    this.override = state;
    this.#emit();
  }

  #markDown() {
    if (this.downSince === null) this.downSince = Date.now();
    const offline = navigator.onLine === false || Date.now() - this.downSince >= OFFLINE_AFTER_MS;
    this.#set(offline ? "offline" : "reconnecting");
    clearTimeout(this.offlineTimer);
    if (!offline) {
      this.offlineTimer = setTimeout(() => {
        if (this.downSince !== null) this.#set("offline");
      }, OFFLINE_AFTER_MS - (Date.now() - this.downSince));
    }
  }

  #set(state) {
    if (this.state === state) return;
    this.state = state;
    this.#emit();
  }

  #emit() {
    const shown = this.override && this.state !== "live" ? this.override : this.state;
    if (shown === this.shown) return;
    this.shown = shown;
    for (const fn of this.listeners) fn(shown);
  }
}

/**
 * handlers = {state(state), event(name, data), epoch(), probe: async () => boolean}
 * probe() runs once each time the browser gives up on the stream (401, 503...); it may ask the user
 * for a token, and returns true to retry at once (with the new token) instead of after the backoff.
 * Returns {mode, need(bool, token)}.
 */
export function openHub(streamPath, handlers) {
  const base = new URL(streamPath, document.baseURI).href;
  const hub = typeof SharedWorker === "function" ? sharedHub(base, handlers) : null;
  return hub ?? localHub(base, handlers);
}

function makeDispatch(handlers, retry) {
  let epoch = null;
  let probing = false;
  return {
    reset() { epoch = null; },
    state(state, newEpoch) {
      handlers.state(state);
      if (state === "live" && newEpoch > 0 && newEpoch !== epoch) {
        epoch = newEpoch;
        handlers.epoch();
      }
      if (state === "closed" && !probing) {
        probing = true;
        handlers.probe()
          .then((ok) => { if (ok) retry(); })
          .catch((err) => console.debug("taskmon: stream recovery probe failed", err))
          .finally(() => { probing = false; });
      }
    },
    event(name, raw) {
      let data;
      try {
        data = JSON.parse(raw);
      } catch (err) {
        console.warn(`taskmon: ignoring a ${name} event that is not JSON`, err);
        return;
      }
      handlers.event(name, data);
    },
  };
}

function localHub(base, handlers) {
  let token = null;
  const core = new StreamCore({
    onState: (state, epoch) => dispatch.state(state, epoch),
    onEvent: (name, raw) => { if (name !== "snapshot") dispatch.event(name, raw); },
  });
  const dispatch = makeDispatch(handlers, () => core.retryNow(allTasksUrl(base, token)));
  window.addEventListener("online", () => core.retryNow());
  return {
    mode: "tab",
    need(need, newToken) {
      token = newToken;
      if (need) core.start(allTasksUrl(base, token));
      else {
        core.stop();
        dispatch.reset();
      }
    },
  };
}

function sharedHub(base, handlers) {
  let worker;
  try {
    worker = new SharedWorker(new URL("stream-worker.js", import.meta.url), { type: "module", name: "taskmon-stream" });
  } catch (err) {
    console.info("taskmon: no shared worker, this tab opens its own stream", err);
    return null;
  }
  const port = worker.port;
  const tab = crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
  let fallback = null;   // the local hub, once the worker turned out not to work
  let answered = false;
  let wanted = null;     // the last need() call, replayed on a fallback
  let token = null;
  const dispatch = makeDispatch(handlers, () => port.postMessage({ type: "retry", token }));

  const useLocal = (why) => {
    if (fallback || answered) return;
    console.warn(`taskmon: the shared worker did not start (${why}); this tab opens its own stream`);
    fallback = localHub(base, handlers);
    hub.mode = "tab";
    if (wanted) fallback.need(...wanted);
  };
  worker.onerror = (event) => useLocal(event.message || "error");
  const timer = setTimeout(() => useLocal("no answer"), WORKER_ANSWER_MS);

  port.onmessage = ({ data }) => {
    if (fallback) return;
    if (!answered) {
      answered = true;
      clearTimeout(timer);
    }
    if (data.type === "welcome") return;
    if (data.type === "state") dispatch.state(data.state, data.epoch);
    else if (data.type === "event") dispatch.event(data.name, data.data);
  };
  port.start();

  // The worker learns that this tab is gone when the lock is free (closed, crashed, navigated).
  const hello = () => port.postMessage({ type: "hello", tab });
  if (navigator.locks) {
    let granted;
    const held = new Promise((resolve) => { granted = resolve; });
    navigator.locks.request(`taskmon-tab:${tab}`, () => {
      granted();
      return new Promise(() => {}); // held for the tab's lifetime
    }).catch((err) => console.warn("taskmon: cannot hold the tab lock", err));
    held.then(hello);
  } else {
    hello();
  }
  window.addEventListener("pagehide", () => port.postMessage({ type: "bye" }));
  // Back from the back/forward cache: the worker has let this tab go; start afresh.
  window.addEventListener("pageshow", (event) => { if (event.persisted) location.reload(); });
  window.addEventListener("online", () => port.postMessage({ type: "retry", token }));

  const hub = {
    mode: "shared",
    need(need, newToken) {
      wanted = [need, newToken];
      token = newToken;
      if (fallback) {
        fallback.need(need, newToken);
        return;
      }
      if (!need) dispatch.reset();
      port.postMessage({ type: "want", need, url: base, token });
    },
  };
  return hub;
}
