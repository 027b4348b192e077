// Talking to the server: the API key, JSON requests, and server-sent events read from a fetch body (EventSource
// cannot send the Authorization header).

const KEY = "sirocco.key";
let key = sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";
let onAuthNeeded = () => {};

export class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function setKey(value, remember) {
  key = value;
  sessionStorage.setItem(KEY, value);
  if (remember) localStorage.setItem(KEY, value);
  else localStorage.removeItem(KEY);
}

export function hasKey() {
  return key !== "";
}

export function whenAuthNeeded(fn) {
  onAuthNeeded = fn;
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch {
    return response.statusText || String(response.status);
  }
}

// fetch(path) with the key; a 401 asks for the key and throws, any other failure throws an APIError.
export async function call(path, { method = "GET", body, signal } = {}) {
  const response = await fetch(path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
    credentials: "omit",
  });
  if (response.status === 401) {
    const message = await errorText(response);
    onAuthNeeded(message);
    throw new APIError(401, "The server needs an API key (401): " + message);
  }
  if (!response.ok) throw new APIError(response.status, `${response.status}: ${await errorText(response)}`);
  return response;
}

export async function json(path, options) {
  return (await call(path, options)).json();
}

// Yields {event, data} for each server-sent event of a response body; comment lines are skipped.
export async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "event") event = value;
          else if (field === "data") data.push(value);
        }
        if (data.length) yield { event, data: data.join("\n") };
      }
    }
  } finally {
    reader.releaseLock();
  }
}
