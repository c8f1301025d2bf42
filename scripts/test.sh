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
# clang for tinygrad's CPU device; g++ for the torch engine's native kernels (built at first
# use; without it the engine falls back to dense float32 weights); OpenBLAS for mlx's CPU build
# (exo.inference.mlx preloads it)
missing=()
command -v clang >/dev/null 2>&1 || missing+=(clang)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
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
scripts/setup_env.sh torch,images,test,tinygrad,mlx
# shellcheck disable=SC1091
. .venv/bin/activate
# The suite runs in a network namespace of its own where the machine allows it: only a loopback
# interface exists there, so nothing a test starts can reach another machine, and two test runs on
# one machine never see each other's nodes over mDNS. EXO_TEST_SHARED_NET=1 runs it in the host's.
if [ -z "${EXO_TEST_SHARED_NET:-}" ] && command -v unshare >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 \
        && unshare -n true 2>/dev/null; then
    exec unshare -n sh -c 'ip link set lo up && exec python -m pytest test "$@"' sh "$@"
fi
echo "warning: cannot create a network namespace; the tests run in the host's (still loopback only)" >&2
exec python -m pytest test "$@"
