// Small helpers for drawing the console: elements (never HTML strings: message bodies and
// headers are data, not markup), times in the browser's zone with UTC on hover, numbers,
// the confirmation dialog and the notices.

export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on") && typeof value === "function") {
      node.addEventListener(key.slice(2), value);
    } else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(node, ...children) {
  const fragment = document.createDocumentFragment();
  append(fragment, children);
  node.replaceChildren(fragment);
}

const dateTime = new Intl.DateTimeFormat(undefined, {
  year: "numeric", month: "short", day: "numeric",
  hour: "2-digit", minute: "2-digit", second: "2-digit",
});
const timeOnly = new Intl.DateTimeFormat(undefined, {
  hour: "2-digit", minute: "2-digit", second: "2-digit",
});
const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const decimal = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

export const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";

export function utc(ms) {
  return new Date(ms).toISOString().replace(".000Z", "Z").replace("T", " ") + " UTC";
}

// A <time>: the browser's zone, UTC on hover (and for screen readers, the datetime).
export function time(ms, { withRelative = false, short = false } = {}) {
  if (ms === null || ms === undefined) return h("span", { class: "muted", text: "—" });
  const sameDay = new Date(ms).toDateString() === new Date().toDateString();
  const shown = short && sameDay ? timeOnly.format(ms) : dateTime.format(ms);
  const node = h("time", {
    datetime: new Date(ms).toISOString(), title: utc(ms), text: shown,
  });
  if (!withRelative) return node;
  return h("span", { class: "when" }, node, h("span", { class: "rel", text: ago(ms) }));
}

export function ago(ms, now = Date.now()) {
  const seconds = Math.round((ms - now) / 1000);
  const abs = Math.abs(seconds);
  if (abs < 45) return relative.format(seconds, "second");
  if (abs < 45 * 60) return relative.format(Math.round(seconds / 60), "minute");
  if (abs < 36 * 3600) return relative.format(Math.round(seconds / 3600), "hour");
  return relative.format(Math.round(seconds / 86400), "day");
}

export function count(n) {
  return n === null || n === undefined ? "—" : integer.format(n);
}

export function rate(perMinute) {
  if (perMinute === null || perMinute === undefined) return "—";
  return perMinute >= 100 ? integer.format(perMinute) : decimal.format(perMinute);
}

export function duration(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1) return "< 1 ms";
  if (ms < 1000) return `${integer.format(ms)} ms`;
  if (ms < 60_000) return `${decimal.format(ms / 1000)} s`;
  if (ms < 3_600_000) return `${decimal.format(ms / 60_000)} min`;
  if (ms < 86_400_000) return `${decimal.format(ms / 3_600_000)} h`;
  return `${decimal.format(ms / 86_400_000)} d`;
}

export function bytes(n) {
  if (n < 1024) return `${integer.format(n)} bytes`;
  if (n < 1024 * 1024) return `${decimal.format(n / 1024)} KiB`;
  return `${decimal.format(n / 1024 / 1024)} MiB`;
}

// A base64 body as a hex dump: offset, 16 bytes, their printable characters.
export function hexDump(base64, limit = 4096) {
  const raw = atob(base64);
  const lines = [];
  for (let offset = 0; offset < Math.min(raw.length, limit); offset += 16) {
    const chunk = raw.slice(offset, offset + 16);
    const hex = [...chunk].map((c) => c.charCodeAt(0).toString(16).padStart(2, "0")).join(" ");
    const text = [...chunk].map((c) => {
      const code = c.charCodeAt(0);
      return code >= 32 && code < 127 ? c : ".";
    }).join("");
    lines.push(`${offset.toString(16).padStart(8, "0")}  ${hex.padEnd(47)}  ${text}`);
  }
  return lines.join("\n");
}

// Text that is UTF-8 but full of control characters reads better as bytes.
export function looksBinary(text) {
  return /[\u0000-\u0008\u000e-\u001f\u007f]/.test(text);
}

export function textToHex(text) {
  const encoded = new TextEncoder().encode(text);
  let binary = "";
  for (const byte of encoded) binary += String.fromCharCode(byte);
  return btoa(binary);
}

// Ask before doing anything: a native <dialog> (Escape and "Keep it" cancel; keyboard first).
export function confirmAction({ title, text, confirm = "Confirm", danger = false }) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  const ok = document.getElementById("confirm-ok");
  ok.textContent = confirm;
  ok.className = danger ? "button danger" : "button primary";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    document.getElementById(danger ? "confirm-cancel" : "confirm-ok").focus();
  });
}

// A notice at the top of the page: what an action did, or why it failed.
export function notify(text, kind = "ok", { sticky = false } = {}) {
  const area = document.getElementById("notices");
  const close = h("button", {
    class: "notice-close", type: "button", "aria-label": "Dismiss", text: "×",
    onclick: () => notice.remove(),
  });
  const notice = h("div", { class: `notice notice-${kind}` }, h("span", { text }), close);
  area.append(notice);
  if (!sticky && kind === "ok") setTimeout(() => notice.remove(), 8000);
  return notice;
}

export function clearNotices() {
  document.getElementById("notices").replaceChildren();
}

export function empty(title, text, ...more) {
  return h("div", { class: "empty" }, h("p", { class: "empty-title", text: title }),
    text ? h("p", { class: "muted", text }) : null, ...more);
}

export function errorBox(error, what) {
  return h("div", { class: "alert alert-error", role: "alert" },
    h("strong", { text: what }), " ", error.message);
}

export function badge(state) {
  const known = {
    ready: "ok", starting: "warn", restarting: "bad", stopped: "quiet", tripped: "bad",
    pending: "info", dead: "bad",
  };
  return h("span", { class: `badge badge-${known[state] || "warn"}`, text: state });
}

export function link(href, ...children) {
  return h("a", { href, "data-link": true }, ...children);
}

export function setTitle(text) {
  document.title = text ? `${text} · payler` : "payler";
}
