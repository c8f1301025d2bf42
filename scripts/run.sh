#!/usr/bin/env bash
# Start one exo node serving the default model (SmolLM2-135M-Instruct); API and web UI on port 52415.
# Discovery and servers stay on this machine unless EXO_INTERFACES says otherwise:
#   EXO_INTERFACES=127.0.0.1 (default here)  loopback only
#   EXO_INTERFACES=eth0                       discover peers on eth0 (comma list allowed)
#   EXO_INTERFACES=all                        every interface
# Extra arguments go to `exo` (see `exo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
# a C++ compiler builds the torch engine's native kernels at first use (4x less memory, twice
# the decode speed); without one the engine holds dense float32 weights and says so in the log
if ! command -v c++ >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++; } \
        || echo "warning: could not install g++; the torch engine will use dense float32 weights" >&2
fi
scripts/setup_env.sh torch,images
# shellcheck disable=SC1091
. .venv/bin/activate
export EXO_INTERFACES="${EXO_INTERFACES:-127.0.0.1}"
exec exo "$@"
