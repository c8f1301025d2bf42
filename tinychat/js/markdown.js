// Model output -> safe HTML: Markdown by marked, sanitized by DOMPurify, code highlighted by
// highlight.js (all three vendored in ../vendor, loaded as globals by index.html).
//
// Model output is untrusted (a prompt can make a model write anything), so:
// - every HTML string goes through DOMPurify before it touches the DOM;
// - images, forms, styles and frames are dropped: an image in an answer would make the
//   browser fetch it from whatever host the model named (a tracking or data-exfiltration
//   channel, and useless on an offline cluster);
// - links open in a new tab with rel="noopener noreferrer".

/* global marked, DOMPurify, hljs */

const PURIFY_CONFIG = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["img", "picture", "video", "audio", "source", "track", "iframe", "frame", "object", "embed",
                "form", "input", "button", "textarea", "select", "style", "link", "meta", "base", "svg", "math"],
  FORBID_ATTR: ["style", "srcset", "background", "poster", "formaction"],
  ALLOW_DATA_ATTR: false,
};

let configured = false;

function configure() {
  if (configured) return;
  configured = true;
  marked.setOptions({ gfm: true, breaks: true });
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      const href = node.getAttribute("href") || "";
      if (!/^(https?:|mailto:|#)/i.test(href)) node.removeAttribute("href");
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });
  if (window.hljs) hljs.configure({ ignoreUnescapedHTML: true });
}

/** Markdown `text` -> sanitized HTML string (never executes anything). */
export function renderMarkdown(text) {
  configure();
  let html;
  try {
    html = marked.parse(String(text ?? ""), { async: false });
  } catch {
    // never lose an answer to a parser bug: fall back to escaped plain text
    const div = document.createElement("div");
    div.textContent = String(text ?? "");
    html = `<p>${div.innerHTML}</p>`;
  }
  return DOMPurify.sanitize(html, PURIFY_CONFIG);
}

/** Render `text` into `el` and highlight its code blocks (each gets a language label and a copy button). */
export function renderInto(el, text, { final = true } = {}) {
  el.innerHTML = renderMarkdown(text);
  for (const code of el.querySelectorAll("pre > code")) {
    const lang = (/language-([\w+#.-]+)/.exec(code.className) || [])[1];
    if (window.hljs) {
      if (lang && !hljs.getLanguage(lang)) code.classList.remove(`language-${lang}`);
      // while streaming, auto-detection on a half-written block flickers: only named languages
      if (lang && hljs.getLanguage(lang)) hljs.highlightElement(code);
      else if (final) hljs.highlightElement(code);
      else code.classList.add("hljs");
    }
    addCodeToolbar(code.parentElement, lang || (code.result && code.result.language));
  }
}

function addCodeToolbar(pre, lang) {
  const bar = document.createElement("div");
  bar.className = "code-bar";
  const label = document.createElement("span");
  label.textContent = lang || "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", "Copy the code");
  copy.addEventListener("click", () => {
    copyText(pre.querySelector("code").innerText).then(
      () => { copy.textContent = "Copied"; setTimeout(() => { copy.textContent = "Copy"; }, 1500); },
      () => { copy.textContent = "Copy failed"; },
    );
  });
  bar.append(label, copy);
  pre.prepend(bar);
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  // plain http on a LAN address is not a secure context: fall back to a hidden textarea
  const ta = document.createElement("textarea");
  ta.value = text;
  ta.setAttribute("readonly", "");
  ta.style.position = "fixed";
  ta.style.opacity = "0";
  document.body.appendChild(ta);
  ta.select();
  const ok = document.execCommand("copy");
  ta.remove();
  if (!ok) throw new Error("copy refused");
}
