// One job: summary, live loss curves and events (the events stream, read with fetch),
// checkpoints (chat with each, download each) and the hyperparameters as resolved.

import { api, ApiError, downloadModel, getJson, sse } from "../api.js";
import { LineChart } from "../chart.js";
import { el, errorBox, playgroundHref, statusBadge, TERMINAL, when } from "../dom.js";
import { progressCell } from "./jobs.js";

const RECONNECTS = 30;  // a stream that drops is resumed after Last-Event-ID, this many times

function summary(job) {
  const model = job.fine_tuned_model;
  const rows = [
    ["Status", statusBadge(job.status)],
    ["Base model", job.model],
    ["Fine-tuned model", model ? el("a", { href: playgroundHref(model, job.model) }, model) : "—"],
    ["Progress", progressCell(job)],
    ["Training file", job.training_file],
    ["Validation file", job.validation_file ?? "—"],
    ["Trained tokens", job.trained_tokens ?? "—"],
    ["Created", when(job.created_at)],
    [TERMINAL.has(job.status) ? "Finished" : "Estimated finish",
      when(TERMINAL.has(job.status) ? job.finished_at : job.estimated_finish)],
    ["Seed", job.seed],
  ];
  if (job.error) rows.push(["Error", el("span", { class: "error-text" }, job.error.message)]);
  return el("dl", { class: "summary", id: "job-summary" },
    rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function hyperparameters(job) {
  const entries = Object.entries(job.hyperparameters ?? {});
  const shown = (v) => (typeof v === "object" && v !== null ? JSON.stringify(v) : String(v));
  return el("dl", { id: "hyperparameters", class: "pairs" },
    entries.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, shown(v))]));
}

function metric(value) {
  return typeof value === "number" ? value.toFixed(4) : "—";
}

function checkpointRow(checkpoint, base, onError) {
  const model = checkpoint.fine_tuned_model_checkpoint;
  const download = el("button", { type: "button", class: "small" }, "Download");
  download.addEventListener("click", () => downloadModel(model).catch(onError));
  return el(
    "tr", { dataset: { checkpoint: model } },
    el("td", {}, checkpoint.step_number),
    el("td", {}, el("code", {}, model)),
    el("td", {}, metric(checkpoint.metrics?.train_loss)),
    el("td", {}, metric(checkpoint.metrics?.valid_loss)),
    el("td", { class: "actions" },
      el("a", { href: playgroundHref(model, base), class: "button small" }, "Chat"), download),
  );
}

function eventItem(event) {
  return el("li", { class: `event level-${event.level}`, dataset: { type: event.type } },
    el("time", { title: when(event.created_at) },
      new Date(event.created_at * 1000).toLocaleTimeString()), el("span", { class: "level" }, event.level),
    el("span", { class: "message" }, event.message));
}

export async function render(root, { params, signal }) {
  const id = params.id;
  let job = await getJson(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`, { signal });
  const header = el("div", { class: "title" });
  const summaryBox = el("section", { class: "card" });
  const chart = new LineChart([
    { name: "train", className: "train" },
    { name: "valid", className: "valid" },
  ]);
  chart.svg.id = "loss-chart";
  const latest = el("p", { class: "muted", id: "latest-metrics" }, "");
  const checkpointsBody = el("tbody");
  const events = el("ol", { id: "events", class: "events" });
  const notices = el("div");
  const onError = (error) => notices.replaceChildren(errorBox(error.message));

  function drawJob() {
    const cancel = TERMINAL.has(job.status) ? null : el("button", {
      type: "button", class: "danger", id: "cancel-job",
      onclick: async () => {
        try {
          job = await getJson(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/cancel`,
            { method: "POST", signal });
          drawJob();
        } catch (error) {
          onError(error);
        }
      },
    }, "Cancel");
    header.replaceChildren(el("h1", {}, job.id), cancel ?? "");
    summaryBox.replaceChildren(el("h2", {}, "Summary"), summary(job));
  }

  async function loadCheckpoints() {
    const page = await getJson(
      `/v1/fine_tuning/jobs/${encodeURIComponent(id)}/checkpoints?limit=100`, { signal });
    checkpointsBody.replaceChildren(...page.data.map((c) => checkpointRow(c, job.model, onError)));
  }

  drawJob();
  root.append(
    header, notices,
    el("div", { class: "grid" },
      summaryBox,
      el("section", { class: "card" }, el("h2", {}, "Loss"), chart.svg, latest)),
    el("section", { class: "card" }, el("h2", {}, "Checkpoints"),
      el("table", { id: "checkpoints" },
        el("thead", {}, el("tr", {}, ["Step", "Model", "Train loss", "Valid loss", ""].map(
          (h) => el("th", {}, h)))),
        checkpointsBody)),
    el("div", { class: "grid" },
      el("section", { class: "card" }, el("h2", {}, "Events"), events),
      el("section", { class: "card" }, el("h2", {}, "Hyperparameters (resolved)"), hyperparameters(job))),
  );
  // The job's status and estimated finish move while it runs: look again now and then.
  const timer = setInterval(async () => {
    if (TERMINAL.has(job.status)) return;
    try {
      job = await getJson(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`, { signal });
      drawJob();
    } catch {
      // the stream carries on; the next look may work
    }
  }, 3000);
  signal.addEventListener("abort", () => clearInterval(timer));
  await loadCheckpoints();

  function onEvent(event) {
    events.prepend(eventItem(event));
    if (event.type === "metrics" && event.data) {
      const d = event.data;
      chart.xMax = d.total_steps ?? 0;  // the curve fills the axis as the job goes
      chart.add("train", d.step, d.train_loss);
      if (d.valid_loss !== null && d.valid_loss !== undefined) chart.add("valid", d.step, d.valid_loss);
      latest.textContent = `step ${d.step}/${d.total_steps} · epoch ${d.epoch} · train ${metric(d.train_loss)}`
        + ` · valid ${metric(d.valid_loss)} · ${Math.round(d.tokens_per_second ?? 0)} tokens/s`;
      const status = TERMINAL.has(job.status) ? job.status : "running";
      job = { ...job, status, steps_completed: d.step, steps_planned: d.total_steps };
      drawJob();
    } else {
      loadCheckpoints().catch(() => {});  // a checkpoint or a status change: look again
    }
  }

  // Followed until the job ends; resumed after the last event seen when the stream drops.
  let lastId = null;
  for (let attempt = 0; attempt < RECONNECTS && !signal.aborted; attempt += 1) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await api(
        `/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?stream=true`, { headers, signal });
      for await (const message of sse(response)) {
        if (message.event === "end") {
          job = JSON.parse(message.data);
          drawJob();
          await loadCheckpoints();
          root.dataset.stream = "ended";
          clearInterval(timer);
          return;
        }
        if (message.event === "error") {
          onError(new Error(JSON.parse(message.data).error.message));
          return;
        }
        if (message.id) lastId = message.id;
        onEvent(JSON.parse(message.data));
        attempt = 0;
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError) {
        onError(error);
        return;
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}
