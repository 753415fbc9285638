#!/usr/bin/env bash
# The main job: set up (first run only), then a DoRA fine-tune of the embedded SmolLM2-135M on Rotten Tomatoes.
# Extra arguments go to `torchdora train` (see `torchdora train --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${TORCHDORA_VENV:-.venv}/bin/torchdora" train "$@"
