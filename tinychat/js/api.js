// The node's HTTP API as tinychat uses it: models, topology, and streamed chat completions
// (OpenAI's server-sent events). Every failure becomes a FriendlyError whose message is
// meant to be shown to a person as it is.

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

const UNREACHABLE = () =>
  `Can't reach the exo node at ${location.host}. Check that exo is still running there, then try again.`;

/** Plain words for an API error body ({"error": {message, type, param, code}}) and HTTP status. */
export function describeApiError(status, body) {
  const err = (body && body.error) || {};
  const msg = typeof err === "string" ? err : err.message;
  const code = err.code || null;
  let prefix;
  if (status === 400 || status === 422) prefix = "The node did not accept the request";
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

async function getJSON(path, signal) {
  let r;
  try {
    r = await fetch(path, { signal, headers: { Accept: "application/json" } });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new FriendlyError(UNREACHABLE());
  }
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
  let r;
  try {
    r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(payload),
      signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new FriendlyError(UNREACHABLE());
  }
  if (!r.ok) {
    const body = await r.json().catch(() => null);
    throw describeApiError(r.status, body);
  }
  if (!r.body) throw new FriendlyError("The node answered without a stream.");
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let sawDone = false;
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        if (e.name === "AbortError" || (signal && signal.aborted)) throw e;
        throw new FriendlyError("The connection to the node broke in the middle of the answer.");
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
        if (!data) continue;
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
    }
  } finally {
    reader.cancel().catch(() => {});  // closes the connection when we leave early
  }
  if (!sawDone) throw new FriendlyError("The node closed the stream before the answer was complete.");
}
