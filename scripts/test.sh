#!/usr/bin/env bash
# Set up .venv with the test dependencies, then run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's Chromium for tinychat's browser tests (driven by Playwright; no browser download)
if ! command -v chromium >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
        || echo "warning: could not install chromium; the tinychat browser tests will be skipped" >&2
fi
# clang for tinygrad's CPU device; OpenBLAS for mlx's CPU build (exo.inference.mlx preloads it)
missing=()
command -v clang >/dev/null 2>&1 || missing+=(clang)
ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0' || missing+=(libopenblas0-pthread)
if [ ${#missing[@]} -gt 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
        || echo "warning: could not install ${missing[*]}; the tinygrad/mlx engine tests will be skipped or slow" >&2
fi
# iproute2 (`ip netns`) for the multi-host tests in network namespaces (test/cluster)
if ! command -v ip >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2; } \
        || echo "warning: could not install iproute2; the network-namespace cluster tests will be skipped" >&2
fi
scripts/setup_env.sh torch,test,tinygrad,mlx
# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m pytest test "$@"
