"""``Tokenizer``: text to token ids and back, token bytes, and chat-template rendering.

A ``Tokenizer`` wraps a HuggingFace ``tokenizers.Tokenizer`` built from a model's own files
(``loading``). Chat templates are Jinja templates rendered the way ``transformers``'
``apply_chat_template`` renders them (sandboxed Jinja2, ``exo.inference.chat_templates``).
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any, Iterable

from exo.inference.chat_templates import BUILTIN_CHAT_TEMPLATES, compile_chat_template, render_chat_template
from exo.inference.gguf_tokenizer import byte_alphabet, sentencepiece_piece_bytes


class Tokenizer:
    """Encodes text to token ids, decodes ids to text, and renders the chat template.

    Attributes:
        eos_token_ids: ids that end generation (the model's eos first).
        bos_token_id: beginning-of-sequence id, or None.
        add_bos_token: whether ``encode`` starts the ids with ``bos_token_id``.
        special_token_ids: control tokens, never shown to clients.
        vocab_size: number of token ids.
        chat_template: the Jinja source of the default chat template, or None.
        chat_templates: other templates of the model by name (e.g. "tool_use").
        special_tokens: template variables naming special tokens (``bos_token``, ``eos_token``, ...).
        generation_defaults: the model's sampling defaults: any of ``temperature``, ``top_p``,
            ``top_k``, ``repetition_penalty``.
    """

    def __init__(self, backend, chat_template: str | None = None, bos_token_id: int | None = None,
                 eos_token_ids: Iterable[int] = (), special_token_ids: Iterable[int] = (), add_bos_token: bool = False,
                 *, chat_templates: dict[str, str] | None = None, special_tokens: dict[str, str] | None = None,
                 generation_defaults: dict[str, float] | None = None, token_encoding: str | None = None):
        """
        Args:
            backend: a ``tokenizers.Tokenizer``; its post-processor is not used (BOS is added here).
            token_encoding: how a token's text maps to its bytes: "byte_level", "sentencepiece" or
                "text"; None detects it from the backend's decoder.
        """
        self._tok = backend
        self.chat_template = chat_template
        self.chat_templates = dict(chat_templates or {})
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self.special_token_ids = frozenset(special_token_ids)
        self.add_bos_token = bool(add_bos_token) and bos_token_id is not None
        self.generation_defaults = dict(generation_defaults or {})
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._encoding = token_encoding or _detect_token_encoding(backend)
        if special_tokens is None:
            special_tokens = {}
            if bos_token_id is not None:
                special_tokens["bos_token"] = backend.id_to_token(bos_token_id)
            if self.eos_token_ids:
                special_tokens["eos_token"] = backend.id_to_token(self.eos_token_ids[0])
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer`` (shared by copies; do not modify)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, BOS first when the model wants it (not doubled when the text
        already starts with it); special-token text such as ``<|im_start|>`` maps to its id.

        Thread-safe, and it lets other threads run meanwhile (``encode_batch`` releases the GIL;
        ``encode`` holds it for the whole text: 0.6 s for 256,000 characters): call it from a
        worker thread for a long text and the event loop keeps serving.
        """
        ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        if self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters one token stands for, at most: the longest vocabulary entry, special
        tokens included (a byte-level entry has one character per byte, so this bounds the
        text's characters too). A text longer than ``n * max_token_chars`` characters has more
        than ``n`` tokens. Computed once (50 ms for 49,152 entries)."""
        return max(len(t) for t in self._tok.get_vocab(with_added_tokens=True))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens dropped unless ``skip_special_tokens`` is False."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of ``token_id`` as stored (e.g. ``"Ġthe"``, ``"▁the"``), or None."""
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token: a byte-level BPE or byte-fallback token may hold part of
        a UTF-8 character, so its bytes need not decode on their own. Special tokens give the
        UTF-8 of their text (e.g. ``b"<|im_end|>"``).

        Raises:
            ValueError: ``token_id`` is not in the vocabulary.
        """
        piece = self._tok.id_to_token(token_id) if token_id >= 0 else None
        if piece is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        if token_id in self.special_token_ids:
            return piece.encode("utf-8")
        if self._encoding == "byte_level":
            table = byte_level_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        elif self._encoding == "sentencepiece":
            return sentencepiece_piece_bytes(piece)
        return self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def with_chat_template(self, template: str) -> Tokenizer:
        """A copy of this tokenizer that renders chats with ``template``: the name of one of the
        model's own templates or of ``BUILTIN_CHAT_TEMPLATES`` (e.g. "chatml"), or Jinja source.

        Raises:
            ValueError: a name that is neither, or Jinja source that does not compile.
        """
        if template in self.chat_templates:
            source = self.chat_templates[template]
        elif template in BUILTIN_CHAT_TEMPLATES:
            source = BUILTIN_CHAT_TEMPLATES[template]
        elif "{{" in template or "{%" in template:
            source = template
        else:
            names = sorted({*self.chat_templates, *BUILTIN_CHAT_TEMPLATES})
            raise ValueError(f"unknown chat template {template!r}: give Jinja source or one of {names}")
        compile_chat_template(source)
        other = copy.copy(self)
        other.chat_template = source
        return other

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, documents: list[dict] | None = None, **kwargs) -> str:
        """Render ``messages`` (``{"role", "content", ...}`` dicts) with the model's chat template.

        As ``transformers`` does: keys whose value is None are dropped from each message, a
        message's reasoning is also given as ``reasoning_content`` and ``thinking``, the template
        sees ``messages``, ``add_generation_prompt``, ``tools``, ``documents``, the special
        tokens (``bos_token``, ``eos_token``, ...) and every extra keyword (e.g.
        ``enable_thinking=False``), which override the special tokens. With ``tools`` a
        template named "tool_use" is preferred when the model has one.

        Raises:
            ValueError: the model has no chat template, or the template failed on the messages.
        """
        source = self.chat_templates.get("tool_use") if tools and "tool_use" in self.chat_templates else None
        source = source or self.chat_template
        if not source:
            raise ValueError("this model has no chat template (a base model?): send a raw prompt to "
                             "/v1/completions instead, or configure a chat template for it")
        return render_chat_template(source, messages, add_generation_prompt, tools=tools, documents=documents,
                                    **{**self.special_tokens, **kwargs})


def _detect_token_encoding(backend) -> str:
    """"byte_level", "sentencepiece" or "text", from the decoder of ``backend``."""
    decoder = backend.decoder
    if decoder is None:
        return "text"
    state = json.loads(decoder.__getstate__())
    parts = state.get("decoders") or [state]
    kinds = {d.get("type") for d in parts}
    if "ByteLevel" in kinds:
        return "byte_level"
    if "ByteFallback" in kinds or "Metaspace" in kinds or any(
            d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "\u2581" for d in parts):
        return "sentencepiece"
    return "text"


@functools.lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """Byte-level BPE's printable character -> byte table (GPT-2's ``bytes_to_unicode``,
    inverted): bytes that are printable Latin-1 map to themselves, the others to U+0100 on."""
    return {c: b for b, c in byte_alphabet().items()}
