// The node's HTTP API as tinychat uses it: models, downloads (Ollama's streamed /api/pull),
// topology, and streamed chat completions (OpenAI's server-sent events). Every failure becomes
// a FriendlyError whose message is meant to be shown to a person as it is.
//
// API key: a node with keys configured says `"auth_required": true` in `GET /health` and
// answers 401 to any other API call without one. The key the person gave is kept in
// localStorage and every request goes through `apiFetch`, the one place that sends it
// (`Authorization: Bearer KEY`). A 401 or 403 to the kept key forgets it and calls the
// handler set with `onKeyRefused`.

/** An error with a message in plain words (`message`) and the API's details (`detail`). */
export class FriendlyError extends Error {
  constructor(message, { status = null, code = null, detail = null } = {}) {
    super(message);
    this.name = "FriendlyError";
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

const KEY_STORAGE = "tinychat.apiKey";

/** The API key kept in this browser, or "" when none. */
export function apiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";  // blocked storage
  }
}

/** Keep `key` in this browser (sent with every request from now on); "" forgets it. */
export function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // blocked storage: nothing is kept, the next request goes without a key
  }
}

let keyRefusedHandler = () => {};

/** `fn(error)` is called when the node refuses the kept key (already forgotten by then). */
export function onKeyRefused(fn) {
  keyRefusedHandler = fn;
}

/** True for the FriendlyError of a missing or refused API key (HTTP 401 or 403). */
export function isKeyError(e) {
  return e instanceof FriendlyError && (e.status === 401 || e.status === 403);
}

const UNREACHABLE = () =>
  `Can't reach the exo node at ${location.host}. Check that exo is still running there, then try again.`;

/** Plain words for an API error body ({"error": {message, type, param, code}}) and HTTP status. */
export function describeApiError(status, body) {
  const err = (body && body.error) || {};
  const msg = typeof err === "string" ? err : err.message;
  const code = err.code || null;
  let prefix;
  if (status === 401 || status === 403) prefix = "The node refused the API key";
  else if (status === 400 || status === 422) prefix = "The node did not accept the request";
  else if (status === 404) prefix = "Not found on this cluster";
  else if (status === 413) prefix = "The message is too large";
  else if (status === 429) prefix = "The cluster is busy";
  else if (status === 503) prefix = "No node can run this model right now";
  else if (status === 504) prefix = "The model took too long to answer";
  else if (status && status >= 500) prefix = "The node failed while answering";
  else prefix = "The request failed";
  const text = msg ? `${prefix}: ${msg}` : `${prefix} (HTTP ${status}).`;
  return new FriendlyError(text, { status, code, detail: err });
}

/**
 * `fetch(path, init)` with the API key (`key`, by default the kept one) as `Authorization:
 * Bearer KEY`: every request of the page goes through here. Throws FriendlyError when the node
 * cannot be reached, and for a 401 or 403 (the body's message in its words; the kept key, if it
 * was the one sent, is forgotten and the `onKeyRefused` handler told), or the AbortError of
 * `init.signal`. Any other status is the caller's to read.
 */
export async function apiFetch(path, init = {}, key = apiKey()) {
  const headers = { ...(init.headers || {}) };
  if (key) headers.Authorization = `Bearer ${key}`;
  let r;
  try {
    r = await fetch(path, { ...init, headers });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new FriendlyError(UNREACHABLE());
  }
  if (r.status === 401 || r.status === 403) {
    const body = await r.json().catch(() => null);
    const err = key ? describeApiError(r.status, body)
      : new FriendlyError("This node needs an API key.", { status: r.status, code: "missing_api_key", detail: body && body.error });
    if (!key || key === apiKey()) {  // not a candidate being tried (checkKey)
      setApiKey("");
      keyRefusedHandler(err);
    }
    throw err;
  }
  return r;
}

async function getJSON(path, signal) {
  const r = await apiFetch(path, { signal, headers: { Accept: "application/json" } });
  const body = await r.json().catch(() => null);
  if (!r.ok) throw describeApiError(r.status, body);
  if (body === null) throw new FriendlyError(`The node sent an unreadable answer to ${path}.`);
  return body;
}

/** `GET /v1/models` -> the list of model objects. */
export async function fetchModels(signal) {
  const body = await getJSON("/v1/models", signal);
  return Array.isArray(body.data) ? body.data : [];
}

/**
 * `POST path` with a JSON body, asking for a streamed answer (`accept`): the reader of its body.
 * Throws FriendlyError (node unreachable, an API error status, no stream) or the AbortError of `signal`.
 */
export async function postStream(path, payload, accept, signal) {
  const r = await apiFetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: accept },
    body: JSON.stringify(payload),
    signal,
  });
  if (!r.ok) {
    const body = await r.json().catch(() => null);
    throw describeApiError(r.status, body);
  }
  if (!r.body) throw new FriendlyError("The node answered without a stream.");
  return r.body.getReader();
}

/**
 * What `GET /health` says (its body, whatever the status) that the page needs:
 * {defaultModel (or null), authRequired}; null when the node cannot be reached or read.
 */
export async function fetchHealth(signal) {
  try {
    const r = await apiFetch("/health", { signal, headers: { Accept: "application/json" } });
    const body = await r.json();
    return { defaultModel: (body && body.model && body.model.id) || null, authRequired: !!(body && body.auth_required) };
  } catch {
    return null;
  }
}

