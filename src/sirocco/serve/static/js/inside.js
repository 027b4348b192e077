// The inside panel: what the engine did for the answer being written, from the server's inside stream
// (GET /v1/inside/CHANNEL, recorded by the engine's own hooks). Each "steps" event carries the steps of a
// moment (each one's timing, tokens and experts) and the row as the last of them left it (slots, mask); the
// panel keeps their data and redraws at most every REDRAW_MS, in an animation frame.

import * as api from "./api.js";
import { newId } from "./store.js";
import { visible } from "./render.js";

const $ = (id) => document.getElementById(id);
const REDRAW_MS = 250;
const MAX_STEPS = 240; // steps kept for the timeline
const MAX_MOE_TOKENS = 48; // answer tokens shown in the experts grid
const MAX_UNROTATED = 256;
const MAX_GRID = 256; // slots drawn as cells
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f"];

export function expertColour(e) {
  return e < PALETTE.length ? PALETTE[e] : `hsl(${(e * 137.5) % 360} 55% 55%)`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function fresh() {
  return {
    id: null, promptTokens: 0, info: null, finished: null, window: null, slots: [], written: [], cached: 0,
    row: null, mask: null, step: null, steps: [], texts: new Map(), ids: new Map(), moeTokens: [], loads: null,
    dropped: 0, reused: 0, totals: { steps: 0, prefill: 0, decode: 0, ms: 0 },
  };
}

export class Inside {
  constructor() {
    this.enabled = false;
    this.channel = null; // the open channel's name, once the server said "open"
    this.info = null;
    this.state = fresh();
    this.dirty = false;
    this.redraws = 0;
    this.abort = null;
    this.ready = null;
    this.slotCells = [];
    this.lastSlots = [];
    this.slotLayout = null;
    this.moeRows = new Map();
    setInterval(() => {
      if (this.dirty) {
        this.dirty = false;
        requestAnimationFrame(() => this.draw());
      }
    }, REDRAW_MS);
  }

  // -- the stream ----------------------------------------------------------------------------------------------
  setEnabled(on) {
    this.enabled = on;
    $("inside").hidden = !on;
    document.body.classList.toggle("with-inside", on);
    if (on && !this.abort) this.connect();
    if (!on && this.abort) {
      this.abort.abort();
      this.abort = null;
      this.channel = null;
    }
  }

  // The channel to name in a request: waits (briefly) for the stream to be open; null if it is not.
  async channelFor() {
    if (!this.enabled) return null;
    if (!this.abort) this.connect();
    const timeout = new Promise((resolve) => setTimeout(() => resolve(null), 3000));
    return Promise.race([this.ready, timeout]);
  }

  connect() {
    const controller = new AbortController();
    this.abort = controller;
    const name = "page-" + newId();
    let opened;
    this.ready = new Promise((resolve) => (opened = resolve));
    (async () => {
      try {
        const response = await api.call(`/v1/inside/${name}`, { signal: controller.signal });
        for await (const ev of api.events(response)) {
          const data = JSON.parse(ev.data);
          if (ev.event === "open") {
            this.channel = name;
            this.info = data;
            opened(name);
          } else {
            this.handle(ev.event, data);
          }
        }
      } catch (e) {
        if (e.name !== "AbortError") $("inside-note").textContent = `The inside stream stopped: ${e.message}`;
      }
      opened(null);
      if (this.abort === controller) {
        this.abort = null;
        this.channel = null;
        if (this.enabled) setTimeout(() => this.enabled && !this.abort && this.connect(), 2000);
      }
    })();
  }

  // -- events --------------------------------------------------------------------------------------------------
  handle(kind, data) {
    const s = this.state;
    if (kind === "start") {
      this.state = fresh();
      this.state.id = data.id;
      this.state.promptTokens = data.prompt_tokens;
      this.state.info = data;
      if (data.experts) this.state.loads = [];
      this.lastSlots = []; // a new request: every cell is redrawn, even where the positions are the same
      this.moeRows.clear();
      $("moe-grid").replaceChildren();
    } else if (kind === "steps") {
      if (data.id !== s.id) return;
      for (const step of data.steps) this.step(s, step);
      s.window = data.window;
      s.slots = data.slots || [];
      s.written = data.written || [];
      s.mask = data.mask;
      s.dropped += data.dropped || 0;
    } else if (kind === "end") {
      if (data.id !== s.id) return;
      s.finished = data.finish_reason;
    } else if (kind === "error") {
      $("inside-note").textContent = `Recording failed: ${data.message}`;
    }
    this.dirty = true;
  }

  step(s, ev) {
    s.cached = ev.cached;
    s.row = ev.row;
    s.step = ev;
    // the prompt tokens a row continued from the prefix store with (no step brought them), then the step's own
    for (const [pos, id, text] of [...(ev.restored || []), ...ev.tokens]) {
      s.ids.set(pos, id);
      s.texts.set(pos, text);
    }
    if (ev.cached_tokens) s.reused = ev.cached_tokens;
    const t = s.totals;
    t.steps += 1;
    t.prefill += ev.prefill_tokens;
    t.decode += ev.decode_tokens;
    t.ms += ev.ms;
    s.steps.push({
      step: ev.step, kind: ev.kind, rows: ev.rows, prefill: ev.prefill_tokens, decode: ev.decode_tokens, ms: ev.ms,
      mine: ev.tokens.length, reused: ev.cached_tokens,
      accepted: ev.proposed_tokens ? `${ev.accepted_tokens}/${ev.proposed_tokens}` : undefined,
    });
    if (s.steps.length > MAX_STEPS) s.steps.shift();
    if (ev.moe) {
      const { layers, experts, weights } = ev.moe;
      if (!s.loads) s.loads = [];
      layers.forEach((layer, li) => {
        if (!s.loads[li]) s.loads[li] = { layer, counts: [] };
      });
      ev.tokens.forEach(([pos], i) => {
        experts[i].forEach((choice, li) => {
          const counts = s.loads[li].counts;
          for (const e of choice) counts[e] = (counts[e] || 0) + 1;
        });
        if (pos < s.promptTokens) return; // the experts grid shows answer tokens; the loads count every token
        s.moeTokens.push({ pos, text: s.texts.get(pos), experts: experts[i], weights: weights[i] });
      });
      if (s.moeTokens.length > MAX_MOE_TOKENS) s.moeTokens.splice(0, s.moeTokens.length - MAX_MOE_TOKENS);
    }
  }

  // -- drawing -------------------------------------------------------------------------------------------------
  draw() {
    this.redraws += 1;
    const s = this.state;
    const root = $("inside");
    root.dataset.redraws = this.redraws;
    root.dataset.state = s.id === null ? "idle" : s.finished ? "done" : "running";
    root.dataset.request = s.id || "";
    const info = s.info || this.info;
    $("inside-note").textContent = s.id === null
      ? "Send a message: the panel follows the answer being written."
      : `${info ? info.model : ""} \u00b7 request ${s.id} \u00b7 ${s.promptTokens} prompt tokens` +
        (s.reused ? ` (${s.reused} from the prefix store)` : "") +
        (s.finished ? ` \u00b7 finished (${s.finished})` : " \u00b7 writing") +
        (s.dropped ? ` \u00b7 ${s.dropped} steps not shown (the page fell behind)` : "");
    this.drawSlots(s);
    this.drawMask(s);
    this.drawMoe(s, info);
    this.drawSteps(s);
  }

  drawSlots(s) {
    const box = $("slots");
    const n = s.slots.length;
    // Every slot up to MAX_GRID; past that (a long window, or a layer without one) the slots holding the
    // newest MAX_GRID / 2 positions, still in slot order.
    let shown = [...Array(n).keys()];
    if (n > MAX_GRID) {
      const newest = s.slots.map((pos, slot) => ({ pos, slot })).filter((x) => x.pos !== null)
        .sort((a, b) => b.pos - a.pos).slice(0, MAX_GRID / 2).map((x) => x.slot);
      shown = newest.sort((a, b) => a - b);
    }
    const layout = shown.join(",");
    if (this.slotLayout !== layout) {
      this.slotLayout = layout;
      this.slotCells = [];
      this.lastSlots = [];
      box.replaceChildren();
      for (const i of shown) {
        const cell = el("div", "slot");
        cell.dataset.slot = i;
        cell.append(el("span", "n", String(i)), el("span", "pos"), el("span", "tok"));
        this.slotCells.push(cell);
        box.append(cell);
      }
    }
    const written = new Set(s.written);
    const held = s.slots.filter((p) => p !== null).length;
    shown.forEach((i, c) => {
      const cell = this.slotCells[c];
      const pos = s.slots[i];
      const key = `${pos}|${s.ids.get(pos)}|${written.has(i)}`;
      if (this.lastSlots[c] === key) return;
      this.lastSlots[c] = key;
      cell.classList.toggle("empty", pos === null);
      cell.classList.toggle("written", written.has(i));
      if (pos === null) {
        delete cell.dataset.pos;
        delete cell.dataset.token;
        cell.children[1].textContent = "";
        cell.children[2].textContent = "";
        cell.title = `slot ${i}: empty`;
      } else {
        const text = s.texts.get(pos);
        cell.dataset.pos = pos;
        cell.dataset.token = s.ids.get(pos);
        cell.classList.toggle("answer", pos >= s.promptTokens);
        cell.children[1].textContent = String(pos);
        cell.children[2].textContent = visible(text);
        cell.title = `slot ${i} holds position ${pos} (token ${s.ids.get(pos)}: ${JSON.stringify(text)})`;
      }
    });
    const partial = shown.length < n ? ` · showing the ${shown.length} slots with the newest positions` : "";
    const wraps = n ? Math.floor(Math.max(0, s.cached - 1) / n) : 0;
    const positions = s.slots.filter((p) => p !== null);
    const lo = positions.length ? Math.min(...positions) : 0;
    const hi = positions.length ? Math.max(...positions) : 0;
    $("cache-caption").textContent = n === 0 ? "" :
      `window ${s.window === null ? "none" : s.window} \u00b7 ${n} slots \u00b7 row ${s.row} \u00b7 ` +
      `holds positions ${lo}\u2013${hi} of ${s.cached} \u00b7 slot = position mod ${n} \u00b7 ` +
      (wraps ? `wrapped ${wraps}\u00d7: the oldest positions were overwritten`
        : `not wrapped yet (${held}/${n} used)`) + partial;
    $("cache-panel").classList.toggle("wrapped", wraps > 0);
    const order = s.slots.map((pos, slot) => ({ pos, slot })).filter((x) => x.pos !== null)
      .sort((a, b) => a.pos - b.pos);
    const tail = order.slice(-MAX_UNROTATED);
    const strip = $("unrotated");
    strip.replaceChildren(...tail.map(({ pos, slot }) => {
      const span = el("span", pos >= s.promptTokens ? "u answer" : "u", visible(s.texts.get(pos)));
      span.title = `position ${pos}, slot ${slot}`;
      if (written.has(slot)) span.classList.add("written");
      return span;
    }));
    if (order.length > tail.length) strip.prepend(el("span", "more", `\u2026${order.length - tail.length} more`));
  }

  drawMask(s) {
    const canvas = $("mask");
    const m = s.mask;
    if (!m) {
      $("mask-caption").textContent = "";
      return;
    }
    const q = m.queries.length;
    const k = m.keys.length;
    const width = Math.max(200, canvas.parentElement.clientWidth - 4);
    const cell = Math.max(1, Math.min(14, Math.floor(width / Math.max(1, k))));
    const cw = k * cell <= width ? cell : width / k;
    const ch = Math.max(1, Math.min(m.phase === "decode" ? 22 : 14, Math.floor(240 / Math.max(1, q))));
    const rowsShown = Math.min(q, Math.floor(240 / ch) || 1);
    const ratio = window.devicePixelRatio || 1;
    const w = Math.ceil(k * cw);
    const h = rowsShown * ch + 16;
    canvas.width = Math.ceil(w * ratio);
    canvas.height = Math.ceil(h * ratio);
    canvas.style.width = `${w}px`;
    canvas.style.height = `${h}px`;
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.fillStyle = "#e9ecef";
    g.fillRect(0, 0, w, rowsShown * ch);
    // An allowed key is drawn darker the nearer it is to its query, so the rotation of the slots shows.
    const step = q / rowsShown;
    const gap = ch > 3 ? 1 : 0;
    for (let r = 0; r < rowsShown; r++) {
      const qi = Math.floor(r * step);
      const qpos = m.queries[qi];
      const span = s.window || Math.max(1, qpos + 1);
      for (const [start, count] of m.runs[qi] || []) {
        if (cw < 2) {
          g.fillStyle = "#1f4e79";
          g.fillRect(start * cw, r * ch, count * cw, ch - gap);
          continue;
        }
        for (let c = start; c < start + count; c++) {
          const age = Math.min(1, Math.max(0, (qpos - m.keys[c][0]) / span));
          g.fillStyle = `hsl(210 58% ${Math.round(24 + 46 * age)}%)`;
          g.fillRect(c * cw, r * ch, cw - (cw > 4 ? 1 : 0), ch - gap);
        }
      }
    }
    // keys read from the cache, then the step's own; in a decode step the slot written this step
    const cached = m.keys.filter(([, slot]) => slot !== null).length;
    if (m.phase !== "decode" && cached > 0 && cached < k) {
      g.fillStyle = "#f4b942";
      g.fillRect(cached * cw - 1, 0, 2, rowsShown * ch);
    }
    if (m.phase === "decode") {
      g.fillStyle = "#f4b942";
      for (const slot of s.written) g.fillRect(slot * cw, rowsShown * ch + 2, cw, 4);
    }
    g.fillStyle = "#495057";
    g.font = "10px system-ui, sans-serif";
    const kinds = m.phase === "decode" ? "keys: the row's slots in slot order; darker is newer" :
      cached ? `keys: ${cached} from the cache (oldest first), then ${k - cached} new` : "keys: the chunk's own";
    g.fillText(kinds, 0, rowsShown * ch + 14 - (m.phase === "decode" ? 0 : 2));
    const qa = m.queries[0];
    const qb = m.queries[q - 1];
    $("mask-caption").textContent =
      `step ${s.step.step} \u00b7 ${m.phase} \u00b7 ${q} ${q === 1 ? "query" : "queries"} (position ` +
      `${q === 1 ? qa : `${qa}\u2013${qb}`}) \u00b7 ${k} keys \u00b7 window ${s.window === null ? "none" : s.window}` +
      ` \u00b7 lowering ${m.lowering}` + (rowsShown < q ? ` \u00b7 every ${step.toFixed(1)}th query drawn` : "");
    canvas.dataset.queries = q;
    canvas.dataset.keys = k;
  }

  drawMoe(s, info) {
    const panel = $("moe-panel");
    const has = !!(info && info.experts);
    panel.hidden = !has;
    if (!has) return;
    const experts = info.experts;
    const legend = $("moe-legend");
    if (legend.childElementCount !== experts) {
      legend.replaceChildren(...Array.from({ length: experts }, (_, e) => {
        const chip = el("span", "chip", `expert ${e}`);
        chip.style.setProperty("--c", expertColour(e));
        return chip;
      }));
    }
    $("moe-caption").textContent = `${experts} experts, ${info.experts_per_token} per token, ${info.layers} layers:` +
      " a cell's colour is the first choice, its stripe the second";
    const grid = $("moe-grid");
    if (!grid.firstChild) {
      const head = el("div", "moe-row moe-head");
      head.append(el("span", "moe-tok", "token"));
      for (let layer = 0; layer < info.layers; layer++) head.append(el("span", "moe-cell", `layer ${layer}`));
      grid.append(head);
    }
    const keep = new Set(s.moeTokens.map((t) => t.pos));
    for (const [pos, row] of this.moeRows) {
      if (!keep.has(pos)) {
        row.remove();
        this.moeRows.delete(pos);
      }
    }
    for (const t of s.moeTokens) {
      if (this.moeRows.has(t.pos)) continue;
      const row = el("div", "moe-row");
      row.dataset.pos = t.pos;
      row.append(el("span", "moe-tok", visible(t.text)));
      t.experts.forEach((choice, layer) => {
        const cell = el("span", "moe-cell");
        cell.dataset.layer = layer;
        cell.dataset.experts = choice.join(",");
        cell.style.setProperty("--c", expertColour(choice[0]));
        cell.style.setProperty("--c2", expertColour(choice.length > 1 ? choice[1] : choice[0]));
        cell.textContent = choice.join("\u00b7");
        cell.title = `layer ${layer}: experts ${choice.join(", ")} (weights ${t.weights[layer].join(", ")})`;
        row.append(cell);
      });
      grid.append(row);
      this.moeRows.set(t.pos, row);
    }
    grid.scrollTop = grid.scrollHeight;
    const loads = $("moe-loads");
    loads.replaceChildren(...(s.loads || []).map((l) => {
      const total = l.counts.reduce((a, b) => a + (b || 0), 0) || 1;
      const line = el("div", "load");
      line.append(el("span", "load-name", `layer ${l.layer}`));
      const bar = el("span", "load-bar");
      bar.dataset.counts = Array.from({ length: experts }, (_, e) => l.counts[e] || 0).join(",");
      for (let e = 0; e < experts; e++) {
        const share = (l.counts[e] || 0) / total;
        const part = el("span", "load-part");
        part.style.setProperty("--c", expertColour(e));
        part.style.width = `${(share * 100).toFixed(2)}%`;
        if (share >= 0.08) part.textContent = `${Math.round(share * 100)}%`;
        part.title = `expert ${e}: ${l.counts[e] || 0} of ${total} choices (${(share * 100).toFixed(1)}%, even ` +
          `share ${(100 / experts).toFixed(1)}%)`;
        bar.append(part);
      }
      line.append(bar);
      return line;
    }));
  }

  drawSteps(s) {
    const canvas = $("timeline");
    const steps = s.steps;
    const width = Math.max(200, canvas.parentElement.clientWidth - 4);
    const height = 90;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.ceil(width * ratio);
    canvas.height = Math.ceil(height * ratio);
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const top = Math.max(1, ...steps.map((x) => x.ms));
    const bw = width / Math.max(60, steps.length);
    steps.forEach((x, i) => {
      const h = (x.ms / top) * (height - 12);
      const tokens = x.prefill + x.decode || 1;
      const hp = h * (x.prefill / tokens);
      const left = i * bw;
      g.fillStyle = "#f28e2b";
      g.fillRect(left, height - h, Math.max(1, bw - 0.5), hp);
      g.fillStyle = "#4e79a7";
      g.fillRect(left, height - h + hp, Math.max(1, bw - 0.5), h - hp);
    });
    g.fillStyle = "#495057";
    g.font = "10px system-ui, sans-serif";
    g.fillText(`${top.toFixed(1)} ms`, 2, 10);
    const t = s.totals;
    const last = steps[steps.length - 1];
    $("steps-caption").textContent = !last ? "" :
      `${t.steps} steps \u00b7 ${t.prefill} pre-fill and ${t.decode} decode tokens over all rows \u00b7 ` +
      `${(t.ms / Math.max(1, t.steps)).toFixed(1)} ms per step \u00b7 orange: pre-fill, blue: decode`;
    const table = $("steps-table");
    const head = el("tr");
    const cols = ["step", "kind", "rows", "pre-fill", "decode", "ms"];
    const reuse = steps.some((x) => x.reused !== undefined);
    const spec = steps.some((x) => x.accepted !== undefined);
    if (reuse) cols.push("prefix reused");
    if (spec) cols.push("accepted");
    head.append(...cols.map((c) => el("th", "", c)));
    const rows = steps.slice(-6).reverse().map((x) => {
      const tr = el("tr");
      const cells = [x.step, x.kind, x.rows, x.prefill, x.decode, x.ms.toFixed(2)];
      if (reuse) cells.push(x.reused ?? "");
      if (spec) cells.push(x.accepted ?? "");
      tr.append(...cells.map((c) => el("td", "", String(c))));
      return tr;
    });
    table.replaceChildren(head, ...rows);
  }
}
