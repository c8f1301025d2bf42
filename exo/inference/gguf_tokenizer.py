"""The tokenizer a GGUF file describes, rebuilt as a HuggingFace ``tokenizers.Tokenizer``.

A GGUF carries no ``tokenizer.json``: it stores the vocabulary (``tokenizer.ggml.tokens``), a
score or merge list, a type per token and a few flags under llama.cpp's key names. Two
``tokenizer.ggml.model`` kinds cover the common families:

* ``"llama"`` (SentencePiece BPE: Llama 2, Mistral 7B, Phi-3, Gemma 1-3): text is BPE-merged
  on raw characters with spaces written "▁"; merges are not stored, so they are rebuilt from
  the vocabulary, ranked by the merged token's score (Gemma: by its position in the file);
  characters outside the vocabulary fall back to ``<0xNN>`` byte tokens.
* ``"gpt2"`` (byte-level BPE: Llama 3, Qwen, Mistral Nemo, SmolLM, ...): bytes are spelled
  with GPT-2's printable alphabet, the file's merges are used as they are, and text is first
  split by the regex that ``tokenizer.ggml.pre`` names (the table below, from llama.cpp's
  ``llama-vocab.cpp``).

The reference for every choice is what ``transformers`` builds from the same file
(``transformers/integrations/gguf/gguf_tokenizer_mapping.py``); where transformers has no
answer (pre-tokenizer names it does not know, ``ignore_merges``, end-of-generation tokens)
llama.cpp is followed, since it is the program these files were made for.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp ``llama_token_type``).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ---------------------------------------------------------------------------- pre-tokenizers
# Split regexes of byte-level BPE vocabularies by ``tokenizer.ggml.pre``, as llama.cpp applies
# them: each regex splits every piece the previous one left (matches and the gaps between them
# both become pieces), then each piece is BPE-merged on its own. Written in the form of the
# models' own tokenizer.json (Oniguruma, as the ``tokenizers`` library runs them).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_V3 = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
]
_DEEPSEEK_CODER = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"]
_FALCON = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"[0-9][0-9][0-9]"]
_BLOOM = [r" ?[^(\s|.,!?…。，、।۔،)]+"]

_PRE_GROUPS: list[tuple[tuple[str, ...], list[str]]] = [
    # GPT-2's own split. "default" (an old file, or one whose pre-tokenizer the converter did not
    # know) gets it as in transformers; llama.cpp's "default" split also isolates punctuation runs.
    (("default", "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "jina-es", "jina-de",
      "jina-v2-es", "jina-v2-de", "jina-v1-en", "jina-v2-code", "roberta-bpe", "gigachat", "a.x-4.0", "mellum",
      "modern-bert", "exaone4"), [_GPT2]),
    # one token per digit, then GPT-2's split
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
     [r"\p{N}", _GPT2]),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
      "dbrx", "smaug-bpe", "glm4", "chatglm-bpe"), [_LLAMA3]),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open", "grok-2"),
     [_QWEN2]),
    (("qwen35",), [_QWEN35]),
    (("tekken",), [_TEKKEN]),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), [_GPT4O]),
    (("deepseek-v3", "hunyuan-dense", "joyai-llm"), _DEEPSEEK_V3),
    (("deepseek-coder",), _DEEPSEEK_CODER),
    (("falcon",), _FALCON),
    (("bloom", "poro-chat", "gpt3-finnish"), _BLOOM),
    (("viking",), _BLOOM + [r"\p{N}"]),
]
#: ``tokenizer.ggml.pre`` -> the regexes that split text before BPE, in order.
PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {name: regexes for names, regexes in _PRE_GROUPS for name in names}

# llama.cpp looks a pre-token up whole before merging it for these (the models' tokenizer.json
# has ``"ignore_merges": true``), and adds BOS when the file does not say.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                  "jina-v5-nano", "tekken"}
_ADD_BOS_BY_DEFAULT = _IGNORE_MERGES | {"chameleon"}

# ---------------------------------------------------------------------------- end of generation
# Token texts llama.cpp treats as ending generation whatever the file's eos id says
# (``llama_vocab::impl::load``, "special_eog_ids"): chat models end a turn with one of these.
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
              "<|eom_id|>", "<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>")

_SENTENCEPIECE_KINDS = ("llama", "gemma4")
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3", "gemma3n")


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """Byte-level BPE's byte -> printable character table (GPT-2's ``bytes_to_unicode``):
    printable Latin-1 bytes spell themselves, the other 68 take U+0100 onwards in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


