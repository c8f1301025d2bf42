// tinychat: the web UI every exo node serves at `/`. Plain ES modules, no build step; the
// libraries it uses are vendored in ../vendor (see vendor/README.md).

import { FriendlyError, apiKey, checkKey, fetchDefaultModel, fetchHealth, fetchModel, fetchModels, fetchTopology, isKeyError, onKeyRefused, pullModel, setApiKey, streamChat } from "./api.js";
import { imageElement, isImageModel, streamImage } from "./images.js";
import { renderInto, renderMarkdown } from "./markdown.js";
import { Store } from "./store.js";
import { h, renderTopology } from "./topology.js";

const $ = (id) => document.getElementById(id);
const store = new Store();

const ui = {
  models: [],
  downloads: new Map(),  // model id -> {percent} of the downloads this page started
  defaultModel: undefined,  // the node's default model (selected until the person picks one); null: unknown
  live: null,            // {conv, msg, el, controller, waitTimer, renderQueued}
  error: null,           // {text, source}
  topology: null,
  topologyOpen: false,
  colors: new Map(),
  authRequired: false,   // GET /health said this node wants an API key
  paused: true,          // no polling of models and topology: before /health is read, and while the key prompt is open
};

// ------------------------------------------------------------------ errors

function showError(text, source = "chat") {
  ui.error = { text, source };
  $("error-text").textContent = text;
  $("error").hidden = false;
}

/** showError(text, source), unless `e` is a refused or missing key: the key prompt says that. */
function reportError(e, text, source) {
  if (!isKeyError(e)) showError(text, source);
}

function clearError(source = null) {
  if (source && ui.error && ui.error.source !== source) return;
  ui.error = null;
  $("error").hidden = true;
}

function plainMessage(e) {
  if (e instanceof FriendlyError) return e.message;
  return `Something went wrong in the page: ${e && e.message ? e.message : e}`;
}

// ------------------------------------------------------------------ models

/**
 * {label, kind, progress (0..1 or null)} of a model object of `GET /v1/models`. Its `state` is
 * "ready" (the answering node holds its shard), "loading", "available" (weights present,
 * loaded on first use), "downloading" (with `download: {bytes_done, bytes_total, percent}`) or
 * "not downloaded".
 * kind: "ready" | "loading" | "downloading" | "idle" | "absent" | "unavailable".
 */
export function modelStatus(m) {
  let raw = m.state ?? m.status ?? (m.ready === true ? "ready" : m.ready === false ? "not ready" : null);
  if (raw && typeof raw === "object") raw = raw.state ?? raw.status ?? null;
  let p = m.download_progress ?? m.progress ?? m.download ?? null;
  if (p && typeof p === "object") {
    p = Number.isFinite(p.percent) ? p.percent / 100
      : p.fraction ?? p.progress ?? (p.total_bytes ? p.downloaded_bytes / p.total_bytes
        : p.bytes_total ? p.bytes_done / p.bytes_total : null);
  }
  if (typeof p === "number") p = p > 1 ? p / 100 : p;
  else p = null;
  const s = String(raw ?? (p !== null && p < 1 ? "downloading" : "ready")).toLowerCase().replace(/_/g, " ");
  if (/^not (downloaded|installed)$/.test(s)) return { kind: "absent", progress: null, label: "not downloaded" };
  if (/download/.test(s) && !/not|need/.test(s)) {
    return { kind: "downloading", progress: p, label: p !== null ? `downloading ${Math.floor(p * 100)}%` : "downloading" };
  }
  if (/load|warm|start/.test(s) && !/not|un/.test(s)) return { kind: "loading", progress: p, label: "loading" };
  if (/^(ready|serving|ok)$/.test(s)) return { kind: "ready", progress: p, label: "ready" };
  if (/available|idle|cold/.test(s) && !/not|un/.test(s)) return { kind: "idle", progress: p, label: "loads on first use" };
  return { kind: "unavailable", progress: p, label: s };
}

