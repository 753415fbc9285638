#!/usr/bin/env bash
# Set up (first run only), then run the whole test suite. Fails when a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${TORCHDORA_VENV:-.venv}/bin/python" -m pytest "$@"
