#!/usr/bin/env bash
# Run mmfuse on the embedded demo model in a small environment (torch,
# mmengine, mmcv-lite; built once, then reused).  No download of weights.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=$(bash tools/env/setup_env.sh core)
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$venv/bin/python" \
  -m mmfuse.demo "$@"
