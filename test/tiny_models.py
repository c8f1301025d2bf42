"""Tiny random-weight models of every supported architecture, built with transformers, for tests
that compare exo against transformers itself (nothing is downloaded).

``build_hf_model(arch, directory)`` saves a model with ``save_pretrained`` (safetensors), a
byte-level BPE tokenizer trained here, its ``tokenizer_config.json`` (ChatML template) and a
``generation_config.json``. ``write_gguf(directory, path)`` writes the same model as a GGUF file
the way llama.cpp's converter lays it out (Q/K rows permuted for the llama architecture, Gemma's
norms stored as 1 + w, Phi-3's fused projections). With ``weights_qtype`` the matrices are
rounded to a GGML type first (``round_trip``) and stored in it, so the GGUF and the safetensors
hold the same numbers and both compare exactly against transformers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 384
HIDDEN = 64
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_ID = 2  # <|im_end|>

#: Per architecture: the transformers config class and the variant switched on in its config.
_WORDS = ("the cat dog bird fish tree house river mountain city road sun moon star light dark red blue green "
          "small large quick slow happy sad one two three four five six seven eight nine ten time day night "
          "water fire earth air hello world model layer token ring node cluster paris france capital is of "
          "and a to in it that was for on are with as his they be at this have from or had by word but what").split()


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 999)))
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ","]))
    return lines


def build_tokenizer(directory: Path, vocab_size: int = VOCAB) -> None:
    """Train a byte-level BPE of exactly ``vocab_size`` tokens (3 specials first) and save
    ``tokenizer.json`` and ``tokenizer_config.json`` (ChatML template, eos ``<|im_end|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the tiny tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
              "unk_token": None, "pad_token": "<|endoftext|>", "chat_template": CHATML, "model_max_length": 512,
              "added_tokens_decoder": {str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                                                "normalized": False, "single_word": False} for i, s in enumerate(SPECIALS)}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def tiny_config(arch: str, **overrides: Any):
    """A transformers config of a 4-layer model of ``arch`` with its variant switched on:
    llama (Llama 3.1 rope scaling, untied head), mistral (sliding window 6), qwen2 (qkv bias),
    qwen3 (QK norm, head_dim 32 != hidden / heads), gemma3 (QK norm, sandwich norms, GELU,
    sliding window 5 on layers 0-4 of 6, its own attention scale), phi3 (fused projections,
    partial rotary, LongRoPE switching to its long factors past 16 tokens)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=EOS_ID, pad_token_id=0,
                  tie_word_embeddings=False, rms_norm_eps=1e-6)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64})
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=6, head_dim=16)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**{**common, "tie_word_embeddings": True})
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=32)
    elif arch == "gemma3":
        # six layers: Gemma 3's own pattern (every sixth global), which its GGUFs imply
        cfg = tf.Gemma3TextConfig(**{**common, "tie_word_embeddings": True, "num_hidden_layers": 6}, head_dim=32,
                                  query_pre_attn_scalar=24, sliding_window=5)
    elif arch == "phi3":
        half = 4  # rotary dims 8 of 16: 4 frequencies
        cfg = tf.Phi3Config(**common, original_max_position_embeddings=16,
                            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                             "short_factor": [1.0, 1.5, 2.0, 3.0][:half], "long_factor": [2.0, 3.0, 5.0, 9.0][:half],
                                             "original_max_position_embeddings": 16})
    else:
        raise ValueError(f"no tiny config for {arch!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def round_trip(w: np.ndarray, qtype: int) -> np.ndarray:
    """``w`` (rows, cols) float32 quantized to GGML type ``qtype`` and back (exact in that type)."""
    from gguf.quants import dequantize, quantize

    return np.asarray(dequantize(quantize(np.ascontiguousarray(w, dtype=np.float32), qtype), qtype), dtype=np.float32)


def build_hf_model(arch: str, directory: Path, seed: int = 0, weights_qtype: int | None = None, **overrides: Any) -> Path:
    """Save a tiny random ``arch`` model (float32 safetensors), its tokenizer and generation
    config in ``directory``; returns ``directory``.

    Weights are drawn with a larger spread than transformers' init (std 0.15; norm weights
    around 1) so that logits differ clearly between tokens. With ``weights_qtype`` (a GGML
    type gguf-py can quantize: Q8_0 = 8, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, F16 = 1, BF16 = 30)
    every 2-D weight is rounded through it (``round_trip``).
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                base = 0.0 if arch == "gemma3" else 1.0  # Gemma multiplies by 1 + w
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                w = 0.15 * torch.randn(p.shape, generator=gen)
                if weights_qtype is not None:
                    w = torch.from_numpy(round_trip(w.numpy(), weights_qtype))
                p.copy_(w)
    model.save_pretrained(directory, safe_serialization=True)
    build_tokenizer(directory)
    GenerationConfig(bos_token_id=0, eos_token_id=[EOS_ID, 0], temperature=0.7, top_p=0.9, do_sample=True).save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------- GGUF


