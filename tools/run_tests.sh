#!/usr/bin/env bash
# Run mmfuse's test suite in the full environment (built once, then reused).
# Usage: bash tools/run_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=$(bash tools/env/setup_env.sh full)
out=$("$venv/bin/python" -m pip install -q --no-deps --no-build-isolation \
  -e . 2>&1) || { echo "$out" >&2; exit 1; }
exec "$venv/bin/python" -m pytest "${@:-tests}"
