// The conversation: messages, sending and streaming, stop, regenerate, edit-and-resend, the list of
// conversations kept in localStorage, and the settings.

import * as api from "./api.js";
import { renderText } from "./render.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, className, onClick) {
  const b = el("button", className, label);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}

export class Chat {
  constructor({ inside, notice }) {
    this.inside = inside;
    this.notice = notice;
    this.model = null;
    this.conversations = store.loadConversations();
    for (const c of Object.values(this.conversations)) {
      for (const m of c.messages || []) if (m.state === "streaming") m.state = "stopped"; // the page left mid-answer
    }
    this.settings = store.loadSettings();
    this.busy = null; // {controller, reply} while an answer streams
    this.pending = null; // a message element waiting for its next frame
    this.conversation = this.conversations[store.currentId()] || this.latest() || this.create();
    this.bind();
    this.showSettings();
    this.renderList();
    this.renderConversation();
  }

  // -- conversations -------------------------------------------------------------------------------------------
  latest() {
    const all = Object.values(this.conversations).sort((a, b) => b.updated - a.updated);
    return all[0] || null;
  }

  create() {
    const c = store.newConversation();
    this.conversations[c.id] = c;
    return c;
  }

  save() {
    const c = this.conversation;
    c.updated = Date.now();
    if (!c.title) {
      const first = c.messages.find((m) => m.role === "user");
      if (first) c.title = first.content.slice(0, 60);
    }
    this.conversations[c.id] = c;
    store.saveConversations(this.conversations);
    store.setCurrentId(c.id);
  }

  select(id) {
    if (this.busy || !this.conversations[id]) return;
    this.conversation = this.conversations[id];
    store.setCurrentId(id);
    $("system").value = this.conversation.system || "";
    this.renderList();
    this.renderConversation();
  }

  remove(id) {
    if (this.busy && this.conversation.id === id) return;
    delete this.conversations[id];
    store.saveConversations(this.conversations);
    if (this.conversation.id === id) this.conversation = this.latest() || this.create();
    store.setCurrentId(this.conversation.id);
    $("system").value = this.conversation.system || "";
    this.renderList();
    this.renderConversation();
  }

  renderList() {
    const list = $("conversations");
    const all = Object.values(this.conversations).sort((a, b) => b.updated - a.updated);
    list.replaceChildren(
      ...all.map((c) => {
        const li = el("li", c.id === this.conversation.id ? "current" : "");
        li.append(
          button(c.title || "New conversation", "open", () => this.select(c.id)),
          button("\u00d7", "delete", () => this.remove(c.id)),
        );
        li.lastChild.title = "Delete this conversation";
        return li;
      }),
    );
  }

  // -- settings ------------------------------------------------------------------------------------------------
  showSettings() {
    const s = this.settings;
    $("temperature").value = s.temperature;
    $("top_p").value = s.top_p;
    $("max_tokens").value = s.max_tokens;
    $("seed").value = s.seed;
    $("system").value = this.conversation.system || "";
    $("inside-toggle").checked = !!s.inside;
  }

  readSettings() {
    const num = (id, fallback) => {
      const v = parseFloat($(id).value);
      return Number.isFinite(v) ? v : fallback;
    };
    this.settings.temperature = Math.min(2, Math.max(0, num("temperature", store.DEFAULTS.temperature)));
    this.settings.top_p = Math.min(1, Math.max(0.01, num("top_p", store.DEFAULTS.top_p)));
    this.settings.max_tokens = Math.max(1, Math.round(num("max_tokens", store.DEFAULTS.max_tokens)));
    const seed = $("seed").value.trim();
    this.settings.seed = seed === "" ? "" : Math.round(Number(seed));
    this.settings.inside = $("inside-toggle").checked;
    store.saveSettings(this.settings);
  }

