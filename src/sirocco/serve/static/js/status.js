// The status line: requests running and waiting, generated tokens/s and time to first token, from /v1/status
// (the numbers of /metrics). Rates and recent means are differences between two polls.

import * as api from "./api.js";

const POLL_MS = 2000;

export class Status {
  constructor(element) {
    this.element = element;
    this.previous = null;
    this.timer = null;
  }

  start() {
    if (this.timer === null) {
      this.poll();
      this.timer = setInterval(() => this.poll(), POLL_MS);
    }
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }

  async poll() {
    let now;
    try {
      now = await api.json("/v1/status");
    } catch (e) {
      if (e.status === 401) this.stop();
      this.element.textContent = `status: ${e.status === 401 ? "needs the API key" : "unreachable"}`;
      this.element.dataset.state = "error";
      return;
    }
    const before = this.previous;
    this.previous = now;
    const parts = [`running ${now.running}`, `waiting ${now.waiting}`];
    if (before) {
      const seconds = now.time - before.time;
      const tokens = now.generation_tokens - before.generation_tokens;
      parts.push(`${seconds > 0 ? (tokens / seconds).toFixed(1) : "0.0"} tokens/s`);
      const count = now.ttft.count - before.ttft.count;
      if (count > 0) parts.push(`TTFT ${Math.round(((now.ttft.sum - before.ttft.sum) / count) * 1000)} ms`);
      else if (now.ttft.count > 0) parts.push(`TTFT ${Math.round((now.ttft.sum / now.ttft.count) * 1000)} ms (mean)`);
    }
    if (now.engine !== "ok") parts.push("engine failed");
    this.element.textContent = parts.join(" \u00b7 ");
    this.element.dataset.state = now.engine;
    this.element.dataset.running = now.running;
    this.element.dataset.waiting = now.waiting;
  }
}
