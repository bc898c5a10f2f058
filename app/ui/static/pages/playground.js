// Chat with two models side by side (an adapter and its base, or two adapters), each answer
// streamed from POST /v1/chat/completions with stream=true, read with fetch.

import { api, ApiError, getJson, sse } from "../api.js";
import { el } from "../dom.js";

function pane(side, models, chosen) {
  const select = el("select", { id: `model-${side}` },
    models.map((m) => el("option", { value: m.id, selected: m.id === chosen }, `${m.id} (${m.kind})`)));
  const transcript = el("div", { class: "transcript", id: `transcript-${side}`, "aria-live": "polite" });
  const state = { side, select, transcript, messages: [] };
  select.addEventListener("change", () => {
    state.messages = [];
    transcript.replaceChildren();
  });
  state.node = el("section", { class: "card pane", id: `pane-${side}` }, el("label", {}, "Model", select), transcript);
  return state;
}

async function ask(state, prompt, options, signal) {
  state.messages.push({ role: "user", content: prompt });
  state.transcript.append(el("div", { class: "message user" }, prompt));
  const answer = el("div", { class: "message assistant", dataset: { state: "streaming" } });
  state.transcript.append(answer);
  let text = "";
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      json: { model: state.select.value, messages: state.messages, stream: true, ...options },
      signal,
    });
    for await (const message of sse(response)) {
      if (message.data === "[DONE]") break;
      const chunk = JSON.parse(message.data);
      if (chunk.error) throw new ApiError(200, chunk);
      text += chunk.choices?.[0]?.delta?.content ?? "";
      answer.textContent = text;
      state.transcript.scrollTop = state.transcript.scrollHeight;
    }
    if (!text) answer.append(el("span", { class: "muted" }, "(empty answer)"));
    state.messages.push({ role: "assistant", content: text });
    answer.dataset.state = "done";
  } catch (error) {
    if (signal.aborted) return;
    state.messages.pop();  // the question goes unanswered: ask it again later
    answer.dataset.state = "error";
    answer.classList.add("error");
    answer.textContent = error.message;
  }
}

export async function render(root, { params, signal }) {
  const models = (await getJson("/v1/models", { signal })).data;
  const first = params.model ?? models.find((m) => m.kind === "adapter")?.id ?? models[0]?.id;
  const base = models.find((m) => m.id === first)?.base_model;
  const second = params.compare ?? base ?? models.find((m) => m.id !== first)?.id ?? first;
  const left = pane("left", models, first);
  const right = pane("right", models, second);
  const prompt = el("textarea", { id: "prompt", rows: 3, placeholder: "Ask both models…" });
  const maxTokens = el("input", { id: "max-tokens", type: "number", min: 1, max: 4096, value: "64" });
  const temperature = el("input", { id: "temperature", type: "number", min: 0, max: 2, step: "0.1", value: "0" });
  const send = el("button", { type: "submit", id: "send" }, "Send");
  const form = el("form", { class: "card", id: "chat-form" }, prompt,
    el("div", { class: "fields inline" },
      el("label", {}, "Max tokens", maxTokens), el("label", {}, "Temperature", temperature),
      el("button", { type: "button", class: "link", onclick: () => {
        for (const p of [left, right]) {
          p.messages = [];
          p.transcript.replaceChildren();
        }
      } }, "Clear"),
      send));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    prompt.value = "";
    send.disabled = true;
    const options = {
      max_tokens: Number.parseInt(maxTokens.value, 10) || 64,
      temperature: Number.parseFloat(temperature.value) || 0,
    };
    await Promise.all([left, right].map((p) => ask(p, text, options, signal)));
    send.disabled = false;
    prompt.focus();
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  root.append(el("h1", {}, "Playground"), el("div", { class: "grid two" }, left.node, right.node), form);
  prompt.focus();
}
