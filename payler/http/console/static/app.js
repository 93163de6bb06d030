// The console's entry point: routes a path to its page, keeps the header's readiness up to
// date, and turns console links into in-page navigation.

import { api } from "./api.js";
import { h, replace, setTitle, clearNotices } from "./ui.js";
import { overviewPage } from "./pages/overview.js";
import { scheduledPage } from "./pages/scheduled.js";
import { messagePage } from "./pages/message.js";
import { deadLettersPage } from "./pages/dead-letters.js";

const HEADER_REFRESH_MS = 10_000;
let current = null; // the page on screen: { stop() }

function route(path) {
  if (path === "/ui" || path === "/ui/") return ["overview", overviewPage, {}];
  if (path === "/ui/scheduled") return ["scheduled", scheduledPage, {}];
  if (path.startsWith("/ui/scheduled/")) {
    return ["scheduled", messagePage, { id: decodeURIComponent(path.slice(14)) }];
  }
  if (path === "/ui/dead-letters") return ["dead-letters", deadLettersPage, {}];
  return ["", null, {}];
}

export function navigate(href, { replaceState = false } = {}) {
  if (replaceState) history.replaceState(null, "", href);
  else history.pushState(null, "", href);
  render();
}

function render() {
  if (current && current.stop) current.stop();
  clearNotices();
  const [section, page, params] = route(location.pathname);
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const main = document.getElementById("main");
  if (!page) {
    setTitle("Not found");
    replace(main, h("div", { class: "empty" },
      h("p", { class: "empty-title", text: "No such page" }),
      h("p", {}, h("a", { href: "/ui", "data-link": true, text: "Go to the overview" }))));
    current = null;
    return;
  }
  current = page(main, params, new URLSearchParams(location.search), navigate);
  main.focus({ preventScroll: true });
}

async function refreshHeader() {
  const pill = document.getElementById("health");
  try {
    const view = await api("GET", "/overview");
    pill.textContent = view.ready ? "Ready" : "Not ready";
    pill.className = `pill ${view.ready ? "pill-ok" : "pill-bad"}`;
    pill.title = view.ready ? "Every workflow is connected and running" : view.reason || "";
  } catch (error) {
    pill.textContent = "Unreachable";
    pill.className = "pill pill-bad";
    pill.title = error.message;
  }
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-link]");
  if (!link || event.defaultPrevented || event.button !== 0) return;
  if (event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  event.preventDefault();
  if (link.getAttribute("href") !== location.pathname + location.search) {
    navigate(link.getAttribute("href"));
  }
});
window.addEventListener("popstate", render);
document.addEventListener("payler:changed", refreshHeader);

render();
refreshHeader();
setInterval(() => {
  if (!document.hidden) refreshHeader();
}, HEADER_REFRESH_MS);