/** The node's default model (`GET /health`: `model.id`), or null. */
export async function fetchDefaultModel(signal) {
  const health = await fetchHealth(signal);
  return health ? health.defaultModel : null;
}

/**
 * Try `key` on the node (`GET /v1/models` with it) without keeping it: resolves when the node
 * takes it; throws the FriendlyError of a refusal (see `isKeyError`) or of any other failure.
 */
export async function checkKey(key, signal) {
  const r = await apiFetch("/v1/models", { signal, headers: { Accept: "application/json" } }, key);
  if (!r.ok) throw describeApiError(r.status, await r.json().catch(() => null));
}

/** A model name as a path under /v1/models/ (its slashes kept: hub names are org/name). */
function modelPath(name) {
  return name.split("/").map(encodeURIComponent).join("/");
}

/**
 * `GET /v1/models/{name}` -> its model object. Naming a model (a Hugging Face repo, a path on
 * the node) makes the node resolve it (a hub model's header is fetched) and list it from then on.
 */
export function fetchModel(name, signal) {
  return getJSON(`/v1/models/${modelPath(name)}`, signal);
}

/**
 * Download a model to the node (`POST /api/pull`, streamed). Yields {percent, done, total}
 * (bytes of every file so far) as lines arrive, then returns once the node said "success".
 * Throws FriendlyError (the node refused, the download failed, the connection broke) or the
 * AbortError of `signal`; the node's download goes on when the page stops listening.
 */
export async function* pullModel(name, signal) {
  const reader = await postStream("/api/pull", { model: name, stream: true }, "application/x-ndjson", signal);
  const decoder = new TextDecoder();
  const files = new Map();  // digest -> {total, completed}
  let buf = "";
  let success = false;
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        if (e.name === "AbortError" || (signal && signal.aborted)) throw e;
        throw new FriendlyError("The connection to the node broke during the download. It may go on there: reload to see.");
      }
      if (chunk.done) break;
      buf += decoder.decode(chunk.value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line) continue;
        let obj;
        try { obj = JSON.parse(line); } catch { continue; }
        if (obj.error) throw new FriendlyError(`The download failed: ${obj.error}`, { detail: obj.error });
        if (obj.digest && Number.isFinite(obj.total)) {
          files.set(obj.digest, { total: obj.total, completed: obj.completed || 0 });
          let total = 0, done = 0;
          for (const f of files.values()) { total += f.total; done += f.completed; }
          yield { percent: total > 0 ? (100 * done) / total : 0, done, total };
        }
        if (obj.status === "success") success = true;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  if (!success) throw new FriendlyError("The node ended the download without saying it was complete.");
}

/** `GET /v1/topology` -> {nodes, edges, partitions, active_node_ids, node_id}. */
export function fetchTopology(signal) {
  return getJSON("/v1/topology", signal);
}

/**
 * Stream one chat completion. Yields events:
 *   {type: "delta", text}            a piece of the answer (one SSE chunk, usually one token)
 *   {type: "finish", reason}         "stop" | "length" | ...
 *   {type: "usage", usage}           OpenAI usage (completion_tokens ...)
 * Throws FriendlyError (API or network failure) or the AbortError of `signal`.
 */
export async function* streamChat({ model, messages, temperature, maxTokens }, signal) {
  const payload = { model, messages, stream: true, stream_options: { include_usage: true } };
  if (Number.isFinite(temperature)) payload.temperature = temperature;
  if (Number.isFinite(maxTokens) && maxTokens > 0) payload.max_tokens = maxTokens;
  const reader = await postStream("/v1/chat/completions", payload, "text/event-stream", signal);
  let sawDone = false;
  for await (const data of sseData(reader, signal, "The connection to the node broke in the middle of the answer.")) {
    if (data === "[DONE]") { sawDone = true; continue; }
    let obj;
    try { obj = JSON.parse(data); } catch { continue; }
    if (obj.error) {
      const msg = obj.error.message || String(obj.error);
      throw new FriendlyError(`The answer stopped because of an error on the cluster: ${msg}`, { detail: obj.error });
    }
    const choice = obj.choices && obj.choices[0];
    if (choice) {
      const text = choice.delta && choice.delta.content;
      if (text) yield { type: "delta", text };
      if (choice.finish_reason) yield { type: "finish", reason: choice.finish_reason };
    }
    if (obj.usage) yield { type: "usage", usage: obj.usage };
  }
  if (!sawDone) throw new FriendlyError("The node closed the stream before the answer was complete.");
}

/**
 * The `data` of each Server-Sent Event that `reader` (a response body's reader) delivers, its
 * lines joined; empty ones are skipped. The connection closes when the caller stops early.
 * Throws FriendlyError(`broken`) when the connection breaks, or the AbortError of `signal`.
 */
export async function* sseData(reader, signal, broken) {
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        if (e.name === "AbortError" || (signal && signal.aborted)) throw e;
        throw new FriendlyError(broken);
      }
      if (chunk.done) break;
      buf += decoder.decode(chunk.value, { stream: true });
      let cut;
      while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = event
          .split(/\r?\n/)
          .filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.cancel().catch(() => {});  // closes the connection when we leave early
  }
}
