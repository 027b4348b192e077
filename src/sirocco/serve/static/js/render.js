// Model text to DOM, safely: every piece of text goes in through textContent or a text node, never as markup.
// Fenced ``` blocks become code blocks (an unclosed fence, while an answer streams, is a code block so far);
// `inline code` becomes <code>.

export function segments(text) {
  const out = [];
  const lines = text.split("\n");
  let prose = [];
  let code = null;
  const flush = () => {
    if (prose.length) out.push({ kind: "text", text: prose.join("\n") });
    prose = [];
  };
  for (const line of lines) {
    const fence = /^\s*```\s*([\w+#.-]*)\s*$/.exec(line);
    if (code === null && fence) {
      flush();
      code = { kind: "code", lang: fence[1], lines: [], open: true };
    } else if (code !== null && /^\s*```\s*$/.test(line)) {
      out.push({ kind: "code", lang: code.lang, text: code.lines.join("\n"), open: false });
      code = null;
    } else if (code !== null) {
      code.lines.push(line);
    } else {
      prose.push(line);
    }
  }
  if (code !== null) out.push({ kind: "code", lang: code.lang, text: code.lines.join("\n"), open: true });
  flush();
  return out;
}

function prose(text) {
  const div = document.createElement("div");
  div.className = "text";
  const parts = text.split(/(`[^`\n]+`)/);
  for (const part of parts) {
    if (part.length > 2 && part.startsWith("`") && part.endsWith("`")) {
      const code = document.createElement("code");
      code.textContent = part.slice(1, -1);
      div.append(code);
    } else if (part) {
      div.append(document.createTextNode(part));
    }
  }
  return div;
}

function codeBlock(seg) {
  const pre = document.createElement("pre");
  pre.className = "code";
  const head = document.createElement("div");
  head.className = "code-head";
  const lang = document.createElement("span");
  lang.textContent = seg.lang || "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "copy";
  copy.addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(seg.text));
  head.append(lang, copy);
  const code = document.createElement("code");
  code.textContent = seg.text;
  pre.append(head, code);
  return pre;
}

export function renderText(element, text) {
  // Blank lines an answer starts with show as nothing.
  const shown = text.replace(/^\s*\n/, "");
  const nodes = segments(shown).map((seg) => (seg.kind === "code" ? codeBlock(seg) : prose(seg.text)));
  element.replaceChildren(...nodes);
}

// A token's text with its whitespace made visible.
export function visible(text) {
  if (text === null || text === undefined) return "";
  return text.replace(/ /g, "\u00b7").replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
}
