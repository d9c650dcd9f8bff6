// Turning task fields into short readable text. Pure functions, no DOM.

export const TERMINAL = new Set(["completed", "failed"]);

export const isTerminal = (task) => TERMINAL.has(task.status);

export const shortId = (id) => String(id).slice(0, 8);

const STATUS_LABELS = { pending: "Pending", processing: "Processing", completed: "Completed", failed: "Failed" };

export const statusLabel = (status) => STATUS_LABELS[status] ?? String(status);

export function clampProgress(value) {
  const n = Number(value);
  if (!Number.isFinite(n)) return 0;
  return Math.max(0, Math.min(100, Math.round(n)));
}

/** "just now", "42 s ago", "3 min ago", "5 h ago", "2 d ago" */
export function age(iso, now = Date.now()) {
  const then = Date.parse(iso);
  if (Number.isNaN(then)) return "";
  const s = Math.max(0, Math.round((now - then) / 1000));
  if (s < 5) return "just now";
  if (s < 60) return `${s} s ago`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ago`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours} h ago`;
  return `${Math.floor(hours / 24)} d ago`;
}

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const dateTimeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

export function clock(iso) {
  const t = Date.parse(iso);
  return Number.isNaN(t) ? "" : timeFormat.format(t);
}

export function dateTime(iso) {
  const t = Date.parse(iso);
  return Number.isNaN(t) ? String(iso ?? "") : dateTimeFormat.format(t);
}

/** "chunk_count" -> "Chunk count" */
export function humanize(key) {
  const words = String(key).replace(/[_-]+/g, " ").replace(/([a-z])([A-Z])/g, "$1 $2").trim().toLowerCase();
  return words.charAt(0).toUpperCase() + words.slice(1);
}

export function valueText(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number") return Number.isInteger(value) ? value.toLocaleString() : String(value);
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "string") return value;
  if (Array.isArray(value)) {
    if (value.length === 0) return "none";
    if (value.every((v) => v === null || typeof v !== "object")) return clip(value.map(valueText).join(", "));
    return `${value.length} ${value.length === 1 ? "entry" : "entries"}`;
  }
  return clip(Object.entries(value).map(([k, v]) => `${humanize(k).toLowerCase()}: ${typeof v === "object" && v !== null ? JSON.stringify(v) : valueText(v)}`).join("; "));
}

const clip = (text) => (text.length > 300 ? `${text.slice(0, 299)}…` : text);

const PHASE_KEYS = ["phase", "stage", "step"];
const RETRY_KEYS = ["retries", "retry", "retry_count", "attempt", "attempts"];
const RETRY_MAX_KEYS = ["max_retries", "max_attempts", "retry_limit"];

/** Keys that say "out of how many" for a counter key `k`. */
function totalKeysFor(k) {
  const plural = k.endsWith("s") ? k : /(ch|sh|x|z)$/.test(k) ? `${k}es` : `${k}s`;
  return [`total_${plural}`, `total_${k}`, `${k}_total`, `${plural}_total`, `n_${plural}`, `${k}_count`, `num_${plural}`];
}

/**
 * progress_detail -> [[label, text], ...] in a readable order:
 * phase first, then counters as "i of n" (batch 3 of 10), then retries, then anything else.
 */
export function describeDetail(detail) {
  if (!detail || typeof detail !== "object" || Array.isArray(detail)) return [];
  const keys = Object.keys(detail);
  const used = new Set();
  const rows = [];

  for (const k of PHASE_KEYS) {
    if (k in detail && !used.has(k)) {
      used.add(k);
      const v = detail[k];
      rows.push([humanize(k), typeof v === "string" ? humanize(v) : valueText(v)]);
    }
  }

  const counters = [];
  for (const k of keys) {
    if (used.has(k) || typeof detail[k] !== "number") continue;
    const total = totalKeysFor(k).find((t) => typeof detail[t] === "number" && !used.has(t));
    if (total) {
      used.add(k);
      used.add(total);
      counters.push([humanize(k), `${valueText(detail[k])} of ${valueText(detail[total])}`]);
    }
  }
  rows.push(...counters);

  // Work items (the graph build's chunks): "12 of 40 done, 1 failed".
  if (typeof detail.items_total === "number") {
    const parts = [`${valueText(detail.items_succeeded ?? 0)} of ${valueText(detail.items_total)} done`];
    for (const [key, word] of [["items_failed", "failed"], ["items_rejected", "rejected"], ["items_processing", "in progress"]]) {
      if (detail[key]) parts.push(`${valueText(detail[key])} ${word}`);
    }
    for (const key of ["items_total", "items_succeeded", "items_failed", "items_rejected", "items_processing"]) used.add(key);
    rows.push(["Items", parts.join(", ")]);
  }

  for (const k of RETRY_KEYS) {
    if (!(k in detail) || used.has(k)) continue;
    used.add(k);
    const max = RETRY_MAX_KEYS.find((m) => m in detail && !used.has(m));
    if (max) used.add(max);
    const label = k.startsWith("attempt") ? "Attempt" : "Retries";
    rows.push([label, max ? `${valueText(detail[k])} of ${valueText(detail[max])}` : valueText(detail[k])]);
  }

  const last = detail.last_retry;
  if (last && typeof last === "object" && !Array.isArray(last) && "reason" in last) {
    used.add("last_retry");
    const what = [last.operation, last.retry !== undefined && `retry ${last.retry}${last.max_retries ? ` of ${last.max_retries}` : ""}`]
      .filter(Boolean).join(" ");
    const wait = typeof last.delay_s === "number" ? ` after ${last.delay_s} s` : "";
    rows.push(["Last retry", `${what}${wait}: ${valueText(last.reason)}`]);
  }

  for (const k of keys) {
    if (!used.has(k)) rows.push([humanize(k), valueText(detail[k])]);
  }
  return rows;
}

/** 42 -> "42 s", 192 -> "3 min 12 s", 7500 -> "2 h 5 min", 300000 -> "3 d 11 h" */
export function duration(seconds) {
  const s = Math.max(0, Math.round(Number(seconds)));
  if (!Number.isFinite(s)) return "";
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return s % 60 ? `${m} min ${s % 60} s` : `${m} min`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return m % 60 ? `${hours} h ${m % 60} min` : `${hours} h`;
  const days = Math.floor(hours / 24);
  return hours % 24 ? `${days} d ${hours % 24} h` : `${days} d`;
}

/** Percentage points per second: "2.5 %/s", "0.12 %/s". */
export function rateText(rate) {
  const r = Number(rate);
  if (rate === null || rate === undefined || !Number.isFinite(r)) return "—";
  const digits = Math.abs(r) >= 10 ? 0 : Math.abs(r) >= 1 ? 1 : Math.abs(r) >= 0.1 ? 2 : 3;
  return `${r.toFixed(digits)} %/s`;
}
