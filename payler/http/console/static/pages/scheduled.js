// Scheduled: the pending entries in due order, a chart of how many are due per time bucket,
// filters (destination, due range), search by message id, correlation id or a header, and
// cursor pagination (each page is one indexed query, however deep: fast with a million).

import { api } from "../api.js";
import {
  h, replace, setTitle, count, time, errorBox, empty, link, zone, utc, duration, looksBinary,
} from "../ui.js";

const PAGE_SIZE = 50;
const WINDOWS = [
  { key: "1h", label: "1 h", span: 3_600_000, bucket: 300_000 },
  { key: "6h", label: "6 h", span: 6 * 3_600_000, bucket: 900_000 },
  { key: "24h", label: "24 h", span: 24 * 3_600_000, bucket: 3_600_000 },
  { key: "7d", label: "7 days", span: 7 * 86_400_000, bucket: 6 * 3_600_000 },
];
const SEARCH_FIELDS = [
  ["correlation_id", "Correlation id"],
  ["message_id", "Message id"],
  ["header", "Header (name=value)"],
];

export function scheduledPage(main, _params, query, navigate) {
  setTitle("Scheduled");
  const state = {
    window: WINDOWS.find((w) => w.key === query.get("window")) || WINDOWS[2],
    cursors: [null], // the cursor of each page seen: "Previous" goes back through them
  };
  const filters = Object.fromEntries(
    ["correlation_id", "message_id", "header", "destination", "due_from", "due_to"]
      .map((key) => [key, query.get(key) || ""]));

  let keyHandler = null;
  const total = h("span", { class: "muted" });
  const chart = h("section", { class: "card chart-card", "aria-labelledby": "chart-title" });
  const list = h("section", { class: "card", "aria-labelledby": "list-title" });
  const problem = h("div");
  replace(main,
    h("div", { class: "page-head" }, h("h1", { text: "Scheduled" }), total,
      h("button", { class: "button subtle push", type: "button", text: "Refresh",
        onclick: () => { loadChart(); loadPage(); } })),
    problem, chart, filterForm(), list);

  function setQuery(changes) {
    const next = new URLSearchParams(location.search);
    for (const [key, value] of Object.entries(changes)) {
      if (value) next.set(key, value); else next.delete(key);
    }
    const href = `/ui/scheduled${next.size ? `?${next}` : ""}`;
    navigate(href);
  }

  function filterForm() {
    const activeField = SEARCH_FIELDS.find(([key]) => filters[key]) || SEARCH_FIELDS[0];
    const field = h("select", { id: "search-field", "aria-label": "Search by" },
      SEARCH_FIELDS.map(([key, label]) =>
        h("option", { value: key, selected: key === activeField[0], text: label })));
    const term = h("input", {
      id: "search", type: "search", value: filters[activeField[0]],
      placeholder: "order-42", autocomplete: "off", spellcheck: "false",
      "aria-label": "Search term", "aria-keyshortcuts": "/",
    });
    const destination = h("input", {
      id: "destination", type: "text", value: filters.destination, placeholder: "any",
      autocomplete: "off", spellcheck: "false",
    });
    const from = h("input", { id: "due-from", type: "datetime-local", step: "1",
      value: localInput(filters.due_from) });
    const to = h("input", { id: "due-to", type: "datetime-local", step: "1",
      value: localInput(filters.due_to) });
    const form = h("form", { class: "card filters", role: "search", onsubmit: (event) => {
      event.preventDefault();
      const changes = { correlation_id: "", message_id: "", header: "" };
      if (term.value.trim()) changes[field.value] = term.value.trim();
      changes.destination = destination.value.trim();
      changes.due_from = fromInput(from.value);
      changes.due_to = fromInput(to.value);
      setQuery(changes);
    } },
    h("div", { class: "field grow" }, h("label", { for: "search", text: "Find" }),
      h("div", { class: "joined" }, field, term)),
    h("div", { class: "field" }, h("label", { for: "destination", text: "Destination" }), destination),
    h("div", { class: "field" }, h("label", { for: "due-from", text: `Due from (${zone})` }), from),
    h("div", { class: "field" }, h("label", { for: "due-to", text: "Due until" }), to),
    h("div", { class: "field actions" },
      h("button", { class: "button primary", type: "submit", text: "Search" }),
      h("button", { class: "button subtle", type: "button", text: "Clear", onclick: () =>
        setQuery({ correlation_id: "", message_id: "", header: "", destination: "",
          due_from: "", due_to: "" }) })));
    keyHandler = focusSearch;
    window.addEventListener("keydown", focusSearch);
    return form;

    function focusSearch(event) {
      if (event.key !== "/" || ["INPUT", "SELECT", "TEXTAREA"].includes(event.target.tagName)) return;
      event.preventDefault();
      term.focus();
    }
  }

  async function loadChart() {
    const win = state.window;
    const start = Math.floor(Date.now() / win.bucket) * win.bucket;
    try {
      const data = await api("GET", "/scheduled/histogram", { query: {
        due_from: String(start), due_to: String(start + win.span), bucket_ms: String(win.bucket),
        destination: filters.destination,
      } });
      drawChart(data);
    } catch (error) {
      replace(chart, chartHead(), errorBox(error, "Cannot draw the chart:"));
    }
  }

  function chartHead() {
    return h("div", { class: "card-head" },
      h("h2", { id: "chart-title", text: "Due over the next" }),
      h("div", { class: "segmented", role: "group", "aria-label": "Time range" },
        WINDOWS.map((w) => h("button", {
          type: "button", class: "seg", "aria-pressed": String(w === state.window), text: w.label,
          onclick: () => { state.window = w; loadChart(); },
        }))));
  }

  function drawChart(data) {
    const peak = Math.max(1, ...data.buckets.map((b) => b.count));
    const bars = data.buckets.map((bucket, index) => {
      const end = bucket.start_ms + data.bucket_ms;
      const label = `${count(bucket.count)} due ${new Date(bucket.start_ms).toLocaleString()} – ${
        new Date(end).toLocaleTimeString()}`;
      const bar = h("span", { class: "bar-fill" });
      bar.style.height = `${bucket.count ? Math.max(3, (bucket.count / peak) * 100) : 0}%`;
      return h("button", {
        type: "button", class: "bar", title: `${label}\n${utc(bucket.start_ms)}`, "aria-label": label,
        onclick: () => setQuery({ due_from: new Date(bucket.start_ms).toISOString(),
          due_to: new Date(end - 1).toISOString() }),
      }, bar, index % Math.ceil(data.buckets.length / 6) === 0
        ? h("span", { class: "bar-tick", text: tick(bucket.start_ms, data.bucket_ms) }) : null);
    });
    const dueTotal = data.buckets.reduce((sum, b) => sum + b.count, 0);
    replace(chart, chartHead(),
      h("div", { class: "bars", role: "group", "aria-label": "Entries due per time bucket" }, bars),
      h("p", { class: "chart-legend muted small" },
        `${count(dueTotal)} due in the next ${state.window.label} (one bar per ${
          duration(data.bucket_ms)}) · `,
        h("span", { class: data.overdue ? "text-warn" : "", text: `${count(data.overdue)} overdue` }),
        ` · ${count(data.later)} due later. Choose a bar to list its entries.`));
  }

  async function loadPage() {
    const cursor = state.cursors[state.cursors.length - 1];
    try {
      const [page, totals] = await Promise.all([
        api("GET", "/scheduled", { query: {
          ...filters, limit: String(PAGE_SIZE), cursor, body_limit: "120",
        } }),
        api("GET", "/scheduled/count", { query: { destination: filters.destination } }),
      ]);
      replace(problem);
      total.textContent = `${count(totals.pending)} pending${
        filters.destination ? ` to ${filters.destination}` : ""}`;
      drawList(page);
    } catch (error) {
      replace(problem, errorBox(error, error.unavailable ? "The spool cannot be reached:" : "Cannot list:"));
    }
  }

  function drawList(page) {
    const filtered = Object.values(filters).some(Boolean);
    const head = h("div", { class: "card-head" },
      h("h2", { id: "list-title", text: filtered ? "Matching entries" : "Next due" }),
      filtered ? h("span", { class: "muted small", text: describe(filters) }) : null);
    if (!page.items.length && state.cursors.length === 1) {
      replace(list, head, filtered
        ? empty("No entry matches", page.scanned
          ? `Looked at ${count(page.scanned)} entries (a header filter reads them one by one).`
          : "Delivered or cancelled entries leave the spool; try other filters.",
        page.next_cursor ? h("button", { class: "button", type: "button", text: "Keep looking",
          onclick: () => { state.cursors.push(page.next_cursor); loadPage(); } }) : null)
        : empty("Nothing is scheduled", "Messages payler holds until they are due appear here."));
      return;
    }
    const rows = page.items.map((entry) => {
      const href = `/ui/scheduled/${encodeURIComponent(entry.id)}`;
      return h("tr", {},
        h("td", { "data-label": "Due" }, link(href, time(entry.due_ms, { withRelative: true }))),
        h("td", { "data-label": "Destination" }, h("code", { text: entry.destination })),
        h("td", { "data-label": "Message id" }, ident(entry.message_id)),
        h("td", { "data-label": "Correlation id" }, ident(entry.correlation_id)),
        h("td", { class: "num", "data-label": "Attempts", text: String(entry.attempts) }),
        h("td", { "data-label": "Body", class: "body-cell" }, preview(entry)));
    });
    replace(list, head,
      h("div", { class: "table-wrap" }, h("table", { class: "table stack entries" },
        h("thead", {}, h("tr", {}, ["Due", "Destination", "Message id", "Correlation id",
          "Attempts", "Body"].map((label) =>
          h("th", { scope: "col", class: label === "Attempts" ? "num" : "", text: label })))),
        h("tbody", {}, rows))),
      page.scanned ? h("p", { class: "muted small",
        text: `Looked at ${count(page.scanned)} entries for this page (a header filter has no index).` }) : null,
      h("nav", { class: "pager", "aria-label": "Pages" },
        h("button", { class: "button subtle", type: "button", text: "← Previous",
          disabled: state.cursors.length === 1,
          onclick: () => { state.cursors.pop(); loadPage(); } }),
        h("span", { class: "muted small", text: `Page ${state.cursors.length}` }),
        h("button", { class: "button subtle", type: "button", text: "Next →",
          disabled: !page.next_cursor,
          onclick: () => { state.cursors.push(page.next_cursor); loadPage(); } })));
  }

  loadChart();
  loadPage();
  return { stop: () => window.removeEventListener("keydown", keyHandler) };
}

