#!/usr/bin/env bash
# Set up .venv with the test dependencies, then run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh torch,test
# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m pytest test "$@"
