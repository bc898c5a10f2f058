import { getJson } from "../api.js";
import { el, statusBadge, TERMINAL, when } from "../dom.js";

export function progressCell(job) {
  const done = job.steps_completed ?? 0;
  const planned = job.steps_planned;
  if (!planned) return el("span", { class: "muted" }, job.status === "succeeded" ? "done" : "—");
  return el(
    "span", { class: "progress" },
    el("progress", { max: planned, value: done }),
    el("span", { class: "steps" }, `${done}/${planned}`),
  );
}

function row(job) {
  return el(
    "tr", { dataset: { job: job.id } },
    el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, el("code", {}, job.id))),
    el("td", {}, job.model),
    el("td", {}, statusBadge(job.status)),
    el("td", {}, progressCell(job)),
    el("td", {}, job.fine_tuned_model ? el("code", {}, job.fine_tuned_model) : "—"),
    el("td", {}, when(job.created_at)),
    el("td", {}, TERMINAL.has(job.status) ? when(job.finished_at) : when(job.estimated_finish)),
  );
}

export async function render(root, { signal }) {
  const body = el("tbody");
  const table = el(
    "table", { id: "jobs-table" },
    el("thead", {}, el("tr", {}, ["Job", "Base", "Status", "Progress", "Fine-tuned model",
      "Created", "Finished / ETA"].map((h) => el("th", {}, h)))),
    body,
  );
  const empty = el("p", { class: "muted", hidden: true }, "No jobs yet.");
  root.append(
    el("div", { class: "title" }, el("h1", {}, "Fine-tuning jobs"),
      el("a", { href: "#/new", class: "button" }, "New job")),
    table, empty,
  );
  async function refresh() {
    const page = await getJson("/v1/fine_tuning/jobs?limit=100", { signal });
    body.replaceChildren(...page.data.map(row));
    empty.hidden = page.data.length > 0;
  }
  await refresh();
  // Progress moves while jobs run: look again every few seconds until the page is left.
  const timer = setInterval(async () => {
    try {
      await refresh();
    } catch {
      // a failed refresh keeps the last table; the next one tries again
    }
  }, 3000);
  signal.addEventListener("abort", () => clearInterval(timer));
}
