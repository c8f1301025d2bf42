"""Shards, the InferenceEngine interface and registry, sampling and tokenizers."""
