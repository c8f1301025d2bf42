// tinychat: a minimal client of the node's OpenAI-compatible API (streamed chat completions).
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;

function showError(text) { const e = $("error"); e.textContent = text; e.hidden = !text; }

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;  // textContent: model output is never interpreted as HTML
  div.appendChild(body);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models");
    const data = await r.json();
    const sel = $("model");
    sel.innerHTML = "";
    for (const m of data.data || []) {
      const o = document.createElement("option");
      o.value = m.id; o.textContent = m.id;
      sel.appendChild(o);
    }
  } catch (e) { showError(`Could not reach the node: ${e.message}`); }
}

async function send(text) {
  showError("");
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  const body = div.querySelector(".body");
  const stats = document.createElement("div");
  stats.className = "stats";
  div.appendChild(stats);
  controller = new AbortController();
  $("send").hidden = true; $("stop").hidden = false;
  const start = performance.now();
  let first = null, tokens = 0, answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal: controller.signal,
      body: JSON.stringify({ model: $("model").value || undefined, messages: history, stream: true }),
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error?.message || `the node answered ${r.status}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, i).trim(); buf = buf.slice(i + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          if (first === null) first = performance.now();
          tokens += 1; answer += delta; body.textContent = answer;
          const secs = (performance.now() - first) / 1000;
          stats.textContent = `TTFT ${((first - start) / 1000).toFixed(2)} s · ${secs > 0 ? (tokens / secs).toFixed(1) : "–"} tok/s`;
          div.scrollIntoView({ block: "end" });
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(`Error: ${e.message}`);
  } finally {
    history.push({ role: "assistant", content: answer });
    controller = null;
    $("send").hidden = false; $("stop").hidden = true;
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller?.abort());
loadModels();