function ident(value) {
  return value ? h("code", { class: "wrap", text: value }) : h("span", { class: "muted", text: "—" });
}

function preview(entry) {
  if (!entry.body_bytes) return h("span", { class: "muted", text: "empty" });
  if (entry.body_encoding !== "utf-8" || looksBinary(entry.body)) {
    return h("span", { class: "muted", text: `${entry.body_bytes} bytes of binary` });
  }
  return h("span", { class: "preview", text: entry.body + (entry.body_truncated ? "…" : "") });
}

function describe(filters) {
  const parts = [];
  if (filters.correlation_id) parts.push(`correlation id ${filters.correlation_id}`);
  if (filters.message_id) parts.push(`message id ${filters.message_id}`);
  if (filters.header) parts.push(`header ${filters.header}`);
  if (filters.destination) parts.push(`to ${filters.destination}`);
  if (filters.due_from) parts.push(`due from ${new Date(filters.due_from).toLocaleString()}`);
  if (filters.due_to) parts.push(`until ${new Date(filters.due_to).toLocaleString()}`);
  return parts.join(" · ");
}

function tick(ms, bucket) {
  const date = new Date(ms);
  if (bucket >= 6 * 3_600_000) return date.toLocaleDateString(undefined, { weekday: "short", day: "numeric" });
  return date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
}

// <input type="datetime-local"> speaks the browser's local time without a zone.
function localInput(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const local = new Date(date.getTime() - date.getTimezoneOffset() * 60_000);
  return local.toISOString().slice(0, 19);
}

export function fromInput(value) {
  return value ? new Date(value).toISOString() : "";
}
