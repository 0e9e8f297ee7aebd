// The UI shell: hash routes, polling for live updates, status messages.
// Poll interval: ?poll=<ms> in the page URL (default 2000 ms, at least 250 ms).
import { connections, exchanges, groupList, groupPage, overview } from "./pages.js";
import { queueList, queuePage } from "./queues.js";
import { topicList, topicPage } from "./topics.js";

const ROUTES = [
  [/^\/?$/, overview],
  [/^\/queues$/, queueList],
  [/^\/queues\/([^/]+)$/, queuePage],
  [/^\/topics$/, topicList],
  [/^\/topics\/([^/]+)$/, topicPage],
  [/^\/groups$/, groupList],
  [/^\/groups\/([^/]+)$/, groupPage],
  [/^\/exchanges$/, exchanges],
  [/^\/connections$/, connections],
];

const pollParameter = Number(new URLSearchParams(window.location.search).get("poll"));
const POLL_MS = Number.isFinite(pollParameter) && pollParameter >= 250 ? pollParameter : 2000;

const main = document.getElementById("main");
const statusBox = document.getElementById("status");
const updated = document.getElementById("updated");
let current = null;
let generation = 0;
let timer = null;
let flash = null;

function showStatus(message, kind) {
  statusBox.hidden = !message;
  statusBox.className = kind === "info" ? "status info" : "status";
  statusBox.textContent = message || "";
}

const ui = {
  info: (message) => showStatus(message, "info"),
  error: (message) => showStatus(message, "error"),
  // Go to another page; ``message`` is shown there (the route change clears the old one).
  navigate: (path, message) => {
    flash = message || null;
    window.location.hash = "#" + path;
  },
  // Stop polling this page (before deleting what it shows: no request for a thing gone).
  suspend() {
    generation += 1;
    current = null;
    clearTimeout(timer);
  },
  resume: () => route(),
  // Run a user action; report its failure in the status box instead of the console.
  async act(action) {
    try {
      await action();
    } catch (error) {
      showStatus(error.message || String(error), "error");
    }
  },
};

async function refresh(view, mine) {
  try {
    await view.refresh();
    if (mine === generation) {
      updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
      if (!statusBox.classList.contains("info")) showStatus("");
    }
  } catch (error) {
    if (mine === generation) {
      updated.textContent = "not updated";
      showStatus(error.status === 404 ? "Not found: it may have been deleted."
        : `Cannot reach the broker: ${error.message}`, "error");
    }
  }
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(async () => {
    if (current && document.visibilityState !== "hidden") await refresh(current, generation);
    schedule();
  }, POLL_MS);
}

function route() {
  const path = decodeURI(window.location.hash.replace(/^#/, "")) || "/";
  let page = null;
  let params = [];
  for (const [pattern, candidate] of ROUTES) {
    const match = window.location.hash.replace(/^#/, "").match(pattern);
    if (match) {
      page = candidate;
      params = match.slice(1).map((part) => decodeURIComponent(part));
      break;
    }
  }
  generation += 1;
  showStatus(flash || "", "info");
  flash = null;
  for (const anchor of document.querySelectorAll("#nav a")) {
    if (page && anchor.dataset.section === page.section) anchor.setAttribute("aria-current", "page");
    else anchor.removeAttribute("aria-current");
  }
  if (!page) {
    main.replaceChildren();
    const heading = document.createElement("h1");
    heading.textContent = "No such page";
    const text = document.createElement("p");
    text.textContent = `Nothing lives at ${path}.`;
    main.append(heading, text);
    current = null;
    return;
  }
  document.title = `${page.title(params)} · Conveyor`;
  current = page.mount(main, params, ui);
  main.focus({ preventScroll: true });
  refresh(current, generation);
  schedule();
}

window.addEventListener("hashchange", route);
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && current) refresh(current, generation);
});
route();
