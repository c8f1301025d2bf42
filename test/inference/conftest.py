"""Fixtures shared by the inference tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_transformers():
    """transformers' model and tokenizer built from SmolLM2's shipped GGUF (slow, ~40 s: loaded
    once per session for every module that compares against it)."""
    transformers = pytest.importorskip("transformers")
    import torch

    from exo.models.sources import STORE

    path = STORE.card("smollm2-135m").path
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer
