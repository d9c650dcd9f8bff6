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

export function getToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null; // storage disabled: the token then lives only as long as the form answer
  }
}

function saveToken(token) {
  try {
    sessionStorage.setItem(TOKEN_KEY, token);
  } catch {
    memoryToken = token;
  }
}

let memoryToken = null;
/** The token this tab holds (session storage, or memory when storage is disabled), or null. */
export const currentToken = () => getToken() ?? memoryToken;

// One token form for the whole page: concurrent 401s wait for the same answer.
let pendingAsk = null;
const askListeners = new Set();

/** fn(true) when the page starts waiting for a token, fn(false) once it has one. */
export function onTokenWait(fn) {
  askListeners.add(fn);
}

/** Show the token form and resolve once the user submits it. */
export function askForToken(reason, rejected = false) {
  if (pendingAsk) return pendingAsk;
  const section = $("auth");
  const form = $("auth-form");
  const input = $("auth-token");
  $("auth-reason").textContent = reason;
  $("auth-error").textContent = rejected ? "That token was not accepted. Try again." : "";
  section.hidden = false;
  for (const fn of askListeners) fn(true);
  input.value = "";
  input.focus();
  pendingAsk = new Promise((resolve) => {
    form.addEventListener("submit", function onSubmit(event) {
      event.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      form.removeEventListener("submit", onSubmit);
      saveToken(token);
      section.hidden = true;
      pendingAsk = null;
      for (const fn of askListeners) fn(false);
      resolve(token);
    });
  });
  return pendingAsk;
}

/**
 * fetch() that sends the session token, asks for one on a 401 and retries,
 * and turns the JSON error envelope into an ApiError.
 */
export async function api(path, { method = "GET", json, body, signal } = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = { Accept: "application/json" };
    const token = currentToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    let payload = body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(json);
    }
    const response = await fetch(path, { method, headers, body: payload, signal, cache: "no-store" });
    if (response.status === 401) {
      const reason = method === "GET"
        ? "This server needs an access token to show tasks."
        : "Starting a build needs the server's API token.";
      await askForToken(reason, attempt > 0 || Boolean(token));
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
