// Small DOM helpers. Everything that comes from a task goes in through textContent
// (or an attribute), never through innerHTML.

export const $ = (id) => document.getElementById(id);

const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  setAttrs(el, attrs);
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** h("span", {class: "badge", "data-x": 1}, "text", childNode): strings become text nodes. */
export const h = (tag, attrs = {}, ...children) => build(document.createElement(tag), attrs, children);

/** The same for SVG elements. */
export const svg = (tag, attrs = {}, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children);

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    el.setAttribute(key, value === true ? "" : String(value));
  }
}

/** Set text only when it changed (keeps screen readers and selection calm). */
export function setText(el, text) {
  const value = text === null || text === undefined ? "" : String(text);
  if (el.textContent !== value) el.textContent = value;
}

let announceTimer = null;

/** Say something through the polite live region. */
export function announce(text) {
  const region = $("announcer");
  clearTimeout(announceTimer);
  region.textContent = "";
  // A fresh text node after a tick makes repeated identical messages announce again.
  announceTimer = setTimeout(() => { region.textContent = text; }, 50);
}
