// Building the page without HTML strings: data only ever becomes text nodes or attributes,
// so nothing a user uploaded or a model wrote can inject markup.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "value" || name === "checked" || name === "disabled") node[name] = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

export function append(node, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export const clear = (node) => node.replaceChildren();

export function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "—";
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function statusBadge(status) {
  return el("span", { class: `badge status-${status}`, dataset: { status } }, status);
}

export function errorBox(message) {
  return el("div", { class: "error", role: "alert" }, message);
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

// A playground link for a model (and, optionally, one to compare it with).
export function playgroundHref(model, compare) {
  const query = new URLSearchParams({ model });
  if (compare) query.set("compare", compare);
  return `#/playground?${query}`;
}
