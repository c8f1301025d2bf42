// tinychat's image mode: with an image model selected (kind "image" in GET /v1/models), the
// prompt goes to POST /v1/images/generations with "stream": true. The node answers
// Server-Sent Events: "image_generation.progress" {index, step, total_steps} per denoising step,
// then "image_generation.completed" {b64_json, seed, size}; an "error" event ends it early.

import { FriendlyError, postStream, sseData } from "./api.js";
import { h } from "./topology.js";

/** Whether model object `m` of GET /v1/models is an image model. */
export function isImageModel(m) {
  return !!m && m.kind === "image";
}

/**
 * Draw one image of `prompt` with `model`: yields {type: "progress", step, total} per step, then
 * {type: "image", src (a data: URL of the PNG), seed, size}.
 * Throws FriendlyError (API or network failure) or the AbortError of `signal`.
 */
export async function* streamImage({ model, prompt }, signal) {
  const payload = { model, prompt, n: 1, stream: true, response_format: "b64_json" };
  const reader = await postStream("/v1/images/generations", payload, "text/event-stream", signal);
  let done = false;
  for await (const data of sseData(reader, signal, "The connection to the node broke while the image was drawn.")) {
    let obj;
    try { obj = JSON.parse(data); } catch { continue; }
    if (obj.type === "error" || obj.error) {
      const msg = (obj.error && obj.error.message) || "unknown error";
      throw new FriendlyError(`The image was not drawn because of an error on the cluster: ${msg}`, { detail: obj.error });
    }
    if (obj.type && obj.type.endsWith(".progress")) yield { type: "progress", step: obj.step, total: obj.total_steps };
    if (obj.type && obj.type.endsWith(".completed")) {
      done = true;
      yield { type: "image", src: `data:image/png;base64,${obj.b64_json}`, seed: obj.seed, size: obj.size };
    }
  }
  if (!done) throw new FriendlyError("The node closed the stream before the image was done.");
}

/** The content of an image answer `m.image` = {step, total, src?, seed?, size?}: the steps while
 * it is drawn, then the picture with a download link. */
export function imageElement(m) {
  const img = m.image || {};
  if (!img.src) {
    const label = img.total ? `Drawing… step ${img.step} of ${img.total}` : "Waiting for the first step…";
    return h("div", { class: "image-progress" },
      h("progress", { max: String(img.total || 1), value: String(img.step || 0), "aria-label": "Denoising steps" }),
      h("span", { class: "waiting", text: label }));
  }
  const name = `exo-${(m.prompt || "image").slice(0, 40).replace(/[^\w-]+/g, "-")}-${img.seed ?? "x"}.png`;
  return h("figure", { class: "generated" },
    h("img", { src: img.src, alt: m.prompt || "generated image", class: "generated-image" }),
    h("figcaption", {},
      h("span", { class: "muted", text: `${img.size || ""} · seed ${img.seed ?? "?"}` }),
      h("a", { class: "btn small download-image", href: img.src, download: name, text: "Download" })));
}
