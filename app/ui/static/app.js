// The dashboard's router: #/route?query → a page module's render(root, {params, signal}).
// Leaving a page aborts its signal, which ends its streams, fetches and timers.

import { clearKey, getKey } from "./api.js";
import { el, errorBox } from "./dom.js";
import * as create from "./pages/create.js";
import * as job from "./pages/job.js";
import * as jobs from "./pages/jobs.js";
import * as models from "./pages/models.js";
import * as playground from "./pages/playground.js";
import * as signin from "./pages/signin.js";

const ROUTES = { jobs, new: create, models, playground, signin };
let current = null;

function parse(hash) {
  const [path, query = ""] = hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, params: Object.fromEntries(new URLSearchParams(query)) };
}

async function route() {
  current?.abort();
  const controller = new AbortController();
  current = controller;
  const { parts, params } = parse(location.hash);
  let name = parts[0] || "jobs";
  if (!getKey() && name !== "signin") {
    params.next = location.hash;  // signed in, the user lands where they were going
    name = "signin";
  }
  let page = ROUTES[name];
  if (name === "jobs" && parts[1]) {
    page = job;
    params.id = parts[1];
  }
  document.body.dataset.page = page === job ? "job" : name;
  document.getElementById("nav").hidden = name === "signin";
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.route === name);
  }
  const main = document.getElementById("main");
  main.replaceChildren();
  for (const name of Object.keys(main.dataset)) delete main.dataset[name];
  if (!page) {
    main.append(el("h1", {}, "Not found"), el("p", {}, el("a", { href: "#/jobs" }, "Back to jobs")));
    return;
  }
  try {
    await page.render(main, { params, signal: controller.signal });
  } catch (error) {
    if (controller.signal.aborted) return;
    main.append(errorBox(error.message));
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("loraforge:unauthorized", () => {
  if (document.body.dataset.page === "signin") return;  // the form says why itself
  clearKey();
  if (!location.hash.startsWith("#/signin")) location.hash = "#/signin";
});
document.getElementById("sign-out").addEventListener("click", () => {
  clearKey();
  location.hash = "#/signin";
});
route();
