#!/usr/bin/env bash
# Benchmarks (bench/README.md): exo's torch engine against transformers and llama.cpp on the same
# GGUF, rings of 1-3 nodes on loopback, concurrent streams. Prints the tables and writes
# bench/results.md. Extra arguments go to `python -m bench.run` (e.g. --runs 5, --skip llamacpp).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh torch,images,test   # the test extra brings transformers and accelerate
# shellcheck disable=SC1091
. .venv/bin/activate

LLAMA_CPP_PYTHON="llama-cpp-python==0.3.36"

llama_cpp_works() {  # load the model and run one forward pass, in a process of its own
    python - >/dev/null 2>&1 <<'PY'
import llama_cpp
from exo.models.sources import STORE
llm = llama_cpp.Llama(model_path=str(STORE.card("smollm2-135m").path), n_ctx=64, verbose=False)
llm.eval([1, 2, 3])
PY
}

cpu_cmake_flags() {  # GGML's x86 options from this CPU's flags, AMX left out
    local flags out="-DGGML_NATIVE=OFF"
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    for pair in avx:GGML_AVX avx2:GGML_AVX2 bmi2:GGML_BMI2 fma:GGML_FMA f16c:GGML_F16C avx512f:GGML_AVX512 \
                avx512vbmi:GGML_AVX512_VBMI avx512_vnni:GGML_AVX512_VNNI avx512_bf16:GGML_AVX512_BF16 avx_vnni:GGML_AVX_VNNI; do
        [[ "$flags" == *" ${pair%%:*} "* ]] && out="$out -D${pair#*:}=ON"
    done
    echo "$out"
}

if ! python -c "import llama_cpp" >/dev/null 2>&1; then
    # Only the benchmark needs llama.cpp. llama-cpp-python compiles it from source (cmake and a
    # C++ compiler; ~5 min on 2 idle cores, more on a busy machine); pip caches the built wheel.
    if ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++; } \
            || echo "warning: no cmake/g++: llama.cpp will be skipped" >&2
    fi
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python -m pip install --quiet "$LLAMA_CPP_PYTHON" \
        || echo "warning: llama-cpp-python did not build: llama.cpp will be skipped" >&2
fi
if python -c "import llama_cpp" >/dev/null 2>&1 && ! llama_cpp_works; then
    # ggml's AMX kernels crash on CPUs that report AMX inside some VMs: build for this CPU without them
    echo "llama.cpp crashed on a forward pass; rebuilding it without AMX ($(cpu_cmake_flags))" >&2
    CMAKE_ARGS="$(cpu_cmake_flags)" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        python -m pip install --quiet --no-cache-dir --force-reinstall --no-deps "$LLAMA_CPP_PYTHON" \
        || echo "warning: llama-cpp-python did not rebuild: llama.cpp will be skipped" >&2
    llama_cpp_works || { echo "warning: llama.cpp still fails: skipping it" >&2; python -m pip uninstall -y -q llama-cpp-python; }
fi
exec python -m bench.run "$@"
