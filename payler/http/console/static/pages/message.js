// Message: one scheduled entry — body (text or hex, capped), headers, properties, due time,
// attempts, last error — and what an operator does with it: deliver now, reschedule, cancel.
// Each action asks first and says what it did.

import { api, quote } from "../api.js";
import {
  h, replace, setTitle, time, errorBox, empty, badge, bytes, hexDump, textToHex,
  confirmAction, notify, zone, ago, utc, looksBinary,
} from "../ui.js";

const BODY_LIMIT = 16 * 1024;

export function messagePage(main, params) {
  setTitle("Message");
  const id = params.id;
  let entry = null;
  let gone = false;
  let view = "text";
  const back = h("a", { href: "/ui/scheduled", "data-link": true, class: "back", text: "← Scheduled" });

  async function load() {
    try {
      entry = await api("GET", `/scheduled/${quote(id)}`, { query: { body_limit: String(BODY_LIMIT) } });
      view = entry.body_encoding === "utf-8" && !looksBinary(entry.body) ? "text" : "hex";
      draw();
    } catch (error) {
      if (error.status === 404) return drawGone();
      replace(main, back, errorBox(error, error.unavailable
        ? "The spool cannot be reached:" : "Cannot show this message:"));
    }
  }

  function drawGone(what) {
    gone = true;
    replace(main, back, h("h1", { class: "id-title" }, h("code", { class: "wrap", text: id })),
      empty(what || "This message is no longer scheduled",
        "It was delivered, cancelled or replayed: payler keeps no copy of what left the spool.",
        h("a", { href: "/ui/scheduled", "data-link": true, class: "button", text: "Back to the list" })));
  }

  async function act({ title, text, confirm, danger, call, done }) {
    if (!(await confirmAction({ title, text, confirm, danger }))) return;
    try {
      const result = await call();
      notify(done(result), "ok");
      document.dispatchEvent(new Event("payler:changed"));
    } catch (error) {
      if (error.status === 404) {
        drawGone("This message is no longer scheduled");
        notify("Nothing was changed: the message had already left the spool (delivered or cancelled).", "warn", { sticky: true });
        return;
      }
      notify(`Nothing was changed: ${error.message}`, "error", { sticky: true });
    }
  }

  function draw() {
    setTitle(entry.message_id || entry.id);
    const picker = h("input", {
      type: "datetime-local", id: "reschedule-at", step: "1", required: true,
      value: localValue(Math.max(entry.due_ms, Date.now() + 600_000)),
    });
    const actions = h("section", { class: "card actions-card", "aria-label": "Actions" },
      h("div", { class: "action-row" },
        h("button", { class: "button primary", type: "button", id: "deliver-now", text: "Deliver now",
          onclick: () => act({
            title: "Deliver this message now?",
            text: `It becomes due at once and goes to ${entry.destination} within a second or so.`,
            confirm: "Deliver now",
            call: () => api("POST", `/scheduled/${quote(id)}/deliver`),
            done: (moved) => { entry = moved; draw(); return "Made due now: payler delivers it next."; },
          }) }),
        h("button", { class: "button", type: "button", id: "in-10-min", text: "In 10 min",
          onclick: () => reschedule({ delay_ms: 600_000 }, "in 10 minutes") }),
        h("button", { class: "button", type: "button", text: "In 1 hour",
          onclick: () => reschedule({ delay_ms: 3_600_000 }, "in 1 hour") }),
        h("span", { class: "spacer" }),
        h("button", { class: "button danger", type: "button", id: "cancel", text: "Cancel message…",
          onclick: () => act({
            title: "Cancel this message?",
            text: "It is deleted from the spool and will never be delivered. This cannot be undone.",
            confirm: "Cancel it", danger: true,
            call: () => api("DELETE", `/scheduled/${quote(id)}`),
            done: () => { drawGone("Cancelled"); return "Cancelled: the message was deleted from the spool."; },
          }) })),
      h("form", { class: "reschedule", onsubmit: (event) => {
        event.preventDefault();
        if (!picker.value) return;
        const at = new Date(picker.value);
        reschedule({ deliver_at: at.toISOString() }, `at ${at.toLocaleString()}`);
      } },
      h("label", { for: "reschedule-at", text: `Reschedule to (${zone})` }),
      h("div", { class: "joined" }, picker,
        h("button", { class: "button", type: "submit", id: "reschedule", text: "Reschedule" }))));

    function reschedule(change, words) {
      return act({
        title: `Reschedule ${words}?`,
        text: `It stays in the spool and is delivered to ${entry.destination} ${words}.`,
        confirm: "Reschedule",
        call: () => api("PATCH", `/scheduled/${quote(id)}`, { body: change }),
        done: (moved) => {
          entry = moved; draw();
          return `Rescheduled: due ${new Date(moved.due_ms).toLocaleString()} (${ago(moved.due_ms)}).`;
        },
      });
    }

    const props = Object.entries(entry.properties).filter(([, v]) => v !== null);
    replace(main, back,
      h("div", { class: "page-head" },
        h("h1", { class: "id-title" }, h("code", { class: "wrap", text: entry.id })), badge(entry.state)),
      h("p", { class: "due-line" }, "Due ", time(entry.due_ms, { withRelative: true }),
        ` to `, h("code", { text: entry.destination })),
      entry.state === "pending" ? actions : null,
      h("div", { class: "grid-2" },
        h("section", { class: "card", "aria-labelledby": "facts-title" },
          h("h2", { id: "facts-title", text: "Details" }),
          h("dl", { class: "facts" },
            fact("Message id", code(entry.message_id)),
            fact("Correlation id", code(entry.correlation_id)),
            fact("Destination", code(entry.destination)),
            fact("Source", code(entry.source)),
            fact("Received", time(entry.created_ms)),
            fact("Due", h("span", {}, time(entry.due_ms), h("span", { class: "muted small", text: ` · ${utc(entry.due_ms)}` }))),
            fact("Attempts", String(entry.attempts)),
            fact("Last error", entry.last_error
              ? h("span", { class: "text-bad", text: entry.last_error }) : h("span", { class: "muted", text: "none" })))),
        h("section", { class: "card", "aria-labelledby": "props-title" },
          h("h2", { id: "props-title", text: "Properties" }),
          props.length ? h("dl", { class: "facts" }, props.map(([k, v]) =>
            fact(k, k === "timestamp_ms" ? time(v) : code(String(v)))))
            : h("p", { class: "muted", text: "No properties." }))),
      h("section", { class: "card", "aria-labelledby": "headers-title" },
        h("h2", { id: "headers-title", text: "Headers" }),
        Object.keys(entry.headers).length
          ? h("div", { class: "table-wrap" }, h("table", { class: "table kv" },
            h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Name" }), h("th", { scope: "col", text: "Value" }))),
            h("tbody", {}, Object.entries(entry.headers).map(([k, v]) => h("tr", {},
              h("td", {}, h("code", { text: k })),
              h("td", {}, h("code", { class: "wrap", text: typeof v === "string" ? v : JSON.stringify(v) })))))))
          : h("p", { class: "muted", text: "No headers." })),
      bodyCard());
  }

  function bodyCard() {
    const shown = entry.body_truncated
      ? `first ${bytes(Math.min(BODY_LIMIT, entry.body_bytes))} of ${bytes(entry.body_bytes)}`
      : bytes(entry.body_bytes);
    const text = entry.body_encoding === "utf-8";
    const content = view === "hex"
      ? hexDump(text ? textToHex(entry.body) : entry.body)
      : entry.body;
    return h("section", { class: "card", "aria-labelledby": "body-title" },
      h("div", { class: "card-head" },
        h("h2", { id: "body-title", text: "Body" }),
        h("span", { class: "muted small", text: `${shown}${entry.properties.content_type ? ` · ${entry.properties.content_type}` : ""}` }),
        h("div", { class: "segmented push", role: "group", "aria-label": "Show the body as" },
          h("button", { type: "button", class: "seg", "aria-pressed": String(view === "text"),
            disabled: !text, text: "Text", onclick: () => { view = "text"; draw(); } }),
          h("button", { type: "button", class: "seg", "aria-pressed": String(view === "hex"),
            text: "Hex", onclick: () => { view = "hex"; draw(); } }))),
      entry.body_bytes
        ? h("pre", { class: "body", tabindex: "0", text: content })
        : h("p", { class: "muted", text: "The body is empty." }));
  }

  replace(main, back, h("p", { class: "muted", text: "Loading…" }));
  load();
  return { stop: () => { gone = true; } };
}

function fact(label, value) {
  return [h("dt", { text: label }), h("dd", {}, value)];
}

function code(value) {
  return value ? h("code", { class: "wrap", text: value }) : h("span", { class: "muted", text: "—" });
}

function localValue(ms) {
  const date = new Date(ms);
  return new Date(ms - date.getTimezoneOffset() * 60_000).toISOString().slice(0, 19);
}
