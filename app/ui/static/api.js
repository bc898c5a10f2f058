// The /v1 API from the browser: the key lives in session storage and travels only in the
// Authorization header (never in a URL). EventSource cannot send that header, so Server-Sent
// Events are read from fetch() bodies by `sse` below.

const KEY = "loraforge.apiKey";

export const getKey = () => sessionStorage.getItem(KEY);
export const setKey = (key) => sessionStorage.setItem(KEY, key);
export const clearKey = () => sessionStorage.removeItem(KEY);

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.param = body?.error?.param ?? null;
  }
}

// One call to the API; throws ApiError (OpenAI's envelope's message) unless 2xx.
export async function api(path, { method = "GET", json, body, headers = {}, signal } = {}) {
  const sent = { Authorization: `Bearer ${getKey()}`, ...headers };
  if (json !== undefined) {
    sent["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers: sent, body, signal });
  if (!response.ok) {
    let error = null;
    try {
      error = await response.json();
    } catch {
      // not JSON: the status says it
    }
    if (response.status === 401) window.dispatchEvent(new Event("loraforge:unauthorized"));
    throw new ApiError(response.status, error);
  }
  return response;
}

export const getJson = async (path, options) => (await api(path, options)).json();

// A model id in a path: hub-style ids keep their '/', everything else is escaped.
export const modelPath = (id) => id.split("/").map(encodeURIComponent).join("/");

// Server-Sent Events of a fetch() response: yields {event, id, data} per dispatched event
// (comments such as keep-alive pings are skipped). Lines end in \n or \r\n.
export async function* sse(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "message";
  let id = null;
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      let line = buffer.slice(0, end);
      buffer = buffer.slice(end + 1);
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        if (data.length) yield { event, id, data: data.join("\n") };
        event = "message";
        id = null;
        data = [];
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let text = colon < 0 ? "" : line.slice(colon + 1);
      if (text.startsWith(" ")) text = text.slice(1);
      if (field === "data") data.push(text);
      else if (field === "event") event = text;
      else if (field === "id") id = text;
    }
  }
}

// Saves an adapter's zip: fetched with the key, handed to the browser as a blob.
export async function downloadModel(id) {
  const response = await api(`/v1/models/${modelPath(id)}/adapter`);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = id.replaceAll(":", "_").replaceAll("/", "_") + ".zip";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
