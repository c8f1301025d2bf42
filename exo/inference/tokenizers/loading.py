"""Building a ``Tokenizer`` from a model's own files, once per process.

``tokenizer_for_path(path)`` is the one entry point: a GGUF file (its vocabulary rebuilt as a
HuggingFace ``tokenizers.Tokenizer`` by ``exo.inference.gguf_tokenizer``,
``tokenizer_from_gguf_metadata``) or a Hugging Face model directory (``tokenizer.json`` with
``tokenizer_config.json``, ``chat_template.jinja`` / ``chat_template.json`` and
``generation_config.json``, ``tokenizer_from_hf_directory``). Built tokenizers are cached
while their files are unchanged.
"""

from __future__ import annotations

import functools
import json
import logging
import mmap
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from exo.inference.gguf_tokenizer import build_gguf_vocab
from exo.inference.tokenizers.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")
# llama.cpp's GGUF sampling keys (``general.sampling.*``) by generation_config name
_GGUF_SAMPLING = {"temperature": "general.sampling.temp", "top_p": "general.sampling.top_p",
                  "top_k": "general.sampling.top_k", "repetition_penalty": "general.sampling.penalty_repeat"}


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
