// Conversations and settings, kept in the browser's localStorage.

const CONVERSATIONS = "sirocco.conversations";
const CURRENT = "sirocco.current";
const SETTINGS = "sirocco.settings";

export const DEFAULTS = { temperature: 0.7, top_p: 0.95, max_tokens: 256, seed: "", inside: true };

function read(name, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(name));
    return value === null ? fallback : value;
  } catch {
    return fallback;
  }
}

function write(name, value) {
  try {
    localStorage.setItem(name, JSON.stringify(value));
    return true;
  } catch {
    return false; // storage full or refused: the page keeps working, unsaved
  }
}

export function newId() {
  const bytes = new Uint8Array(9);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function loadConversations() {
  const all = read(CONVERSATIONS, {});
  return typeof all === "object" && all !== null ? all : {};
}

export function saveConversations(all) {
  return write(CONVERSATIONS, all);
}

export function currentId() {
  return read(CURRENT, null);
}

export function setCurrentId(id) {
  write(CURRENT, id);
}

export function newConversation() {
  const now = Date.now();
  return { id: newId(), title: "", system: "", messages: [], created: now, updated: now };
}

export function loadSettings() {
  return { ...DEFAULTS, ...read(SETTINGS, {}) };
}

export function saveSettings(settings) {
  write(SETTINGS, settings);
}
