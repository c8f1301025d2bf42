"""Tokenizers and chat templates, built from a model's own files through well-kept libraries.

``tokenizer_for_path(path)`` is the one entry point: a GGUF file (its vocabulary rebuilt as a
HuggingFace ``tokenizers.Tokenizer`` by ``exo.inference.gguf_tokenizer``) or a Hugging Face
model directory (``tokenizer.json`` with ``tokenizer_config.json``, ``chat_template.jinja`` /
``chat_template.json`` and ``generation_config.json``). Chat templates are Jinja templates
rendered the way ``transformers``' ``apply_chat_template`` renders them (sandboxed Jinja2).
"""

from __future__ import annotations

import codecs
import copy
import functools
import json
import logging
import mmap
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

from exo.inference.chat_templates import BUILTIN_CHAT_TEMPLATES, compile_chat_template, render_chat_template
from exo.inference.gguf_tokenizer import byte_alphabet, build_gguf_vocab, sentencepiece_piece_bytes

logger = logging.getLogger(__name__)

_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")
# llama.cpp's GGUF sampling keys (``general.sampling.*``) by generation_config name
_GGUF_SAMPLING = {"temperature": "general.sampling.temp", "top_p": "general.sampling.top_p",
                  "top_k": "general.sampling.top_k", "repetition_penalty": "general.sampling.penalty_repeat"}


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


# ---------------------------------------------------------------------------- detokenizer


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
        """The text still held back. A character still incomplete at the end (generation cut
        by ``max_tokens`` inside a multi-byte character) is dropped, not shown as U+FFFD."""
        piece = self._step(final=True)
        if piece.endswith("\ufffd") and ends_inside_a_character(self._tokenizer, self._ids[self._prefix_offset:]):
            piece = piece[:-1]
        return piece

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


def ends_inside_a_character(tokenizer: Tokenizer, ids: list[int]) -> bool:
    """Whether the bytes of ``ids`` end with the first bytes of a UTF-8 character that the
    next byte would continue (decoded alone, that tail is one U+FFFD)."""
    data = b""
    for i in ids:
        if i not in tokenizer.special_token_ids:
            try:
                data += tokenizer.token_bytes(i)
            except ValueError:  # an id past the vocabulary (a padded embedding) decodes to nothing
                pass
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data, final=False)
    return bool(decoder.getstate()[0])


@functools.lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """Byte-level BPE's printable character -> byte table (GPT-2's ``bytes_to_unicode``,
    inverted): bytes that are printable Latin-1 map to themselves, the others to U+0100 on."""
    return {c: b for b, c in byte_alphabet().items()}


# ---------------------------------------------------------------------------- GGUF


def tokenizer_from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    """Build the tokenizer described by a GGUF file's metadata (``exo.models.gguf.open_gguf(p).metadata``).

    End-of-generation ids: ``tokenizer.ggml.eos_token_id``, ``eot_token_id`` and
    ``eom_token_id``, then the end-of-turn tokens llama.cpp recognises by their text
    (``<end_of_turn>``, ``<|im_end|>``, ``<|eot_id|>``, ...). Named templates
    (``tokenizer.chat_template.NAME``) are kept beside the default one; ``general.sampling.*``
    values become ``generation_defaults``.

    Raises:
        ValueError: no vocabulary, or a tokenizer model other than "llama", "gemma4" or "gpt2".
    """
    vocab = build_gguf_vocab(meta)
    named = {n: meta[f"tokenizer.chat_template.{n}"] for n in meta.get("tokenizer.chat_templates") or []
             if isinstance(meta.get(f"tokenizer.chat_template.{n}"), str)}
    tokens = meta["tokenizer.ggml.tokens"]
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= int(i) < len(tokens):
            special[name] = tokens[int(i)]
    defaults = {name: meta[key] for name, key in _GGUF_SAMPLING.items() if meta.get(key) is not None}
    return Tokenizer(vocab.backend, chat_template=meta.get("tokenizer.chat_template") or None,
                     bos_token_id=vocab.bos_token_id, eos_token_ids=vocab.eog_token_ids,
                     special_token_ids=vocab.special_token_ids, add_bos_token=vocab.add_bos_token,
                     chat_templates=named, special_tokens=special, generation_defaults=defaults,
                     token_encoding=vocab.token_encoding)


_SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _first_split(path: Path) -> Path:
    """``NAME-0000K-of-0000N.gguf`` -> ``NAME-00001-of-0000N.gguf`` (which holds the metadata)."""
    m = _SPLIT_NAME.match(path.name)
    return path.with_name(f"{m['stem']}-00001-of-{m['count']}.gguf") if m else path


def _gguf_metadata(path: Path) -> dict[str, Any]:
    from exo.models.gguf import GGUFError, open_gguf, parse_header

    try:
        return open_gguf(path).metadata
    except FileNotFoundError:
        if not path.is_file():
            raise
    # a split model of which this node holds only some files: the first one's header is enough
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise GGUFError(f"{path} is empty, not a GGUF file") from None
    try:
        return parse_header(mm, str(path)).metadata
    finally:
        mm.close()


# ---------------------------------------------------------------------------- Hugging Face


def tokenizer_from_hf_directory(path: str | Path) -> Tokenizer:
    """Build the tokenizer of a Hugging Face model directory.

    Reads ``tokenizer.json`` (required), ``tokenizer_config.json`` (bos/eos tokens,
    ``added_tokens_decoder``, ``chat_template`` as a string or a list of named templates, of
    which "default" is the chat template), ``chat_template.jinja`` (transformers 5; it wins over
    the config), ``chat_template.json``, ``additional_chat_templates/*.jinja`` and
    ``generation_config.json`` (``eos_token_id`` int or list; sampling defaults; ``do_sample:
    false`` means greedy, so temperature 0). BOS is added when ``tokenizer.json``'s
    post-processor adds it, or, with no post-processor adding one, when the config says
    ``add_bos_token: true`` (llama.cpp's conversion rule; transformers 5 ignores the flag there).

    Raises:
        FileNotFoundError: no ``tokenizer.json`` in ``path``.
        ValueError: a file that is not valid JSON.
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    d = Path(path)
    if not (d / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{d} has no tokenizer.json (exo reads Hugging Face tokenizers in that format only)")
    backend = HFTokenizer.from_file(str(d / "tokenizer.json"))
    backend.no_truncation()
    backend.no_padding()
    config = _read_json(d / "tokenizer_config.json")
    generation = _read_json(d / "generation_config.json")

    added = backend.get_added_tokens_decoder()
    missing = []
    for key, fields in (config.get("added_tokens_decoder") or {}).items():
        if int(key) not in added and isinstance(fields, dict) and "content" in fields:
            missing.append(AddedToken(fields["content"], special=bool(fields.get("special", False)),
                                      normalized=bool(fields.get("normalized", not fields.get("special", False))),
                                      lstrip=bool(fields.get("lstrip")), rstrip=bool(fields.get("rstrip")),
                                      single_word=bool(fields.get("single_word"))))
    if missing:
        backend.add_tokens(missing)
        added = backend.get_added_tokens_decoder()
    special_ids = {i for i, t in added.items() if t.special}

    special_tokens = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        text = _token_text(config.get(name))
        if text is not None:
            special_tokens[name] = text
            if backend.token_to_id(text) is not None:
                special_ids.add(backend.token_to_id(text))
    bos_id = backend.token_to_id(special_tokens["bos_token"]) if "bos_token" in special_tokens else None
    if bos_id is None and isinstance(generation.get("bos_token_id"), int):
        bos_id = generation["bos_token_id"]

    eos_ids = []
    if "eos_token" in special_tokens and backend.token_to_id(special_tokens["eos_token"]) is not None:
        eos_ids.append(backend.token_to_id(special_tokens["eos_token"]))
    gen_eos = generation.get("eos_token_id")
    eos_ids += [int(i) for i in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) if isinstance(i, int)]

    prefix = _post_processor_prefix(backend)
    if len(prefix) == 1:
        add_bos, bos_id = True, prefix[0]
    else:
        if prefix:
            logger.warning("%s: the tokenizer's post-processor adds %d tokens before the text; exo adds none",
                           d, len(prefix))
        add_bos = not prefix and bool(config.get("add_bos_token")) and bos_id is not None

    default, named = _hf_chat_templates(d, config)
    defaults = {k: generation[k] for k in _SAMPLING_KEYS if isinstance(generation.get(k), (int, float))}
    if generation.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return Tokenizer(backend, chat_template=default, bos_token_id=bos_id, eos_token_ids=eos_ids,
                     special_token_ids=special_ids, add_bos_token=add_bos, chat_templates=named,
                     special_tokens=special_tokens, generation_defaults=defaults)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _post_processor_prefix(backend) -> list[int]:
    """The ids ``backend``'s post-processor puts before a text (e.g. ``[bos]``)."""
    bare = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k]
    return []


