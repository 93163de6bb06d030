// Dead letters: why messages could not go on, grouped by reason with counts; the messages of a
// reason; replay one, a selection or a whole reason to where it was going; or discard.

import { api } from "../api.js";
import {
  h, replace, setTitle, count, time, errorBox, empty, confirmAction, notify,
} from "../ui.js";

const PAGE_SIZE = 50;
const LABELS = {
  "invalid-schedule": "Invalid schedule",
  undecodable: "Undecodable",
  "too-large": "Too large",
  unroutable: "Unroutable",
  unencodable: "Unencodable",
  "max-attempts": "Gave up after retries",
  misfire: "Missed its due time",
  "payler-error": "payler error",
  other: "Other",
};
const HELP = {
  "invalid-schedule": "x-delay, x-deliver-at or x-destination could not be honoured. A replay sends it back to payler's input queue, to be scheduled again.",
  unroutable: "The destination queue did not exist. Create it, then replay.",
  "max-attempts": "Delivery kept failing. Fix the destination, then replay.",
  misfire: "Found later than max_lateness_ms allows.",
};

export function deadLettersPage(main, _params, query) {
  setTitle("Dead letters");
  const reason = query.get("reason") || "";
  const selected = new Set();
  let groups = null;
  let items = [];
  let cursor = null;
  let more = false;

  const total = h("span", { class: "muted" });
  const problem = h("div");
  const side = h("nav", { class: "card reasons", "aria-label": "Reasons" });
  const panel = h("section", { class: "card", "aria-labelledby": "dl-title" });
  replace(main,
    h("div", { class: "page-head" }, h("h1", { text: "Dead letters" }), total,
      h("button", { class: "button subtle push", type: "button", text: "Refresh", onclick: reload })),
    h("p", { class: "muted lead", text: "Messages payler could not schedule or deliver, with the reason. "
      + "Replay sends a message back to where it was going, without payler's dead-letter headers; "
      + "discard deletes it for good." }),
    problem,
    h("div", { class: "split" }, side, panel));

  async function reload() {
    selected.clear();
    cursor = null;
    items = [];
    try {
      groups = await api("GET", "/dead-letters/reasons");
      replace(problem);
      drawReasons();
      await loadMessages();
    } catch (error) {
      replace(problem, errorBox(error, error.unavailable
        ? "The spool or the broker cannot be reached:" : "Cannot list the dead letters:"));
    }
  }

  function drawReasons() {
    total.textContent = `${count(groups.total)}${groups.complete ? "" : "+"} in all`;
    const choice = (key, label, n, example) => h("a", {
      class: "reason", href: `/ui/dead-letters${key ? `?reason=${key}` : ""}`, "data-link": true,
      "aria-current": key === reason ? "page" : null,
    }, h("span", { class: "reason-name", text: label }), h("span", { class: "reason-count", text: count(n) }),
    example ? h("span", { class: "reason-example", text: example }) : null);
    replace(side,
      h("h2", { class: "sr-only", text: "Reasons" }),
      choice("", "All reasons", groups.total),
      groups.groups.map((g) => choice(g.reason_class, LABELS[g.reason_class] || g.reason_class, g.count, g.example)),
      groups.complete ? null : h("p", { class: "muted small",
        text: "More dead letters wait than were counted: the first 10,000 in the spool and 1,000 per queue are." }),
      Object.entries(groups.queue_errors).map(([queue, why]) =>
        h("p", { class: "muted small", text: `${queue}: ${why}` })));
  }

  async function loadMessages() {
    const page = await api("GET", "/dead-letters", {
      query: { reason, limit: String(PAGE_SIZE), cursor, body_limit: "160" },
    });
    items = items.concat(page.items);
    cursor = page.next_cursor;
    more = Boolean(cursor);
    drawMessages();
  }

  function drawMessages() {
    const group = groups.groups.find((g) => g.reason_class === reason);
    const title = reason ? LABELS[reason] || reason : "All reasons";
    const n = reason ? group?.count || 0 : groups.total;
    if (!items.length) {
      replace(panel, h("h2", { id: "dl-title", text: title }), reason
        ? empty("No dead letters for this reason", "They were replayed or discarded, or none came.")
        : empty("No dead letters", "Messages payler cannot schedule or deliver land here, with the reason."));
      return;
    }
    const selection = items.filter((d) => selected.has(d.id));
    const bulk = h("div", { class: "bulk", "aria-live": "polite" },
      h("span", { class: "muted", text: selection.length ? `${selection.length} selected` : "None selected" }),
      h("button", { class: "button", type: "button", disabled: !selection.length, id: "replay-selected",
        text: "Replay selected", onclick: () => replay({ ids: selection.map((d) => d.id) }, `${selection.length} selected message(s)`) }),
      h("button", { class: "button danger-outline", type: "button", disabled: !selection.length,
        text: "Discard selected", onclick: () => discard({ ids: selection.map((d) => d.id) }, `${selection.length} selected message(s)`) }),
      reason ? h("span", { class: "spacer" }) : null,
      reason ? h("button", { class: "button", type: "button", id: "replay-reason",
        text: `Replay all ${count(n)}`, onclick: () => replay({ reason_class: reason, limit: 100000 }, `all ${count(n)} “${title}” dead letters`) }) : null,
      reason ? h("button", { class: "button danger-outline", type: "button",
        text: `Discard all ${count(n)}`, onclick: () => discard({ reason_class: reason, limit: 100000 }, `all ${count(n)} “${title}” dead letters`) }) : null);
    const all = h("input", { type: "checkbox", "aria-label": "Select all shown",
      checked: selection.length === items.length,
      onchange: (event) => {
        for (const d of items) if (event.target.checked) selected.add(d.id); else selected.delete(d.id);
        drawMessages();
      } });
    replace(panel,
      h("div", { class: "card-head" }, h("h2", { id: "dl-title", text: title }),
        h("span", { class: "muted small", text: `${count(n)} dead letter${n === 1 ? "" : "s"}` })),
      reason && HELP[reason] ? h("p", { class: "hint", text: HELP[reason] }) : null,
      bulk,
      h("div", { class: "table-wrap" }, h("table", { class: "table stack dead" },
        h("thead", {}, h("tr", {}, h("th", { class: "check" }, all),
          ["Dead-lettered", "Reason", "Going to", "Message", ""].map((label) =>
            h("th", { scope: "col", text: label })))),
        h("tbody", {}, items.map(row)))),
      more ? h("p", { class: "pager" }, h("button", { class: "button subtle", type: "button",
        text: "Show more", onclick: () => loadMessages().catch((e) => notify(e.message, "error")) })) : null);
  }

  function row(d) {
    const box = h("input", { type: "checkbox", "aria-label": `Select ${d.message_id || d.id}`,
      checked: selected.has(d.id),
      onchange: (event) => {
        if (event.target.checked) selected.add(d.id); else selected.delete(d.id);
        drawMessages();
      } });
    return h("tr", {},
      h("td", { class: "check" }, box),
      h("td", { "data-label": "Dead-lettered" }, d.dead_lettered_ms ? time(d.dead_lettered_ms, { short: true })
        : h("span", { class: "muted", text: d.where === "spool" ? "parked in the spool" : "—" })),
      h("td", { "data-label": "Reason" }, h("span", { class: "badge badge-bad", text: d.reason_class }),
        h("div", { class: "small reason-text", text: d.reason || "" })),
      h("td", { "data-label": "Going to" }, d.destination ? h("code", { text: d.destination })
        : h("span", { class: "muted", text: d.source ? `back to ${d.source}` : "—" }),
        h("div", { class: "small muted", text: d.where === "queue" ? `on ${d.queue}` : "in the spool" })),
      h("td", { "data-label": "Message" },
        h("code", { class: "wrap", text: d.message_id || d.id }),
        d.correlation_id ? h("div", { class: "small muted", text: `correlation ${d.correlation_id}` }) : null,
        h("details", { class: "peek" }, h("summary", { text: d.truncated ? "Body dropped" : "Body and headers" }),
          h("pre", { class: "body small", text: d.body_encoding === "utf-8" ? d.body + (d.body_truncated ? "…" : "") : `(${d.body_bytes} bytes of binary)` }),
          h("pre", { class: "body small", text: JSON.stringify(d.headers, null, 2) }))),
      h("td", { class: "row-actions" },
        h("button", { class: "button small-button", type: "button", disabled: d.truncated,
          title: d.truncated ? "A minimal copy: its body was dropped, so it cannot be replayed" : "",
          text: "Replay", onclick: () => replay({ ids: [d.id] }, `this message (${d.message_id || d.id})`) })));
  }

  async function replay(selection, what) {
    const ok = await confirmAction({
      title: `Replay ${what}?`,
      text: "Each one is published back to where it was going, once, and leaves the dead letters when the broker confirms it.",
      confirm: "Replay",
    });
    if (!ok) return;
    await run(() => api("POST", "/dead-letters/replay", { body: selection }), (r) => r.replayed, "Replayed");
  }

  async function discard(selection, what) {
    const ok = await confirmAction({
      title: `Discard ${what}?`,
      text: "They are deleted for good: from the spool, and taken off their dead-letter queue. This cannot be undone.",
      confirm: "Discard", danger: true,
    });
    if (!ok) return;
    await run(() => api("POST", "/dead-letters/discard", { body: selection }), (r) => r.discarded, "Discarded");
  }

  async function run(call, done, verb) {
    try {
      const result = await call();
      const n = done(result);
      const failures = result.failed.map((f) => `${f.id}: ${f.error}`).join("; ");
      if (result.failed.length) {
        notify(`${verb} ${n}; ${result.failed.length} failed — ${failures}`, "warn", { sticky: true });
      } else {
        notify(n ? `${verb} ${n} message${n === 1 ? "" : "s"}.` : `${verb} nothing: they were already gone.`, n ? "ok" : "warn");
      }
    } catch (error) {
      notify(`Nothing was changed: ${error.message}`, "error", { sticky: true });
    }
    await reload();
  }

  replace(panel, h("p", { class: "muted", text: "Loading…" }));
  reload();
  return { stop: () => {} };
}
