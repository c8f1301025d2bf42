"""Tokenizers and chat templates, built from a model's own files through well-kept libraries.

``tokenizer_for_path(path)`` is the one entry point: a GGUF file or a Hugging Face model
directory, giving a ``Tokenizer`` (encode, decode, token bytes, chat template).

* ``tokenizer``: the ``Tokenizer`` class.
* ``loading``: building one from GGUF metadata or a Hugging Face directory, and the cache.
* ``detokenizer``: ``IncrementalDetokenizer``, token ids to text as they stream.
"""

from exo.inference.tokenizers.tokenizer import Tokenizer, byte_level_decoder
from exo.inference.tokenizers.loading import tokenizer_for_path, tokenizer_from_gguf_metadata, tokenizer_from_hf_directory
from exo.inference.tokenizers.detokenizer import IncrementalDetokenizer, ends_inside_a_character

__all__ = [
    "IncrementalDetokenizer",
    "Tokenizer",
    "byte_level_decoder",
    "ends_inside_a_character",
    "tokenizer_for_path",
    "tokenizer_from_gguf_metadata",
    "tokenizer_from_hf_directory",
]
