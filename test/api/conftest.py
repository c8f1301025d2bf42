"""Helpers for the API tests: a tiny real byte-level BPE tokenizer (no model files needed)."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from exo.inference.tokenizers import Tokenizer, byte_level_decoder

WORDS = ["Hello", "Ġworld", "ĠParis", ".", "!", "ĠThe", "Ġcapital", "STOP", "ĠST", "OP", "Ġend"]
SPECIAL = "<|im_end|>"


class TinyVocab:
    """A byte-level BPE vocabulary: ids 0-255 are single bytes, then WORDS, then SPECIAL."""

    def __init__(self):
        byte_to_char = {b: c for c, b in byte_level_decoder().items()}
        tokens = [byte_to_char[b] for b in range(256)] + WORDS + [SPECIAL]
        self.ids = {t: i for i, t in enumerate(tokens)}
        backend = HFTokenizer(models.BPE(vocab=dict(self.ids), merges=[], fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(SPECIAL, special=True, normalized=False)])
        self.eos = self.ids[SPECIAL]
        self.tokenizer = Tokenizer(backend, chat_template=None, bos_token_id=None, eos_token_ids=[self.eos],
                                   special_token_ids=[self.eos])

    def word(self, w: str) -> int:
        return self.ids[w.replace(" ", "Ġ")]

    def byte_ids(self, text: str) -> list[int]:
        """One token per UTF-8 byte of ``text``."""
        return list(text.encode("utf-8"))


@pytest.fixture(scope="session")
def tiny_vocab() -> TinyVocab:
    return TinyVocab()
