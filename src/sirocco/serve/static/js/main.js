// The page's wiring: the key, the model's name, the chat, the inside panel and the status line.

import * as api from "./api.js";
import { Chat } from "./chat.js";
import { Inside } from "./inside.js";
import { Status } from "./status.js";

const $ = (id) => document.getElementById(id);

function notice(text) {
  const box = $("notice");
  box.hidden = !text;
  box.textContent = text || "";
}

const inside = new Inside();
const status = new Status($("status"));
const chat = new Chat({ inside, notice });

async function start() {
  try {
    const models = await api.json("/v1/models");
    chat.model = models.data[0].id;
    $("model-name").textContent = `${chat.model} \u00b7 context ${models.data[0].max_model_len}`;
    notice(null);
  } catch (e) {
    notice(e.status === 401 ? "This server needs an API key (it answered 401)."
      : `Cannot reach the server: ${e.message}`);
    return;
  }
  status.start();
  inside.setEnabled($("inside-toggle").checked);
}

api.whenAuthNeeded((message) => {
  status.stop();
  notice(`This server needs an API key (it answered 401: ${message}).`);
  const dialog = $("key-dialog");
  $("key-why").textContent = api.hasKey()
    ? "The server refused this API key (401). Enter the right one."
    : "This server needs an API key: it answered 401.";
  if (!dialog.open) dialog.showModal();
});

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = $("key-input").value.trim();
  if (!value) return;
  api.setKey(value, $("key-remember").checked);
  $("key-dialog").close();
  $("key-input").value = "";
  start();
});

$("inside-toggle").addEventListener("change", () => {
  chat.readSettings();
  inside.setEnabled($("inside-toggle").checked);
});

start();