@dataclass(frozen=True)
class GGUFVocab:
    """A GGUF vocabulary as a ``tokenizers`` backend plus what a ``Tokenizer`` needs around it.

    Attributes:
        backend: the ``tokenizers.Tokenizer`` (no post-processor: BOS is added by the caller).
        bos_token_id, eos_token_id: from the file, or None.
        eog_token_ids: ids that end generation: eos, eot, eom, then end-of-turn tokens found by text.
        special_token_ids: control tokens (never shown to clients).
        add_bos_token: whether a prompt starts with BOS.
        token_encoding: "byte_level" or "sentencepiece" (how a token's text maps to its bytes).
    """

    backend: Any
    bos_token_id: int | None
    eos_token_id: int | None
    eog_token_ids: list[int]
    special_token_ids: set[int]
    add_bos_token: bool
    token_encoding: str


def build_gguf_vocab(meta: dict[str, Any]) -> GGUFVocab:
    """The tokenizer described by GGUF metadata ``meta`` (``exo.models.gguf.open_gguf(p).metadata``).

    Raises:
        ValueError: no vocabulary, a tokenizer kind other than "llama", "gemma4" or "gpt2",
            or lists of mismatched lengths.
    """
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("the GGUF metadata holds no vocabulary (tokenizer.ggml.tokens)")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind in _SENTENCEPIECE_KINDS:
        backend, encoding = _sentencepiece_backend(meta, tokens), "sentencepiece"
    elif kind == "gpt2":
        backend, encoding = _byte_level_backend(meta, tokens), "byte_level"
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: 'llama' and 'gemma4' "
                         "SentencePiece, 'gpt2' byte-level BPE)")

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if not 0 <= int(value) < len(tokens):
            logger.warning("GGUF tokenizer.ggml.%s = %s is outside the vocabulary of %d; ignored",
                           key, value, len(tokens))
            return None
        return int(value)

    bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
    named = [i for i in (bos, eos, token_id("unknown_token_id"), token_id("padding_token_id")) if i is not None]
    special = _add_special_tokens(backend, tokens, types, named, byte_level=encoding == "byte_level")
    eog = [i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
    found = {t: i for i, t in enumerate(tokens) if t in _EOG_TEXTS}
    if "<|return|>" in found and "<|call|>" in found:
        found.pop("<|end|>", None)  # gpt-oss (harmony): <|end|> closes a message, not the answer
    eog += sorted(found.values())
    eog = list(dict.fromkeys(eog))

    pre = meta.get("tokenizer.ggml.pre")
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's default when the file does not say
        add_bos = kind == "llama" or (kind == "gpt2" and pre in _ADD_BOS_BY_DEFAULT)
    if kind == "gemma4":
        add_bos = False  # its chat template writes <bos> itself (as transformers does)
    add_bos = bool(add_bos) and bos is not None
    return GGUFVocab(backend, bos, eos, eog, special, add_bos, encoding)


def _sentencepiece_backend(meta: dict[str, Any], tokens: list[str]):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    arch = meta.get("general.architecture", "")
    gemma = arch in _GEMMA_ARCHS or meta.get("tokenizer.ggml.model") == "gemma4"
    if arch in _GEMMA_ARCHS:
        # Gemma files store the tokens of 2+ blanks with real spaces; the model's tokenizer
        # spells them with "▁" like every other token (transformers' gemma conversion).
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if merges:
        merge_pairs = [_split_merge(m) for m in merges]
    else:
        if arch in _GEMMA_ARCHS:  # Gemma's scores do not follow its merge order; file order does
            rank = {t: -i for i, t in enumerate(tokens)}
        else:
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            rank = dict(zip(tokens, scores))
        merge_pairs = merges_from_ranks(vocab, rank)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merge_pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        # spaces become "▁" and the whole text is merged at once (no prefix space)
        tok.normalizer = normalizers.Replace(" ", "\u2581")
    elif arch == "phi3":
        # the prefix space comes from a normalizer, so every text segment between added tokens gets one
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            steps.append(decoders.Strip(content=" ", left=1))
    else:
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                     prepend_scheme="first" if prefix else "never")
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _byte_level_backend(meta: dict[str, Any], tokens: list[str]):
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = byte_alphabet()
    letters = set(alphabet.values())
    # a token written outside the byte alphabet (a mislabelled added token) is respelled byte by byte
    vocab = {t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = [_split_merge(m) for m in meta.get("tokenizer.ggml.merges") or []]
    pre = meta.get("tokenizer.ggml.pre")
    if not pre:
        logger.warning("the GGUF names no pre-tokenizer (tokenizer.ggml.pre): splitting text as GPT-2 does")
        pre = "default"
    regexes = PRE_TOKENIZER_SPLITS.get(pre)
    if regexes is None:
        logger.warning("unknown GGUF pre-tokenizer %r: splitting text as GPT-2 does, which may tokenize this "
                       "model's text differently from its own tokenizer", pre)
        regexes = [_GPT2]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES))
    if regexes == [_GPT2]:  # the ByteLevel pre-tokenizer's own regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)), use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_special_tokens(backend, tokens, types, named: list[int], byte_level: bool) -> set[int]:
    """Make control tokens and the ``named`` ones (bos, eos, unk, pad) special added tokens, and
    user-defined ones plain added tokens: all are matched whole in the text and never
    normalized. Returns the ids of the special ones."""
    from tokenizers import AddedToken

    letters = set(byte_alphabet().values()) if byte_level else None
    named_set = set(named)
    control, user = [], []
    for i, (t, tt) in enumerate(zip(tokens, types)):
        if tt == CONTROL or i in named_set:
            # in a byte-level vocabulary a "control" token outside the byte alphabet is a llama.cpp
            # mislabel; adding it would grow the vocabulary past the model's (transformers skips it)
            if letters is None or set(t) <= letters:
                control.append(AddedToken(t, special=True, normalized=False))
        elif tt == USER_DEFINED:
            user.append(AddedToken(t, special=False, normalized=False))
    vocab = backend.get_vocab(with_added_tokens=False)
    user = [a for a in user if a.content in vocab]  # e.g. Gemma's blank runs, renamed to "▁▁..."
    backend.add_special_tokens(control)
    backend.add_tokens(user)
    return {backend.token_to_id(a.content) for a in control}