_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3"}


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert-time reordering of Q/K rows (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(directory: Path, path: Path, weights_qtype: int = 0, split: int = 1) -> Path:
    """Write the model saved in ``directory`` (by ``build_hf_model``) as a GGUF file at ``path``,
    matrices in GGML type ``weights_qtype`` (0 = F32; the model must have been built with the
    same ``weights_qtype`` for the numbers to be identical), norms and biases in F32, the
    tokenizer as a "gpt2" BPE vocabulary. ``split`` > 1 writes ``NAME-0000K-of-0000N.gguf``
    files the way llama.cpp's gguf-split does (metadata in the first, tensors spread over
    all) and returns the first."""
    import gguf
    from gguf.quants import quantize
    from safetensors.numpy import load_file

    directory, path = Path(directory), Path(path)
    config = json.loads((directory / "config.json").read_text())
    arch = {"gemma3_text": "gemma3"}.get(config["model_type"], config["model_type"])
    garch = _GGUF_ARCH[arch]
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    h, nh, nkv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // nh
    n_layers = config["num_hidden_layers"]

    out: dict[str, np.ndarray] = {}
    for name, w in tensors.items():
        w = np.asarray(w, dtype=np.float32)
        name = name.removeprefix("model.")
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            key = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                   "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                   "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                   "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
                   "self_attn.k_norm.weight": "attn_k_norm.weight", "self_attn.o_proj.weight": "attn_output.weight",
                   "self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                   "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
                   "mlp.gate_up_proj.weight": "ffn_up.weight",
                   "post_attention_layernorm.weight": "post_attention_norm.weight" if arch == "gemma3" else "ffn_norm.weight",
                   "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                   "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}[rest]
            if garch == "llama" and key == "attn_q.weight":
                w = _permute(w, nh)
            elif garch == "llama" and key == "attn_k.weight":
                w = _permute(w, nkv)
            if arch == "gemma3" and key.endswith("norm.weight"):
                w = w + 1.0
            out[f"blk.{i}.{key}"] = w
        elif name == "embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "norm.weight":
            out["output_norm.weight"] = w + 1.0 if arch == "gemma3" else w
        elif name == "lm_head.weight":
            out["output.weight"] = w
        else:
            raise ValueError(f"unexpected tensor {name}")

    rope = config.get("rope_parameters") or {}
    if arch == "gemma3":
        theta = rope.get("full_attention", {}).get("rope_theta", 1e6)
    else:
        theta = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type") == "llama3":  # llama.cpp stores the scaled frequencies as rope_freqs
        from exo.models.architectures import Rope

        r = Rope(theta=theta, scaling="llama3", factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                 high_freq_factor=rope["high_freq_factor"], original_max_position_embeddings=rope["original_max_position_embeddings"])
        base = Rope(theta=theta).inv_freq(hd)
        out["rope_freqs.weight"] = (base / r.inv_freq(hd)).astype(np.float32)
    if rope.get("rope_type") == "longrope":
        out["rope_factors_long.weight"] = np.asarray(rope["long_factor"], dtype=np.float32)
        out["rope_factors_short.weight"] = np.asarray(rope["short_factor"], dtype=np.float32)

    names = sorted(out, key=_gguf_order)
    per_file = -(-len(names) // split)
    groups = [names[i:i + per_file] for i in range(0, len(names), per_file)]
    paths = [path] if split == 1 else [path.with_name(f"{path.stem}-{k + 1:05d}-of-{split:05d}.gguf") for k in range(split)]
    for k, (p, group) in enumerate(zip(paths, groups)):
        writer = gguf.GGUFWriter(str(p), garch)
        if k == 0:
            _write_metadata(writer, directory, config, arch, garch, hd, n_layers, theta, rope)
        if split > 1:
            writer.add_uint16("split.no", k)
            writer.add_uint16("split.count", split)
            writer.add_int32("split.tensors.count", len(names))
        for name in group:
            w = out[name]
            if w.ndim == 2 and weights_qtype and not name.startswith("rope"):
                q = quantize(np.ascontiguousarray(w), weights_qtype)
                writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType(weights_qtype))
            else:
                writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return paths[0]


def _gguf_order(name: str) -> tuple:
    if name.startswith("blk."):
        _, i, rest = name.split(".", 2)
        return (1, int(i), rest)
    return (0 if name == "token_embd.weight" else 2, 0, name)


def _write_metadata(writer, directory: Path, config: dict, arch: str, garch: str, hd: int, n_layers: int, theta: float,
                    rope: dict) -> None:
    import gguf

    writer.add_name(f"tiny {arch}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(theta)
    rot = int(hd * float(rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_dimension_count(rot)
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
    if rope.get("rope_type") == "longrope":
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        factor = config["max_position_embeddings"] / rope["original_max_position_embeddings"]
        import math
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(factor) / math.log(rope["original_max_position_embeddings"])))
    tok = json.loads((directory / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
