import { ApiError, clearKey, getJson, setKey } from "../api.js";
import { el, errorBox } from "../dom.js";

export async function render(root, { params }) {
  const key = el("input", {
    id: "api-key", type: "password", autocomplete: "off", required: true,
    placeholder: "lf-…", "aria-label": "API key",
  });
  const message = el("div");
  const form = el(
    "form", { class: "card narrow", id: "sign-in-form" },
    el("h1", {}, "Sign in"),
    el("p", { class: "muted" },
      "Paste an API key (", el("code", {}, "loraforge keys create --org NAME"),
      "). It is kept in this tab's session storage only."),
    el("label", {}, "API key", key),
    el("button", { type: "submit", id: "sign-in" }, "Sign in"),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.replaceChildren();
    setKey(key.value.trim());
    try {
      await getJson("/v1/models");  // proves the key before anything else is shown
      const next = params.next?.startsWith("#/") && !params.next.startsWith("#/signin");
      const target = next ? params.next : "#/jobs";
      // the sign-in form was shown at the target's own address: render it again
      if (location.hash === target) window.dispatchEvent(new HashChangeEvent("hashchange"));
      else location.hash = target;
    } catch (error) {
      clearKey();
      message.append(errorBox(error instanceof ApiError ? error.message : String(error)));
    }
  });
  root.append(form);
  key.focus();
}
