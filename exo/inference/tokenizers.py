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
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already returned

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self._emitted:]
        self._emitted = len(text)
        return piece

    def flush(self) -> str:
        text = self._tokenizer.decode(self._ids)
        piece = text[self._emitted:]
        self._emitted = len(text)
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


_cache_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _load_tokenizer(model_id: str) -> Tokenizer:
    from exo.models.gguf import gguf_metadata
    from exo.models.registry import get_model_card

    card = get_model_card(model_id)
    return tokenizer_from_gguf_metadata(gguf_metadata(card.gguf_path()))


def load_tokenizer(model_id: str) -> Tokenizer:
    """The tokenizer of a registered model (built once per process).

    Raises:
        KeyError: unknown model; FileNotFoundError: weights not installed.
    """
    with _cache_lock:
        return _load_tokenizer(model_id)
