"""Tokenizers and chat templates, built from a model's own files through well-kept libraries.

GGUF byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) become a HuggingFace
``tokenizers.Tokenizer``; chat templates are Jinja templates rendered the way
``transformers``' ``apply_chat_template`` renders them (sandboxed Jinja2).
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Iterable

logger = logging.getLogger(__name__)

# llama.cpp pre-tokenizer names whose regex isolates each digit before the GPT-2 split
# (llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM; SmolLM2's own tokenizer.json uses Digits(individual)).
_INDIVIDUAL_DIGIT_PRE = {"smollm", "starcoder", "refact"}


class Tokenizer:
    """Encodes text to token ids, decodes ids to text, and renders the chat template.

    Attributes:
        eos_token_ids: ids that end generation.
        bos_token_id: beginning-of-sequence id, or None.
        special_token_ids: control tokens, never shown to clients.
        vocab_size: number of token ids.
    """

    def __init__(self, backend, chat_template: str | None, bos_token_id: int | None, eos_token_ids: Iterable[int],
                 special_token_ids: Iterable[int], add_bos_token: bool = False):
        self._tok = backend
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.special_token_ids = frozenset(special_token_ids)
        self.add_bos_token = add_bos_token
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._template = None
        self._byte_level = _is_byte_level(backend)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token text such as ``<|im_start|>`` maps to its id."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos_token and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens dropped unless ``skip_special_tokens`` is False."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token: a byte-level BPE token may hold part of a UTF-8
        character, so its bytes need not decode on their own. Special tokens give the UTF-8 of
        their text (e.g. ``b"<|im_end|>"``).

        Raises:
            ValueError: ``token_id`` is not in the vocabulary.
        """
        piece = self._tok.id_to_token(token_id) if token_id >= 0 else None
        if piece is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        if token_id in self.special_token_ids:
            return piece.encode("utf-8")
        if self._byte_level:
            table = byte_level_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        return self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render ``messages`` (``{"role", "content"}`` dicts) with the model's chat template.

        Raises:
            ValueError: the model has no chat template, or the template rejected the messages.
        """
        if not self.chat_template:
            raise ValueError("this model has no chat template; use the completions endpoint")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        bos = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos, eos_token=eos, **kwargs)
        except _TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e


class _TemplateError(Exception):
    pass


def _compile_template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    import json

    def raise_exception(message):
        raise _TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces that are safe to send as they come.

    Multi-byte UTF-8 characters split across tokens are held back until complete (no U+FFFD
    mid-stream); special tokens produce no text. ``add`` returns the new text, ``flush`` the rest.

    Each step decodes only a short window of ids, not the whole sequence (O(window) per token
    instead of O(tokens so far)): ``ids[prefix_offset:read_offset]`` is text already returned,
    kept as left context because some decoders (SentencePiece's leading space, byte-level BPE's
    partial characters) need it; the new text is what decoding ``ids[prefix_offset:]`` adds to
    it. The scheme of vLLM's ``detokenize_incrementally`` and TGI's ``decode_token``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window (ids whose text was returned)
        self._read_offset = 0  # ids before this index have had their text returned

    def add(self, token_id: int) -> str:
        """Append one token id; the text it completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        return self._step(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character is returned as U+FFFD)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = decode(self._ids[self._prefix_offset:])
        if not final and new_text.endswith("\ufffd"):
            return ""  # a UTF-8 character continues in the next token
        piece = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return piece

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)


def tokenizer_from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    """Build the tokenizer described by a GGUF file's metadata (see ``exo.models.gguf.gguf_metadata``).

    Raises:
        ValueError: a tokenizer model other than byte-level BPE ("gpt2").
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (only byte-level BPE 'gpt2' is supported)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)), use_regex=True)
    if meta.get("tokenizer.ggml.pre") in _INDIVIDUAL_DIGIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [i for i, tt in enumerate(token_types) if tt == 3]  # 3 = CONTROL
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos)] if eos is not None else []
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return Tokenizer(
        tok,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_ids,
        special_token_ids=special,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )


def _is_byte_level(backend) -> bool:
    from tokenizers import decoders

    return isinstance(backend.decoder, decoders.ByteLevel)


@functools.lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """Byte-level BPE's printable character -> byte table (GPT-2's ``bytes_to_unicode``,
    inverted): bytes that are printable Latin-1 map to themselves, the others to U+0100 on."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_cache_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _tokenizer_for_path(path: str) -> Tokenizer:
    from exo.models.gguf import gguf_metadata

    return tokenizer_from_gguf_metadata(gguf_metadata(path))


def tokenizer_for_path(path) -> Tokenizer:
    """The tokenizer of the GGUF model at ``path`` (built once per process)."""
    with _cache_lock:
        return _tokenizer_for_path(str(path))


def load_tokenizer(model_id: str) -> Tokenizer:
    """The tokenizer of model ``model_id`` (built once per process)."""
    from exo.models.sources import STORE

    return tokenizer_for_path(STORE.card(model_id).path)
