"""How a model pools its embeddings, read from its checkpoint (``exo.models.config_readers``)."""

from __future__ import annotations

import json

import pytest

from exo.models.config_readers import embedding_config_from_gguf, embedding_config_from_hf_dir


@pytest.mark.parametrize("meta, want", [
    ({"general.architecture": "qwen3", "qwen3.pooling_type": 3, "general.basename": "Qwen3-Embedding"}, ("last", True)),
    ({"general.architecture": "bert", "bert.pooling_type": 2}, ("cls", False)),
    ({"general.architecture": "llama", "llama.pooling_type": 1}, ("mean", False)),
    ({"general.architecture": "llama", "general.name": "SmolLM2 135M"}, ("mean", False)),  # none said: mean
    ({"general.architecture": "llama", "llama.pooling_type": 4}, ("mean", False)),  # rank: not an embedding pooling
])
def test_gguf_pooling_type(meta, want):
    assert embedding_config_from_gguf(meta) == want


def _st_dir(tmp_path, name: str, pooling: dict | None, config: dict | None = None):
    d = tmp_path / name
    d.mkdir()
    if pooling is not None:
        (d / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (d / "1_Pooling").mkdir()
        (d / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return embedding_config_from_hf_dir(d, config or {})


def test_sentence_transformers_pooling(tmp_path):
    assert _st_dir(tmp_path, "Qwen3-Embedding-0.6B", {"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}) \
        == ("last", True)
    assert _st_dir(tmp_path, "e5", {"pooling_mode_mean_tokens": True}) == ("mean", False)
    assert _st_dir(tmp_path, "bge", {"pooling_mode_cls_token": True}) == ("cls", False)
    assert _st_dir(tmp_path, "plain", None) == ("mean", False)
    assert _st_dir(tmp_path, "declared", None, {"matryoshka_dimensions": [64, 128]}) == ("mean", True)
