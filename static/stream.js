// The page's one EventSource. Views ask for a stream by key; opening a new one closes the old one,
// so a tab never holds more than one connection (browsers allow six per origin across all tabs).
//
// Reconnection has two layers:
//  * the browser's own: after a dropped connection EventSource stays CONNECTING, waits `retry:` ms
//    and reconnects with Last-Event-ID. We show "reconnecting".
//  * ours: when the browser gives up (readyState CLOSED: a non-200 answer such as 401, 404, 503, 204)
//    we ask the stream's `recover()` what to do (it may fetch a snapshot or ask for a token) and
//    reopen with exponential backoff and jitter.

const OFFLINE_AFTER_MS = 10_000;
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 30_000;

export class Connection {
  constructor() {
    this.es = null;
    this.key = null;
    this.spec = null;
    this.state = "connecting";
    this.shown = "connecting";
    this.override = null;
    this.listeners = new Set();
    this.downSince = null;
    this.closedRuns = 0;     // consecutive times the browser gave up; drives the backoff
    this.retryTimer = null;
    this.offlineTimer = null;
    window.addEventListener("online", () => this.#retryNow());
    window.addEventListener("offline", () => { if (this.spec) this.#setState("offline"); });
  }

  onState(fn) {
    this.listeners.add(fn);
    fn(this.shown);
  }

  /**
   * Open the stream `key` unless it is the one already open.
   * spec = { url: () => string, events: {name: (data, event) => void}, recover: async () => boolean }
   */
  open(key, spec) {
    if (this.key === key && (this.es || this.retryTimer)) return;
    this.close();
    this.key = key;
    this.spec = spec;
    this.closedRuns = 0;
    this.#connect();
  }

  close() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (this.es) this.es.close();
    this.es = null;
    this.key = null;
    this.spec = null;
  }

  #connect() {
    const spec = this.spec;
    const es = new EventSource(spec.url());
    this.es = es;
    if (this.state !== "live" && this.downSince === null) this.#setState("connecting");

    es.onopen = () => {
      if (this.es !== es) return;
      this.closedRuns = 0;
      this.downSince = null;
      this.#setState("live");
    };
    for (const [name, handler] of Object.entries(spec.events)) {
      es.addEventListener(name, (event) => {
        if (this.es !== es) return; // a late event from a stream we already left
        let data;
        try {
          data = JSON.parse(event.data);
        } catch (err) {
          console.warn(`taskmon: ignoring a ${name} event that is not JSON`, err);
          return;
        }
        handler(data, event);
      });
    }
    es.onerror = () => {
      if (this.es !== es) return;
      this.#markDown();
      if (es.readyState === EventSource.CLOSED) {
        es.close();
        this.es = null;
        this.#recoverLater(spec);
      }
      // CONNECTING: the browser retries by itself, with Last-Event-ID.
    };
  }

  #recoverLater(spec) {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.closedRuns);
    const delay = base / 2 + Math.random() * (base / 2);
    this.closedRuns += 1;
    this.retryTimer = setTimeout(() => this.#recover(spec), delay);
  }

  async #recover(spec) {
    this.retryTimer = null;
    if (this.spec !== spec) return;
    let again = true;
    try {
      again = await spec.recover();
    } catch (err) {
      // The probe itself failed (server still down): keep trying with a longer wait.
      console.debug("taskmon: stream recovery probe failed", err);
    }
    if (this.spec !== spec) return; // someone switched streams meanwhile
    if (again) this.#connect();
  }

  /**
   * Show a state the stream cannot see itself ("token" while the page waits for a token) unless
   * the stream is live anyway; hold(null) shows the real state again.
   */
  hold(state) {
    this.override = state;
    this.#emit();
  }

  #retryNow() {
    if (this.retryTimer && this.spec) {
      clearTimeout(this.retryTimer);
      this.#recover(this.spec);
    }
  }

  #markDown() {
    if (this.downSince === null) this.downSince = Date.now();
    const offline = navigator.onLine === false || Date.now() - this.downSince >= OFFLINE_AFTER_MS;
    this.#setState(offline ? "offline" : "reconnecting");
    clearTimeout(this.offlineTimer);
    if (!offline) {
      this.offlineTimer = setTimeout(() => {
        if (this.downSince !== null) this.#setState("offline");
      }, OFFLINE_AFTER_MS - (Date.now() - this.downSince));
    }
  }

  #setState(state) {
    if (state === "live") clearTimeout(this.offlineTimer);
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