/** The status of `m` on this page: a download it started overrides what the node last said. */
function statusOf(m) {
  const d = ui.downloads.get(m.id);
  if (d) return modelStatus({ state: "downloading", download: { percent: d.percent } });
  return modelStatus(m);
}

const GROUPS = [
  { label: "On this node", kinds: ["ready", "loading", "idle", "unavailable"] },
  { label: "Downloading", kinds: ["downloading"] },
  { label: "Not downloaded (select, then Download)", kinds: ["absent"] },
];

function renderModels() {
  const sel = $("model");
  const want = sel.value || store.settings.model || ui.defaultModel;
  const option = (m) => {
    const st = statusOf(m);
    return h("option", { value: m.id, "data-state": st.kind, title: m.id, text: optionText(m, st) });
  };
  const groups = GROUPS.map((g) => ({ ...g, models: ui.models.filter((m) => g.kinds.includes(statusOf(m).kind)) }))
    .filter((g) => g.models.length);
  sel.replaceChildren(...groups.map((g) => h("optgroup", { label: g.label }, g.models.map(option))));
  if (!ui.models.length) sel.append(h("option", { value: "", text: "no model available" }));
  if (ui.models.some((m) => m.id === want)) sel.value = want;
  sel.disabled = !ui.models.length;
  renderModelBadge();
}

function optionText(m, st) {
  const name = m.name && m.name !== m.id ? `${m.name}` : m.id;
  return `${name}${isImageModel(m) ? " · image" : ""} — ${st.label}`;
}

/** Redraw the option of model `id` and the badge only (a download's progress: the list stays put). */
function renderModelProgress(id) {
  const m = ui.models.find((x) => x.id === id);
  const opt = m && [...$("model").options].find((o) => o.value === id);
  if (!opt) { renderModels(); return; }
  const st = statusOf(m);
  opt.textContent = optionText(m, st);
  opt.dataset.state = st.kind;
  renderModelBadge();
}

/** The selected model's state, and its Download button or progress bar. */
function renderModelBadge() {
  const m = ui.models.find((x) => x.id === $("model").value);
  const badge = $("model-state");
  const download = $("model-download");
  const progress = $("model-progress");
  $("input").placeholder = isImageModel(m) ? "Describe an image…" : "Ask anything…";
  if (!m) {
    badge.textContent = ""; badge.dataset.state = "none";
    download.hidden = true; progress.hidden = true;
    return;
  }
  const st = statusOf(m);
  badge.dataset.state = st.kind;
  badge.textContent = st.label;
  badge.title = `${m.id}: ${st.label}`;
  download.hidden = st.kind !== "absent";
  download.title = `Download ${m.id} to this node${m.size ? ` (${formatBytes(m.size)})` : ""}`;
  progress.hidden = st.kind !== "downloading";
  const pct = st.progress === null ? 0 : Math.min(100, st.progress * 100);
  $("model-progress-bar").value = pct;
  $("model-progress-text").textContent = `${Math.floor(pct)}%`;
  progress.title = `${m.id}: ${st.label}`;
}

function formatBytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(n >= 10 || i === 0 ? 0 : 1)} ${units[i]}`;
}

/** Download `id` to the node, showing its progress; usable when done. */
async function downloadModel(id) {
  if (ui.downloads.has(id)) return;
  clearError();  // whatever it said (say, "download it first") is moot now
  const entry = { percent: 0 };
  ui.downloads.set(id, entry);
  renderModels();
  try {
    for await (const p of pullModel(id)) {
      entry.percent = p.percent;
      renderModelProgress(id);
    }
    ui.downloads.delete(id);
    await refreshModels();
  } catch (e) {
    ui.downloads.delete(id);
    renderModels();
    reportError(e, `Could not download ${id}. ${plainMessage(e)}`, "download");
    refreshModels();
  }
}

/** Name a model to the node (a Hugging Face repo, a path there): listed and selected once it resolves. */
async function addModel(name) {
  clearError("add-model");
  $("add-model-go").disabled = true;
  try {
    const m = await fetchModel(name);
    await refreshModels();
    if (ui.models.some((x) => x.id === m.id)) {
      $("model").value = m.id;
      store.settings.model = m.id;
      store.saveSettings();
      renderModelBadge();
    }
    $("add-model-name").value = "";
  } catch (e) {
    reportError(e, `Could not add ${name}. ${plainMessage(e)}`, "add-model");
  } finally {
    $("add-model-go").disabled = false;
  }
}

let modelTimer = null;
async function refreshModels() {
  clearTimeout(modelTimer);
  if (ui.paused) return;  // resumed when a key is given
  let delay = 15000;
  try {
    const [models, defaultModel] = await Promise.all([
      fetchModels(), ui.defaultModel === undefined ? fetchDefaultModel() : ui.defaultModel]);
    ui.models = models;
    ui.defaultModel = defaultModel;
    renderModels();
    clearError("models");
    if (!ui.models.length) showError("This cluster has no model it can serve. Install a model's weights on a node, then reload.", "models");
    if (ui.models.some((m) => ["loading", "downloading"].includes(statusOf(m).kind))) delay = 2000;
  } catch (e) {
    reportError(e, plainMessage(e), "models");
    delay = 5000;
  }
  modelTimer = setTimeout(refreshModels, document.hidden ? delay * 4 : delay);
}

// ------------------------------------------------------------------ conversations

function renderSidebar() {
  const list = $("conversations");
  const items = store.list().filter((c) => c.messages.length);
  list.replaceChildren(...items.map((c) => {
    const current = c.id === store.currentId;
    const open = h("button", { type: "button", class: "conv-open", "aria-current": current ? "true" : null, title: c.title },
      h("span", { class: "conv-title", text: c.title }),
      h("span", { class: "conv-meta", text: `${plural(c.messages.filter((m) => m.role === "user").length, "question")} · ${relativeTime(c.updatedAt)}` }));
    open.addEventListener("click", () => { store.select(c.id); renderConversation(); renderSidebar(); closeSidebar(); });
    const del = h("button", { type: "button", class: "conv-delete", "aria-label": `Delete the conversation “${c.title}”`, title: "Delete" }, "✕");
    del.addEventListener("click", () => deleteConversation(c.id));
    return h("li", { class: `conv${current ? " current" : ""}`, "data-id": c.id }, open, del);
  }));
  if (!items.length) list.append(h("li", { class: "conv-empty", text: "No conversations yet" }));
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function relativeTime(ms) {
  const s = (Date.now() - ms) / 1000;
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

function deleteConversation(id) {
  if (ui.live && ui.live.conv.id === id) ui.live.controller.abort();
  store.remove(id);
  renderSidebar();
  renderConversation();
}

function newConversation() {
  if (ui.live) return;  // finish or stop the current answer first
  store.currentId = null;
  store.save();
  renderSidebar();
  renderConversation();
  closeSidebar();
  $("input").focus();
}

function renderConversation() {
  const box = $("messages");
  const conv = store.current();
  const welcome = $("welcome");
  box.replaceChildren(welcome);
  welcome.hidden = !!(conv && conv.messages.length);
  if (!conv) return;
  conv.messages.forEach((m, i) => {
    const el = messageElement(m, conv, i);
    box.append(el);
    if (ui.live && ui.live.msg === m) ui.live.el = el;
  });
  box.scrollTop = box.scrollHeight;
}

function messageElement(m, conv, index) {
  const content = h("div", { class: "content" });
  const el = h("article", { class: `msg ${m.role}`, "data-role": m.role }, h("div", { class: "bubble" }, content));
  if (m.role === "user") {
    content.textContent = m.content;
  } else {
    const streaming = !!(ui.live && ui.live.msg === m);
    updateAssistant(el, m, !streaming);
    el.classList.toggle("streaming", streaming);
  }
  return el;
}

/** Redraw an assistant message: Markdown content, stats line, stop/error notes. */
function updateAssistant(el, m, final) {
  const content = el.querySelector(".content");
  if (m.image) content.replaceChildren(imageElement(m));
  else if (m.content) renderInto(content, m.content, { final });
  else if (!final) content.replaceChildren(h("span", { class: "waiting", text: "Waiting for the first token…" }));
  else content.replaceChildren();
  el.querySelector(".stats")?.remove();
  el.querySelector(".note")?.remove();
  const bubble = el.querySelector(".bubble");
  if (m.stats) bubble.append(statsElement(m.stats));
  if (m.stopped) bubble.append(h("div", { class: "note", text: "Stopped." }));
  if (m.error) {
    const retry = h("button", { type: "button", class: "btn small", text: "Retry" });
    retry.addEventListener("click", () => retryLast());
    bubble.append(h("div", { class: "note error", role: "note" }, h("span", { text: m.error }), retry));
  }
}

function statsElement(s) {
  const parts = [];
  if (Number.isFinite(s.ttft)) parts.push(h("span", { class: "ttft", title: "Time to first token", text: `TTFT ${s.ttft.toFixed(2)} s` }));
  parts.push(h("span", { class: "tps", title: "Tokens per second while decoding",
                         text: Number.isFinite(s.tps) ? `${s.tps.toFixed(1)} tok/s` : "– tok/s" }));
  if (s.tokens) parts.push(h("span", { class: "tokens", text: `${s.tokens} tokens` }));
  if (s.finish === "length") parts.push(h("span", { class: "finish", text: "hit the max tokens limit" }));
  return h("div", { class: "stats" }, parts);
}

// ------------------------------------------------------------------ generation

function setGenerating(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("composer").classList.toggle("busy", on);
  $("new-chat").disabled = on;
  document.body.dataset.generating = on ? "true" : "false";
  scheduleTopology();
}

function scheduleRender() {
  const live = ui.live;
  if (!live || live.renderQueued) return;
  live.renderQueued = true;
  requestAnimationFrame(() => {
    live.renderQueued = false;
    if (!live.el || !live.el.isConnected) return;
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    updateAssistant(live.el, live.msg, false);
    live.el.dataset.renders = String(Number(live.el.dataset.renders || 0) + 1);
    if (atBottom) box.scrollTop = box.scrollHeight;
  });
}

/** Why `model` cannot answer yet (plain words), or null. */
function notReady(model) {
  const listed = ui.models.find((m) => m.id === model);
  const kind = listed ? statusOf(listed).kind : null;
  if (kind === "absent") return `${model} is not on this node yet: press Download next to it first.`;
  if (kind === "downloading") return `${model} is still downloading: wait until it is done.`;
  return null;
}

async function send(text) {
  if (ui.live) return;
  if (!$("key-prompt").hidden) { $("key-input").focus(); return; }
  const model = $("model").value;
  if (!model) { showError("There is no model to chat with: this cluster lists none.", "chat"); return; }
  const why = notReady(model);
  if (why) { showError(why, "chat"); return; }
  clearError("chat");
  let conv = store.current();
  if (!conv) conv = store.create(model);
  conv.model = model;
  if (isImageModel(ui.models.find((m) => m.id === model))) { await sendImage(conv, model, text); return; }
  conv.messages.push({ role: "user", content: text });
  const msg = { role: "assistant", content: "", model };
  conv.messages.push(msg);
  store.touch(conv);
  store.save();

  const history = conv.messages.slice(0, -1)
    .filter((m) => m.role === "user" || (m.content && !m.error))
    .map(({ role, content }) => ({ role, content }));
  const system = store.settings.systemPrompt.trim();
  if (system) history.unshift({ role: "system", content: system });

  const controller = new AbortController();
  ui.live = { conv, msg, el: null, controller, renderQueued: false };
  renderConversation();
  renderSidebar();
  setGenerating(true);
  refreshModels();  // shows "loading" while the first answer loads the model

  const t0 = performance.now();
  let first = null, last = null, chunks = 0, usageTokens = null, finish = null;
  const waitStart = Date.now();
  const waitTimer = setInterval(() => {
    const w = ui.live && ui.live.el && ui.live.el.querySelector(".waiting");
    if (w) w.textContent = `Waiting for the first token… ${Math.round((Date.now() - waitStart) / 1000)} s`;
  }, 1000);
  try {
    for await (const ev of streamChat({ model, messages: history, temperature: store.settings.temperature, maxTokens: store.settings.maxTokens }, controller.signal)) {
      if (ev.type === "delta") {
        const now = performance.now();
        if (first === null) first = now;
        last = now;
        chunks += 1;
        msg.content += ev.text;
        msg.stats = liveStats(t0, first, last, chunks);
        scheduleRender();
      } else if (ev.type === "finish") {
        finish = ev.reason;
      } else if (ev.type === "usage") {
        usageTokens = ev.usage.completion_tokens ?? null;
      }
    }
  } catch (e) {
    if (e && e.name === "AbortError") msg.stopped = true;
    else {
      msg.error = plainMessage(e);
      reportError(e, msg.error, "chat");
    }
  } finally {
    clearInterval(waitTimer);
    const tokens = usageTokens ?? chunks;
    msg.stats = first === null ? null : { ...liveStats(t0, first, last, tokens), finish: msg.stopped ? "stopped" : finish };
    endLiveAnswer(conv, msg);
  }
}

/** Image mode: draw `prompt` with image model `model`, showing each denoising step, then the picture. */
async function sendImage(conv, model, prompt) {
  conv.messages.push({ role: "user", content: prompt });
  const msg = { role: "assistant", content: "", model, prompt, image: { step: 0, total: 0 } };
  conv.messages.push(msg);
  store.touch(conv);
  const controller = new AbortController();
  ui.live = { conv, msg, el: null, controller, renderQueued: false };
  renderConversation();
  renderSidebar();
  setGenerating(true);
  try {
    for await (const ev of streamImage({ model, prompt }, controller.signal)) {
      if (ev.type === "progress") msg.image = { step: ev.step, total: ev.total };
      else msg.image = { ...msg.image, src: ev.src, seed: ev.seed, size: ev.size };
      if (ui.live.el) updateAssistant(ui.live.el, msg, false);
    }
  } catch (e) {
    if (e && e.name === "AbortError") msg.stopped = true;
    else {
      msg.error = plainMessage(e);
      reportError(e, msg.error, "chat");
    }
    if (!msg.image.src) msg.image = null;
  } finally {
    endLiveAnswer(conv, msg);  // a picture too large for this browser's storage stays on the page only
  }
}

/** After an answer (text or picture) ends: save the conversation, show the answer's final
 * state, give the composer back, and refresh the models (one may have loaded for it). */
function endLiveAnswer(conv, msg) {
  store.touch(conv);
  store.save();
  const el = ui.live.el;
  ui.live = null;
  if (el && el.isConnected) {
    el.classList.remove("streaming");
    updateAssistant(el, msg, true);
  }
  setGenerating(false);
  renderSidebar();
  refreshModels();
}

/** TTFT (s) from the request to the first token; tokens/s over decoding (after the first token). */
function liveStats(t0, first, last, tokens) {
  const ttft = (first - t0) / 1000;
  const span = (last - first) / 1000;
  const tps = tokens > 1 && span > 0 ? (tokens - 1) / span : null;
  return { ttft, tps, tokens };
}

function retryLast() {
  const conv = store.current();
  if (!conv || ui.live) return;
  while (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
  const user = conv.messages.pop();
  if (!user) return;
  send(user.content);
}

// ------------------------------------------------------------------ topology

let topoTimer = null;
function scheduleTopology(delay = 0) {
  clearTimeout(topoTimer);
  topoTimer = setTimeout(refreshTopology, delay);
}

async function refreshTopology() {
  if (ui.paused) return;  // resumed when a key is given
  try {
    ui.topology = await fetchTopology();
    const n = Object.keys(ui.topology.nodes || {}).length;
    $("node-count").textContent = String(n);
    const working = (ui.topology.active_node_ids || []).length;
    $("toggle-topology").title = `${n} ${n === 1 ? "node" : "nodes"} in this cluster${working ? `, ${working} working` : ""}`;
    $("toggle-topology").classList.toggle("working", working > 0);
    if (ui.topologyOpen) renderTopology($("topology-body"), ui.topology, ui.colors);
    clearError("topology");
  } catch (e) {
    if (ui.topologyOpen && !isKeyError(e)) {
      $("topology-body").replaceChildren(h("p", { class: "note error", text: plainMessage(e) }));
    }
  }
  // fast while someone watches or an answer is being computed, slow otherwise
  const fast = ui.topologyOpen || ui.live;
  scheduleTopology(document.hidden ? 30000 : fast ? 1000 : 10000);
}

function setTopologyOpen(open) {
  ui.topologyOpen = open;
  $("topology").hidden = !open;
  $("toggle-topology").setAttribute("aria-expanded", String(open));
  document.getElementById("app").classList.toggle("topology-open", open);
  if (open) {
    if (ui.topology) renderTopology($("topology-body"), ui.topology, ui.colors);
    else $("topology-body").replaceChildren(h("p", { class: "muted", text: "Asking the node for the cluster…" }));
    scheduleTopology();
  }
}

// ------------------------------------------------------------------ API key

/** Show the key prompt with `message` (why it is asked for; none: no line): polling pauses meanwhile. */
function askForKey(message = null) {
  ui.paused = true;
  clearTimeout(modelTimer);
  clearTimeout(topoTimer);
  $("key-message").textContent = message || "";
  $("key-message").hidden = !message;
  $("key-input").value = "";
  $("key-cancel").hidden = !apiKey();  // changing a working key: the old one stays until a new one is taken
  $("key-prompt").hidden = false;
  renderKeySettings();
  $("key-input").focus();
}

/** Close the key prompt and start (again) polling the node with the kept key. */
function resume() {
  $("key-prompt").hidden = true;
  ui.paused = false;
  renderKeySettings();
  refreshModels();
  scheduleTopology();
}

/** Try the typed key on the node: kept when it takes it, else the prompt says why. */
async function submitKey() {
  const key = $("key-input").value.trim();
  if (!key) return;
  $("key-submit").disabled = true;
  $("key-message").hidden = false;
  $("key-message").textContent = "Checking the key…";
  try {
    await checkKey(key);
    setApiKey(key);
    clearError();
    resume();
  } catch (e) {
    $("key-message").textContent = isKeyError(e) ? `${e.message}. Check the key and enter it again.` : plainMessage(e);
    $("key-input").value = "";
    $("key-input").focus();
  } finally {
    $("key-submit").disabled = false;
  }
}

/** The Settings line about the key: shown when the node wants one or one is kept. */
function renderKeySettings() {
  const kept = !!apiKey();
  $("key-settings").hidden = !(ui.authRequired || kept);
  $("key-state").textContent = kept ? "kept in this browser" : "none";
  $("key-forget").disabled = !kept;
}

function forgetKey() {
  setApiKey("");
  renderKeySettings();
  if (ui.authRequired) askForKey("The key is forgotten: this node needs one to chat.");
}

/** Read /health, then ask for a key if the node wants one and none is kept, else start polling. */
async function start() {
  const health = await fetchHealth();
  if (health) {
    ui.defaultModel = health.defaultModel;
    ui.authRequired = health.authRequired;
  }
  renderKeySettings();
  if (ui.authRequired && !apiKey()) askForKey();
  else resume();
}

// ------------------------------------------------------------------ layout and events

function closeSidebar() {
  document.getElementById("app").classList.remove("sidebar-open");
  $("scrim").hidden = true;
  $("toggle-sidebar").setAttribute("aria-expanded", "false");
}

function toggleSidebar() {
  const open = !document.getElementById("app").classList.contains("sidebar-open");
  document.getElementById("app").classList.toggle("sidebar-open", open);
  $("scrim").hidden = !open;
  $("toggle-sidebar").setAttribute("aria-expanded", String(open));
}

function autoGrow() {
  const ta = $("input");
  ta.style.height = "auto";
  ta.style.height = `${Math.min(ta.scrollHeight, 200)}px`;
}

function initSettings() {
  const s = store.settings;
  $("temperature").value = s.temperature;
  $("temperature-value").textContent = Number(s.temperature).toFixed(1);
  $("max-tokens").value = s.maxTokens;
  $("system-prompt").value = s.systemPrompt;
  $("temperature").addEventListener("input", (e) => {
    s.temperature = Number(e.target.value);
    $("temperature-value").textContent = s.temperature.toFixed(1);
    store.saveSettings();
  });
  $("max-tokens").addEventListener("change", (e) => {
    const v = Math.round(Number(e.target.value));
    s.maxTokens = Number.isFinite(v) && v >= 1 ? v : 1024;
    e.target.value = s.maxTokens;
    store.saveSettings();
  });
  $("system-prompt").addEventListener("input", (e) => { s.systemPrompt = e.target.value; store.saveSettings(); });
}

function init() {
  initSettings();
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || ui.live) return;
    if (!$("key-prompt").hidden) { $("key-input").focus(); return; }  // the message stays in the box
    const why = notReady($("model").value);
    if (why) { showError(why, "chat"); return; }  // the message stays in the box
    $("input").value = "";
    autoGrow();
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("input").addEventListener("input", autoGrow);
  $("stop").addEventListener("click", () => ui.live && ui.live.controller.abort());
  $("new-chat").addEventListener("click", newConversation);
  $("model").addEventListener("change", () => { store.settings.model = $("model").value; store.saveSettings(); renderModelBadge(); });
  $("model-download").addEventListener("click", () => { if ($("model").value) downloadModel($("model").value); });
  $("add-model").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = $("add-model-name").value.trim();
    if (name) addModel(name);
  });
  $("error-close").addEventListener("click", () => clearError());
  $("key-prompt").addEventListener("submit", (ev) => { ev.preventDefault(); submitKey(); });
  $("key-cancel").addEventListener("click", () => { if (apiKey()) resume(); });
  $("key-change").addEventListener("click", () => askForKey());
  $("key-forget").addEventListener("click", forgetKey);
  onKeyRefused((e) => {
    ui.authRequired = true;
    askForKey(e.code === "missing_api_key" ? e.message : `${e.message}. The key is forgotten: enter the right one.`);
  });
  $("toggle-topology").addEventListener("click", () => setTopologyOpen(!ui.topologyOpen));
  $("close-topology").addEventListener("click", () => setTopologyOpen(false));
  $("toggle-sidebar").addEventListener("click", toggleSidebar);
  $("scrim").addEventListener("click", closeSidebar);
  for (const b of document.querySelectorAll(".suggestion")) {
    b.addEventListener("click", () => { if (!ui.live) send(b.textContent); });
  }
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") { if (ui.topologyOpen) setTopologyOpen(false); closeSidebar(); }
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) { refreshModels(); scheduleTopology(); } });
  renderSidebar();
  renderConversation();
  setGenerating(false);
  $("input").focus();
  start();
}

// a small handle for debugging from the console (and for the browser tests)
window.tinychat = { store, ui, renderMarkdown, modelStatus };
init();
