#!/usr/bin/env bash
# One short GPU check (under 8 minutes): the CUDA tests, then benchmarks/gpu.py (training sizes, bf16).
# Usage: bash benchmarks/gpu_check.sh   (tables and logs go to $OUT if set, else benchmarks/gpu_out/)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/gpu_out}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1

# The project and its test extras; where no package index is reachable, run from the source tree instead.
if ! timeout 60 "$PY" -m pip install -q --retries 0 --timeout 5 -e ".[test]" >"$DEST/install.log" 2>&1; then
    echo "pip install -e .[test] failed (see install.log): using src/ on PYTHONPATH"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
    timeout 60 "$PY" -m pip install -q --retries 0 --timeout 5 triton >>"$DEST/install.log" 2>&1 \
        || echo "triton is not available: the fused kernels fall back to PyTorch ops"
fi
"$PY" -c "import torch, torchdora.kernels as k; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), \
'|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| triton kernels', k.available())" \
    | tee "$DEST/gpu_env.txt"

status=0
# CUDA tests (the CPU ones in these files run too: they take seconds)
timeout 150 "$PY" -m pytest tests/test_fast.py tests/test_cache.py -q -rs 2>&1 | tee "$DEST/gpu_tests.log"
status=$(( status | ${PIPESTATUS[0]} ))
# Training sizes in bf16: per layer at 8k/32k tokens, a 1B Llama training step (DoRA, LoRA, PEFT-DoRA, NF4 base)
timeout 300 "$PY" benchmarks/gpu.py --output "$DEST/gpu.md" 2>&1 | tee "$DEST/gpu_bench.log"
status=$(( status | ${PIPESTATUS[0]} ))
exit $status
