// The registry: base models and this organization's adapters and checkpoints.

import { api, downloadModel, getJson, modelPath } from "../api.js";
import { bytes, el, errorBox, playgroundHref, when } from "../dom.js";

export async function render(root, { signal }) {
  const body = el("tbody");
  const notices = el("div");
  const onError = (error) => notices.replaceChildren(errorBox(error.message));

  function row(model) {
    const adapter = model.kind !== "base";
    const actions = el("td", { class: "actions" },
      el("a", { class: "button small", href: playgroundHref(model.id, adapter ? model.base_model : null) }, "Chat"));
    if (adapter) {
      actions.append(
        el("button", { type: "button", class: "small", onclick: () => downloadModel(model.id).catch(onError) }, "Download"),
        el("button", {
          type: "button", class: "small danger",
          onclick: async () => {
            if (!window.confirm(`Delete ${model.id}${model.kind === "adapter" ? " and its checkpoints" : ""}?`)) return;
            try {
              await api(`/v1/models/${modelPath(model.id)}`, { method: "DELETE" });
              await refresh();
            } catch (error) {
              onError(error);
            }
          },
        }, "Delete"));
    }
    return el("tr", { dataset: { model: model.id, kind: model.kind } },
      el("td", {}, el("code", {}, model.id)),
      el("td", {}, el("span", { class: `badge kind-${model.kind}` }, model.kind)),
      el("td", {}, model.base_model ?? "—"),
      el("td", {}, model.owned_by),
      el("td", {}, bytes(model.size_bytes)),
      el("td", {}, when(model.created)),
      actions);
  }

  async function refresh() {
    const page = await getJson("/v1/models", { signal });
    body.replaceChildren(...page.data.map(row));
  }
  root.append(el("h1", {}, "Models"), notices,
    el("table", { id: "models-table" },
      el("thead", {}, el("tr", {}, ["Model", "Kind", "Base", "Owner", "Size", "Created", ""].map(
        (h) => el("th", {}, h)))),
      body));
  await refresh();
}