  // -- the page's controls -------------------------------------------------------------------------------------
  bind() {
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      this.send();
    });
    $("input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.send();
      }
    });
    $("stop").addEventListener("click", () => this.stop());
    $("new-chat").addEventListener("click", () => {
      if (this.busy) return;
      if (this.conversation.messages.length === 0) return;
      this.conversation = this.create();
      this.save();
      $("system").value = "";
      this.renderList();
      this.renderConversation();
    });
    for (const id of ["temperature", "top_p", "max_tokens", "seed"]) {
      $(id).addEventListener("change", () => this.readSettings());
    }
    $("system").addEventListener("change", () => {
      this.conversation.system = $("system").value;
      this.save();
    });
  }

  setBusy(busy) {
    this.busy = busy;
    $("send").disabled = !!busy;
    $("stop").disabled = !busy;
    document.body.classList.toggle("busy", !!busy);
    this.renderTools();
  }

  // -- messages ------------------------------------------------------------------------------------------------
  renderConversation() {
    const box = $("messages");
    box.replaceChildren(...this.conversation.messages.map((m, i) => this.messageElement(m, i)));
    if (this.conversation.messages.length === 0) {
      box.append(el("p", "empty", "Start a conversation below." + (this.model ? ` Model: ${this.model}.` : "")));
    }
    this.renderTools();
    box.scrollTop = box.scrollHeight;
  }

  messageElement(m, index) {
    const article = el("article", `msg ${m.role}`);
    article.dataset.index = index;
    const head = el("header");
    head.append(el("span", "role", m.role === "user" ? "You" : "Model"));
    head.append(el("span", "stats", this.statsText(m)));
    head.append(el("span", "tools"));
    const body = el("div", "body");
    renderText(body, m.content);
    article.append(head, body);
    if (m.state === "error" && m.error) article.append(el("p", "error", m.error));
    article.classList.toggle("stopped", m.state === "stopped");
    return article;
  }

  renderTools() {
    const msgs = this.conversation.messages;
    for (const article of document.querySelectorAll("#messages article")) {
      const i = Number(article.dataset.index);
      const m = msgs[i];
      const tools = article.querySelector(".tools");
      if (!m || !tools) continue;
      const items = [];
      if (!this.busy) {
        if (m.role === "user") items.push(button("Edit", "edit", () => this.edit(i)));
        if (m.role === "assistant" && i === msgs.length - 1) {
          items.push(button("Regenerate", "regenerate", () => this.regenerate()));
        }
      }
      tools.replaceChildren(...items);
    }
  }

  statsText(m) {
    const s = m.stats;
    if (m.role !== "assistant") return "";
    if (m.state === "streaming") return "writing\u2026";
    if (!s) return m.state === "stopped" ? "stopped" : "";
    const parts = [];
    if (s.tokens !== undefined) parts.push(`${s.tokens} tokens${s.exact ? "" : " (about)"}`);
    if (s.tps) parts.push(`${s.tps.toFixed(1)} tokens/s`);
    if (s.ttft !== undefined) parts.push(`first after ${Math.round(s.ttft)} ms`);
    if (s.prompt !== undefined) parts.push(`prompt ${s.prompt}`);
    if (m.state === "stopped") parts.push("stopped");
    else if (s.finish) parts.push(s.finish === "length" ? "hit max tokens" : s.finish);
    return parts.join(" \u00b7 ");
  }

  // Redraw a streaming message at most once per frame, however fast its tokens come.
  drawSoon(article, m) {
    if (this.pending) {
      this.pending = { article, m };
      return;
    }
    this.pending = { article, m };
    requestAnimationFrame(() => {
      const { article: a, m: msg } = this.pending;
      this.pending = null;
      const box = $("messages");
      const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
      renderText(a.querySelector(".body"), msg.content);
      a.querySelector(".stats").textContent = this.statsText(msg);
      if (atBottom) box.scrollTop = box.scrollHeight;
    });
  }

  // -- actions -------------------------------------------------------------------------------------------------
  send() {
    if (this.busy) return;
    const input = $("input");
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    this.conversation.messages.push({ role: "user", content: text });
    this.save();
    this.renderList();
    this.answer();
  }

  stop() {
    if (this.busy) this.busy.controller.abort();
  }

  regenerate() {
    const msgs = this.conversation.messages;
    if (this.busy || !msgs.length || msgs[msgs.length - 1].role !== "assistant") return;
    msgs.pop();
    this.answer();
  }

  edit(index) {
    if (this.busy) return;
    const article = document.querySelector(`#messages article[data-index="${index}"]`);
    const m = this.conversation.messages[index];
    if (!article || !m || article.querySelector("textarea")) return;
    const area = el("textarea", "edit-area");
    area.value = m.content;
    area.rows = Math.min(12, Math.max(3, m.content.split("\n").length + 1));
    const actions = el("div", "actions");
    actions.append(
      button("Cancel", "cancel", () => this.renderConversation()),
      button("Send", "resend", () => {
        const text = area.value.trim();
        if (!text) return;
        this.conversation.messages = this.conversation.messages.slice(0, index);
        this.conversation.messages.push({ role: "user", content: text });
        this.save();
        this.renderList();
        this.answer();
      }),
    );
    article.querySelector(".body").replaceChildren(area, actions);
    area.focus();
  }

  async answer() {
    this.readSettings();
    const c = this.conversation;
    const messages = (c.system ? [{ role: "system", content: c.system }] : []).concat(
      c.messages.map(({ role, content }) => ({ role, content })),
    );
    const reply = { role: "assistant", content: "", state: "streaming", stats: null };
    c.messages.push(reply);
    this.renderConversation();
    const article = document.querySelector("#messages article:last-of-type");
    const controller = new AbortController();
    this.setBusy({ controller, reply });
    this.notice(null);
    const s = this.settings;
    const body = {
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: s.temperature,
      top_p: s.top_p,
      max_tokens: s.max_tokens,
    };
    if (this.model) body.model = this.model;
    if (s.seed !== "") body.seed = s.seed;
    const channel = s.inside ? await this.inside.channelFor() : null;
    if (channel) body.sirocco_inside = channel;
    const t0 = performance.now();
    let first = null;
    let last = null;
    let chunks = 0;
    let usage = null;
    let finish = null;
    let saved = t0;
    try {
      const response = await api.call("/v1/chat/completions", { method: "POST", body, signal: controller.signal });
      for await (const ev of api.events(response)) {
        if (ev.data === "[DONE]") break;
        const chunk = JSON.parse(ev.data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            const now = performance.now();
            if (first === null) first = now;
            last = now;
            chunks += 1;
            reply.content += piece;
            this.drawSoon(article, reply);
            if (now - saved > 1000) {
              saved = now;
              this.save(); // a reload in the middle keeps what was written so far
            }
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
      reply.state = "done";
    } catch (e) {
      if (e.name === "AbortError") {
        reply.state = "stopped";
      } else {
        reply.state = "error";
        reply.error = e.message;
        this.notice(e.message);
      }
    }
    // The rate between the first and the last token as they arrived; when they arrived too close together to
    // time (a burst: the page was busy, or the answer was short), the rate over the whole wait instead.
    const end = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    let tps;
    if (first !== null && tokens > 2 && last - first >= 100) tps = ((tokens - 1) * 1000) / (last - first);
    else if (first !== null && tokens > 0) tps = (tokens * 1000) / (end - t0);
    reply.stats = {
      tokens,
      exact: !!usage,
      prompt: usage ? usage.prompt_tokens : undefined,
      ttft: first === null ? undefined : first - t0,
      tps,
      finish,
    };
    this.setBusy(null);
    this.save();
    this.renderConversation();
    $("input").focus();
  }
}
