#!/usr/bin/env bash
# Benchmarks (bench/README.md): exo's torch engine against transformers and llama.cpp on the same
# GGUF, rings of 1-3 nodes on loopback, concurrent streams. Prints the tables and writes
# bench/results.md. Extra arguments go to `python -m bench.run` (e.g. --runs 5, --skip llamacpp).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh torch,test   # the test extra brings transformers and accelerate
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import llama_cpp" >/dev/null 2>&1; then
    # Only the benchmark needs llama.cpp. llama-cpp-python compiles it from source (cmake and a
    # C++ compiler; ~5 min on 2 idle cores, more on a busy machine); pip caches the built wheel.
    if ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++; } \
            || echo "warning: no cmake/g++: llama.cpp will be skipped" >&2
    fi
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python -m pip install --quiet "llama-cpp-python==0.3.36" \
        || echo "warning: llama-cpp-python did not build: llama.cpp will be skipped" >&2
fi
exec python -m bench.run "$@"
