// Overview: is payler well? Each workflow's state, rates and lateness, the spool's backlog —
// refreshed every few seconds, in place (the layout keeps its size while figures change).

import { api } from "../api.js";
import {
  h, replace, setTitle, count, rate, duration, badge, time, errorBox,
} from "../ui.js";

const REFRESH_MS = 5000;

export function overviewPage(main) {
  setTitle("Overview");
  const status = h("div", { class: "status-line" });
  const tiles = h("div", { class: "tiles" });
  const workflows = h("section", { class: "card", "aria-labelledby": "wf-title" });
  const spools = h("section", { class: "card", "aria-labelledby": "spool-title" });
  const note = h("p", { class: "muted small footnote" });
  const problem = h("div");
  replace(main,
    h("div", { class: "page-head" }, h("h1", { text: "Overview" }), status),
    problem, tiles, workflows, spools, note);
  let last = null;

  function draw(view) {
    const flows = view.workflows;
    const sum = (key) => flows.reduce((total, w) => total + w.rates[key], 0);
    const pending = view.spools.reduce((total, s) => total + s.pending, 0);
    const dead = view.spools.reduce((total, s) => total + s.dead, 0);
    const overdue = Math.max(0, ...view.spools.map((s) => s.oldest_overdue_s));
    const late = flows.filter((w) => w.lateness.count > 0);
    const p99 = late.length ? Math.max(...late.map((w) => w.lateness.p99_ms)) : null;
    const p50 = late.length ? Math.max(...late.map((w) => w.lateness.p50_ms)) : null;
    const minutes = Math.max(1, Math.round(view.window_s / 60));

    replace(status, view.ready
      ? h("span", { class: "pill pill-ok", text: "All workflows ready" })
      : h("span", { class: "pill pill-bad", text: view.reason || "Not ready" }));

    replace(tiles,
      tile("Scheduled", count(pending), "pending in the spool", "/ui/scheduled"),
      tile("Oldest overdue", overdue > 0.5 ? duration(overdue * 1000) : "On time",
        overdue > 0.5 ? "due and not yet delivered" : "nothing waits past its due time",
        null, overdue > 60 ? "warn" : ""),
      tile("Delivered", rate(sum("delivered")), "per minute"),
      tile("Dead-lettered", rate(sum("dead_lettered")), `per minute · ${count(dead)} parked`,
        "/ui/dead-letters", sum("dead_lettered") > 0 ? "warn" : ""),
      tile("Lateness p99", p99 === null ? "—" : duration(p99),
        p50 === null ? "no delivery lately" : `p50 ${duration(p50)} · due → confirmed`));

    replace(workflows,
      h("h2", { id: "wf-title", text: "Workflows" }),
      h("div", { class: "table-wrap" }, h("table", { class: "table stack" },
        h("thead", {}, h("tr", {},
          ["Workflow", "State", "Received / min", "Delivered / min", "Dead-lettered / min",
            "Lateness p50", "Lateness p99", "In flight"].map((label, i) =>
            h("th", { scope: "col", class: i > 1 ? "num" : "", text: label })))),
        h("tbody", {}, flows.map((w) => h("tr", {},
          h("td", { "data-label": "Workflow" }, h("strong", { text: w.name })),
          h("td", { "data-label": "State" }, badge(w.state),
            w.problem ? h("div", { class: "small muted problem", text: w.problem }) : null),
          h("td", { class: "num", "data-label": "Received / min", text: rate(w.rates.received) }),
          h("td", { class: "num", "data-label": "Delivered / min", text: rate(w.rates.delivered) }),
          h("td", { class: "num", "data-label": "Dead-lettered / min" },
            h("span", { class: w.rates.dead_lettered > 0 ? "text-warn" : "",
              text: rate(w.rates.dead_lettered) })),
          h("td", { class: "num", "data-label": "Lateness p50", text: duration(w.lateness.p50_ms) }),
          h("td", { class: "num", "data-label": "Lateness p99",
            text: (w.lateness.beyond_buckets ? "≥ " : "") + duration(w.lateness.p99_ms) }),
          h("td", { class: "num", "data-label": "In flight", text: count(w.in_flight) }),
        ))))),
      h("p", { class: "muted small",
        text: `Rates are per minute over the last ${minutes} min (since payler started, if less); lateness is due time → publish confirmed.` }));

    replace(spools,
      h("h2", { id: "spool-title", text: view.spools.length > 1 ? "Spools" : "Spool" }),
      h("div", { class: "table-wrap" }, h("table", { class: "table stack" },
        h("thead", {}, h("tr", {},
          ["Storage", "State", "Pending", "Dead", "Oldest overdue"].map((label, i) =>
            h("th", { scope: "col", class: i > 1 ? "num" : "", text: label })))),
        h("tbody", {}, view.spools.map((s) => h("tr", {},
          h("td", { "data-label": "Storage" }, h("code", { class: "wrap", text: s.storage })),
          h("td", { "data-label": "State" },
            s.up ? badge("ready") : h("span", { class: "badge badge-bad", text: "unreachable" }),
            s.error ? h("div", { class: "small muted problem", text: s.error }) : null),
          h("td", { class: "num", "data-label": "Pending", text: count(s.pending) }),
          h("td", { class: "num", "data-label": "Dead", text: count(s.dead) }),
          h("td", { class: "num", "data-label": "Oldest overdue",
            text: s.oldest_overdue_s > 0.5 ? duration(s.oldest_overdue_s * 1000) : "—" }),
        ))))));

    replace(note, `payler ${view.version} · refreshed every ${REFRESH_MS / 1000} s · last at `,
      time(view.now_ms, { short: true }));
  }

  async function refresh() {
    try {
      last = await api("GET", "/overview");
      replace(problem);
      draw(last);
    } catch (error) {
      replace(problem, errorBox(error, last ? "Showing the last figures:" : "Cannot load the overview:"));
    }
  }

  drawSkeleton();
  refresh();
  const timer = setInterval(() => {
    if (!document.hidden) refresh();
  }, REFRESH_MS);
  return { stop: () => clearInterval(timer) };

  function drawSkeleton() {
    replace(tiles, ["Scheduled", "Oldest overdue", "Delivered", "Dead-lettered", "Lateness p99"]
      .map((label) => tile(label, "—", "loading…")));
  }
}

function tile(label, value, detail, href = null, tone = "") {
  const attrs = { class: `tile${href ? " tile-link" : ""}${tone ? ` tile-${tone}` : ""}` };
  const body = [
    h("span", { class: "tile-label", text: label }),
    h("span", { class: "tile-value", text: value }),
    h("span", { class: "tile-detail", text: detail }),
  ];
  return href ? h("a", { ...attrs, href, "data-link": true }, ...body) : h("div", attrs, ...body);
}
