// One EventSource and its reconnection, with no DOM: it runs inside the shared worker
// (stream-worker.js, one per browser profile) or, where SharedWorker does not exist, in the tab.
//
// Reconnection has two layers:
//  * the browser's own: after a dropped connection EventSource stays CONNECTING, waits `retry:` ms
//    and reconnects. State "down".
//  * ours: when the browser gives up (readyState CLOSED: a non-200 answer such as 401 or 503) the
//    state is "closed" and we reopen with exponential backoff and jitter; retryNow() skips the wait
//    (a tab calls it once its probe says the server answers again, e.g. after a token was entered).
//
// Every `snapshot` starts a new epoch: the all-tasks stream has no ids, so whatever happened while
// it was down is known only from a fresh read. Whoever shows tasks re-reads them when the epoch
// changes and applies later events by version.

const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 30_000;

/** The events of `tasks/stream` (PROTOCOL.md; `stale` is the v1.1 addition). */
export const STREAM_EVENTS = ["snapshot", "task", "removed", "stale"];

/**
 * The stream's URL. `base` is the absolute URL of `tasks/stream` (resolved by the page against its
 * own address); `followed` is for the coming `follow=<task_id>` parameter, unused until the server
 * knows it (today it answers 400 to unknown parameters): flip FOLLOW_PARAM then.
 */
const FOLLOW_PARAM = false;
export function allTasksUrl(base, token, followed = []) {
  const url = new URL(base);
  if (FOLLOW_PARAM) for (const id of followed) url.searchParams.append("follow", id);
  if (token) url.searchParams.set("access_token", token);
  return url.href;
}

export class StreamCore {
  /** onState(state, epoch); onEvent(name, rawData). States: idle connecting live down closed. */
  constructor({ onState, onEvent }) {
    this.onState = onState;
    this.onEvent = onEvent;
    this.url = null;
    this.es = null;
    this.state = "idle";
    this.epoch = 0;
    this.closedRuns = 0;
    this.retryTimer = null;
  }

  /** Keep the stream open at `url` (reopened when the URL changes). */
  start(url) {
    if (url === this.url && (this.es || this.retryTimer)) return;
    this.stop();
    this.url = url;
    this.closedRuns = 0;
    this.#connect();
  }

  stop() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (this.es) this.es.close();
    this.es = null;
    this.url = null;
    this.#set("idle");
  }

  /** Reopen now if the browser gave up (CLOSED) and we are waiting out a backoff. */
  retryNow(url = this.url) {
    if (!url) return;
    if (this.es && this.es.readyState !== EventSource.CLOSED && url === this.url) return;
    this.stop();
    this.url = url;
    this.#connect();
  }

  #connect() {
    this.retryTimer = null;
    const es = new EventSource(this.url);
    this.es = es;
    if (this.state !== "down" && this.state !== "closed") this.#set("connecting");
    es.onopen = () => {
      if (this.es !== es) return;
      this.closedRuns = 0;
      this.#set("live");
    };
    for (const name of STREAM_EVENTS) {
      es.addEventListener(name, (event) => {
        if (this.es !== es) return; // a late event from a stream we already left
        if (name === "snapshot") {
          this.epoch += 1;
          this.#set("live", true);
        }
        this.onEvent(name, event.data);
      });
    }
    es.onerror = () => {
      if (this.es !== es) return;
      if (es.readyState === EventSource.CLOSED) {
        es.close();
        this.es = null;
        const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.closedRuns);
        this.closedRuns += 1;
        this.retryTimer = setTimeout(() => this.#connect(), base / 2 + Math.random() * (base / 2));
        this.#set("closed");
      } else {
        this.#set("down"); // CONNECTING: the browser retries by itself
      }
    };
  }

  #set(state, force = false) {
    if (this.state === state && !force) return;
    this.state = state;
    this.onState(state, this.epoch);
  }
}
