// Conversations and settings, kept in the browser's localStorage (nothing is stored on the node).
//
// Conversation: {id, title, model, createdAt, updatedAt (ms since epoch),
//                messages: [{role: "user"|"assistant", content, stats?, error?, stopped?}]}
// stats: {ttft (seconds), tps (tokens per second), tokens, finish}

const KEY = "tinychat.v1";
const SETTINGS_KEY = "tinychat.settings.v1";
const MAX_CONVERSATIONS = 200;

export const DEFAULT_SETTINGS = Object.freeze({ temperature: 0.7, maxTokens: 1024, systemPrompt: "", model: "" });

function read(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw ? JSON.parse(raw) : fallback;
  } catch {
    return fallback;  // corrupt or blocked storage: start empty rather than break the page
  }
}

function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false;  // full or blocked (private mode): the chat still works, it is just not kept
  }
}

function newId() {
  return (crypto.randomUUID ? crypto.randomUUID() : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`);
}

export class Store {
  constructor() {
    const data = read(KEY, null);
    this.conversations = Array.isArray(data?.conversations) ? data.conversations.filter((c) => c && c.id && Array.isArray(c.messages)) : [];
    this.currentId = data?.currentId ?? null;
    if (!this.get(this.currentId)) this.currentId = null;
    this.settings = { ...DEFAULT_SETTINGS, ...read(SETTINGS_KEY, {}) };
  }

  /** Conversations, most recently updated first. */
  list() {
    return [...this.conversations].sort((a, b) => b.updatedAt - a.updatedAt);
  }

  get(id) {
    return this.conversations.find((c) => c.id === id) || null;
  }

  current() {
    return this.get(this.currentId);
  }

  /** A new, empty conversation, made current (not saved until it has a message). */
  create(model) {
    const now = Date.now();
    const conv = { id: newId(), title: "New chat", model, createdAt: now, updatedAt: now, messages: [] };
    this.conversations.push(conv);
    this.currentId = conv.id;
    if (this.conversations.length > MAX_CONVERSATIONS) {
      const oldest = this.list().slice(MAX_CONVERSATIONS);
      this.conversations = this.conversations.filter((c) => !oldest.includes(c));
    }
    return conv;
  }

  select(id) {
    if (this.get(id)) {
      this.currentId = id;
      this.save();
    }
  }

  remove(id) {
    this.conversations = this.conversations.filter((c) => c.id !== id);
    if (this.currentId === id) this.currentId = this.list()[0]?.id ?? null;
    this.save();
  }

  touch(conv) {
    conv.updatedAt = Date.now();
    if (conv.title === "New chat") {
      const first = conv.messages.find((m) => m.role === "user");
      if (first) conv.title = first.content.replace(/\s+/g, " ").trim().slice(0, 60) || "New chat";
    }
  }

  /** Persist everything (empty conversations are not kept). */
  save() {
    const kept = this.conversations.filter((c) => c.messages.length > 0);
    return write(KEY, { conversations: kept, currentId: kept.some((c) => c.id === this.currentId) ? this.currentId : null });
  }

  saveSettings() {
    write(SETTINGS_KEY, this.settings);
  }
}
