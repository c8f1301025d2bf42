"""Token ids to text as they stream: ``IncrementalDetokenizer``, UTF-8 safe."""

from __future__ import annotations

import codecs

from exo.inference.tokenizers.tokenizer import Tokenizer


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
