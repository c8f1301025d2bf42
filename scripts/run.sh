#!/usr/bin/env bash
# Start one exo node serving the default model (SmolLM2-135M-Instruct); API and web UI on port 52415.
# Discovery and servers stay on this machine unless EXO_INTERFACES says otherwise:
#   EXO_INTERFACES=127.0.0.1 (default here)  loopback only
#   EXO_INTERFACES=eth0                       discover peers on eth0 (comma list allowed)
#   EXO_INTERFACES=all                        every interface
# Extra arguments go to `exo` (see `exo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh torch
# shellcheck disable=SC1091
. .venv/bin/activate
export EXO_INTERFACES="${EXO_INTERFACES:-127.0.0.1}"
exec exo "$@"