def _split_merge(merge: str) -> tuple[str, str]:
    """``"a b"`` -> ``("a", "b")``, split at the first space after the first character (llama.cpp)."""
    pos = merge.find(" ", 1)
    if pos < 0:
        raise ValueError(f"malformed GGUF merge {merge!r}")
    return merge[:pos], merge[pos + 1:]


def merges_from_ranks(vocab: dict[str, int], rank: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary
    tokens is a merge; merges are ordered by the merged token's rank (highest first), ties by the
    longer left then right part, then by token order. This is how ``transformers`` converts
    SentencePiece BPE models (``generate_merges``), so the ids match its tokenizer's.

    Args:
        vocab: token -> id.
        rank: token -> score (higher merges first), in vocabulary order.
    """
    entries = []
    add = entries.append
    for seq, (token, score) in enumerate(rank.items()):
        n = len(token)
        for cut in range(1, n):
            left = token[:cut]
            if left in vocab:
                right = token[cut:]
                if right in vocab:
                    add((score, cut, n - cut, -seq, left, right))
    entries.sort(key=lambda e: e[:4], reverse=True)  # ties (same score and lengths) keep token order
    return [(e[4], e[5]) for e in entries]


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def sentencepiece_piece_bytes(piece: str) -> bytes:
    """The bytes a SentencePiece token stands for: ``"<0xE6>"`` -> ``b"\\xe6"``, ``"▁the"`` -> ``b" the"``."""
    m = _BYTE_TOKEN.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")
