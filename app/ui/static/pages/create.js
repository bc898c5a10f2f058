// Create a job: upload the training (and validation) file by drag and drop, see the API's
// validation error (it names the line), pick a base model and hyperparameters, start.

import { api, getJson } from "../api.js";
import { bytes, el, errorBox } from "../dom.js";

// Left blank, a field is not sent: the API resolves "auto" and the defaults.
const HYPERPARAMETERS = [
  { name: "n_epochs", label: "Epochs", placeholder: "auto", type: "int" },
  { name: "batch_size", label: "Batch size", placeholder: "auto", type: "int" },
  { name: "learning_rate_multiplier", label: "Learning rate multiplier", placeholder: "auto", type: "float" },
  { name: "lora_r", label: "LoRA rank", placeholder: "8", type: "int" },
  { name: "lora_alpha", label: "LoRA alpha", placeholder: "2 × rank", type: "int" },
  { name: "n_checkpoints", label: "Checkpoints", placeholder: "one per epoch", type: "int" },
  { name: "max_seq_length", label: "Max sequence length", placeholder: "1024", type: "int" },
];

// A drop zone that uploads the file it gets and remembers the uploaded file's id; or a
// file uploaded before (by the CLI, the SDK) picked from the list.
function fileDrop(name, title, optional, uploaded) {
  const state = { fileId: null };
  const earlier = el("select", { id: `${name}-existing`, "aria-label": `${title}: uploaded earlier` },
    el("option", { value: "" }, "…or pick a file uploaded earlier"),
    uploaded.map((f) => el("option", { value: f.id }, `${f.filename} (${f.id}, ${bytes(f.bytes)})`)));
  const input = el("input", { type: "file", id: `${name}-input`, accept: ".jsonl,application/jsonl", class: "visually-hidden" });
  const status = el("div", { class: "upload-status", id: `${name}-status` });
  const zone = el("label", { class: "dropzone", id: `${name}-drop`, for: `${name}-input` },
    el("strong", {}, title), el("span", { class: "muted" },
      `Drop a JSONL file here or click to choose${optional ? " (optional)" : ""}`), input);
  earlier.addEventListener("change", () => {
    state.fileId = earlier.value || null;
    zone.dataset.state = state.fileId ? "ok" : "";
    status.replaceChildren();
    state.onchange?.();
  });
  async function upload(file) {
    state.fileId = null;
    earlier.value = "";
    status.replaceChildren(el("span", { class: "muted" }, `Uploading ${file.name}…`));
    zone.dataset.state = "uploading";
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    try {
      const uploaded = await (await api("/v1/files", { method: "POST", body: form })).json();
      state.fileId = uploaded.id;
      zone.dataset.state = "ok";
      status.replaceChildren(el("span", { class: "ok" },
        `✓ ${uploaded.filename}: ${uploaded.id} (${bytes(uploaded.bytes)})`));
    } catch (error) {
      zone.dataset.state = "error";
      status.replaceChildren(errorBox(`${file.name}: ${error.message}`));
    }
    state.onchange?.();
  }
  input.addEventListener("change", () => input.files[0] && upload(input.files[0]));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) upload(file);
  });
  state.node = el("div", {}, zone, status, uploaded.length ? earlier : null);
  return state;
}

function numberValue(input, type) {
  const text = input.value.trim();
  if (!text) return undefined;
  return type === "int" ? Number.parseInt(text, 10) : Number.parseFloat(text);
}

export async function render(root, { signal }) {
  const [models, files] = await Promise.all(
    [getJson("/v1/models", { signal }), getJson("/v1/files", { signal })]);
  const bases = models.data.filter((m) => m.kind === "base");
  const uploaded = files.data.filter((f) => f.purpose === "fine-tune");
  const training = fileDrop("training-file", "Training file", false, uploaded);
  const validation = fileDrop("validation-file", "Validation file", true, uploaded);
  const model = el("select", { id: "base-model" }, bases.map((m) => el("option", { value: m.id }, m.id)));
  const suffix = el("input", { id: "suffix", placeholder: "my-adapter", maxlength: 40 });
  const seed = el("input", { id: "seed", type: "number", min: 0, placeholder: "random" });
  const fields = HYPERPARAMETERS.map((hp) => ({
    ...hp,
    input: el("input", { id: `hp-${hp.name}`, type: "number", min: 0,
      step: hp.type === "int" ? 1 : "any", placeholder: hp.placeholder }),
  }));
  const start = el("button", { type: "submit", id: "start-job", disabled: true }, "Start fine-tuning");
  const message = el("div", { id: "create-message" });
  training.onchange = () => { start.disabled = !training.fileId; };

  const form = el("form", { class: "card", id: "create-form" },
    el("h2", {}, "1. Data"),
    el("div", { class: "grid" }, training.node, validation.node),
    el("h2", {}, "2. Base model"),
    el("label", {}, "Base model", model),
    el("h2", {}, "3. Hyperparameters"),
    el("div", { class: "fields" },
      fields.map((f) => el("label", {}, f.label, f.input)),
      el("label", {}, "Suffix", suffix), el("label", {}, "Seed", seed)),
    el("div", { class: "actions" }, start), message);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.replaceChildren();
    const hyperparameters = {};
    for (const f of fields) {
      const value = numberValue(f.input, f.type);
      if (value !== undefined) hyperparameters[f.name] = value;
    }
    const body = { model: model.value, training_file: training.fileId, hyperparameters };
    if (validation.fileId) body.validation_file = validation.fileId;
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    if (seed.value.trim()) body.seed = Number.parseInt(seed.value, 10);
    start.disabled = true;
    try {
      const job = await getJson("/v1/fine_tuning/jobs", { method: "POST", json: body });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (error) {
      message.append(errorBox(error.param ? `${error.param}: ${error.message}` : error.message));
      start.disabled = false;
    }
  });
  root.append(el("h1", {}, "New fine-tuning job"), form);
}
