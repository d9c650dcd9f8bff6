// HTTP side of the page: the session token and fetch with Authorization. Every URL the page uses is
// relative ("api/...", "tasks/stream"): it resolves against the page's own address, so the page works
// when taskmon is mounted under a prefix or behind a proxy's root path.
import { $ } from "./dom.js";

const TOKEN_KEY = "taskmon.token";

export class ApiError extends Error {
  constructor(status, message, body = null) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

const PRODUCER_KEY = "taskmon.producer_token";
const memory = new Map(); // when session storage is disabled: the token lives as long as the tab

function stored(key) {
  try {
    return sessionStorage.getItem(key) ?? memory.get(key) ?? null;
  } catch {
    return memory.get(key) ?? null;
  }
}

function save(key, token) {
  try {
    sessionStorage.setItem(key, token);
  } catch {
    memory.set(key, token);
  }
}

export const getToken = () => stored(TOKEN_KEY);
/** The read token this tab holds (session storage, or memory when storage is disabled), or null. */
export const currentToken = () => stored(TOKEN_KEY);
/** The producer (API) token for changes (cancel, builds), asked for on their first 401. */
export const producerToken = () => stored(PRODUCER_KEY);

// One token form for the whole page: concurrent 401s wait for the same answer.
let pendingAsk = null;
const askListeners = new Set();

/** fn(true) when the page starts waiting for a token, fn(false) once it has one. */
export function onTokenWait(fn) {
  askListeners.add(fn);
}

/** Show the token form and resolve once the user submits it. */
export function askForToken(reason, rejected = false, { key = TOKEN_KEY } = {}) {
  if (pendingAsk) return pendingAsk;
  const section = $("auth");
  const form = $("auth-form");
  const input = $("auth-token");
  $("auth-reason").textContent = reason;
  $("auth-error").textContent = rejected ? "That token was not accepted. Try again." : "";
  section.hidden = false;
  // Only a missing read token stops the page's reads (and the stream); a producer token does not.
  const holds = key === TOKEN_KEY;
  if (holds) for (const fn of askListeners) fn(true);
  input.value = "";
  input.focus();
  pendingAsk = new Promise((resolve) => {
    form.addEventListener("submit", function onSubmit(event) {
      event.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      form.removeEventListener("submit", onSubmit);
      save(key, token);
      section.hidden = true;
      pendingAsk = null;
      if (holds) for (const fn of askListeners) fn(false);
      resolve(token);
    });
  });
  return pendingAsk;
}

/**
 * fetch() that sends the session token, asks for one on a 401 and retries,
 * and turns the JSON error envelope into an ApiError.
 */
export async function api(path, { method = "GET", json, body, signal, reason } = {}) {
  // Reads send the read token; changes the producer token (else the read token: one token may be both).
  const write = method !== "GET";
  for (let attempt = 0; ; attempt++) {
    const headers = { Accept: "application/json" };
    const token = write ? producerToken() ?? currentToken() : currentToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    let payload = body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(json);
    }
    const response = await fetch(path, { method, headers, body: payload, signal, cache: "no-store" });
    if (response.status === 401) {
      const why = reason ?? (write ? "This change needs the server's producer (API) token." : "This server needs an access token to show tasks.");
      await askForToken(why, attempt > 0 || (write ? Boolean(producerToken()) : Boolean(token)), { key: write ? PRODUCER_KEY : TOKEN_KEY });
      continue;
    }
    let data = null;
    const type = response.headers.get("Content-Type") || "";
    if (type.includes("json")) data = await response.json();
    if (!response.ok) {
      const message = (data && typeof data.error === "string" && data.error) || `${response.status} ${response.statusText}`;
      throw new ApiError(response.status, message, data);
    }
    return data;
  }
}