def _hf_chat_templates(d: Path, config: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    """(default template, other templates by name) of an HF directory: ``chat_template.jinja``,
    else ``chat_template.json``, else tokenizer_config's ``chat_template``; plus
    ``additional_chat_templates/NAME.jinja``."""
    named: dict[str, str] = {}
    default = None
    for source in (config.get("chat_template"), _read_json(d / "chat_template.json").get("chat_template")):
        if isinstance(source, str):
            default = source
        elif isinstance(source, list):
            entries = {e["name"]: e["template"] for e in source
                       if isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("template"), str)}
            named.update(entries)
            if "default" in entries:
                default = entries["default"]
            elif entries:
                logger.warning("%s: chat templates %s but none named 'default'; no default chat template",
                               d, sorted(entries))
    if (d / "chat_template.jinja").is_file():
        default = (d / "chat_template.jinja").read_text(encoding="utf-8")
    extra = d / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            named[f.stem] = f.read_text(encoding="utf-8")
    named.pop("default", None)
    return default, named


# ---------------------------------------------------------------------------- entry point

_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
             "chat_template.json")
_CACHE_SIZE = 8
_cache: OrderedDict[tuple, Tokenizer] = OrderedDict()
_cache_lock = threading.Lock()
_build_locks: dict[tuple, threading.Lock] = {}


def tokenizer_for_path(path: str | Path) -> Tokenizer:
    """The tokenizer of the model at ``path``: a ``.gguf`` file (any file of a split
    ``NAME-0000K-of-0000N.gguf`` model: the metadata is read from the first) or a Hugging Face
    model directory. Built once per process and kept while the files are unchanged (keyed by
    path, size and modification time); safe to call from several threads (one build per key).

    Raises:
        FileNotFoundError: ``path`` (or the split's first file, or ``tokenizer.json``) is missing.
        ValueError: neither a ``.gguf`` file nor a directory, or a vocabulary exo cannot build.
    """
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        key = ("hf", str(p), tuple(_stamp(p / n) for n in _HF_FILES), _stamp(p / "additional_chat_templates"))
        build = functools.partial(tokenizer_from_hf_directory, p)
    elif p.suffix == ".gguf":
        p = _first_split(p)
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        key = ("gguf", str(p), _stamp(p))
        build = functools.partial(_tokenizer_from_gguf_file, p)
    elif not p.exists():
        raise FileNotFoundError(f"model not found: {p}")
    else:
        raise ValueError(f"{p} is neither a .gguf file nor a Hugging Face model directory")
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        lock = _build_locks.setdefault(key, threading.Lock())
    with lock:
        with _cache_lock:
            if key in _cache:
                return _cache[key]
        tokenizer = build()
        with _cache_lock:
            _cache[key] = tokenizer
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
            _build_locks.pop(key, None)
        return tokenizer


def _tokenizer_from_gguf_file(path: Path) -> Tokenizer:
    logger.debug("building the tokenizer of %s", path)
    return tokenizer_from_gguf_metadata(_gguf_metadata(path))


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_size, st.st_mtime_ns)
