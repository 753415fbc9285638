#!/usr/bin/env bash
# One GPU check, under 10 minutes (each step has its own timeout: 120 s, 180 s, 280 s):
#   1. the CUDA tests: the Triton kernels against the PyTorch ops, the norm cache, and an unmerged eval forward
#      under torch.cuda.set_sync_debug_mode("error") inside every adapter layer (no synchronisation after the
#      first call: one adapter, two active, a mixed batch) and the compiled path;
#   2. decoding (benchmarks/decode.py, bf16): ms per token and tokens/s of unmerged DoRA, unmerged LoRA, merged,
#      mixed batches of 8 DoRA and of 8 LoRA adapters against one LoRA adapter's batch, and torch.compile against
#      eager (decode and a training step), 7 repeats (the fewest that give a 95 % interval of each ratio);
#   3. training sizes (benchmarks/gpu.py, bf16): per layer at 8k/32k tokens, a 1B Llama training step.
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
# 1. CUDA tests (the CPU ones in these files run too: they take seconds; test_compile.py compiles a few tiny models)
timeout 120 "$PY" -m pytest tests/test_fast.py tests/test_cache.py tests/test_compile.py -q -rs 2>&1 \
    | tee "$DEST/gpu_tests.log"
status=$(( status | ${PIPESTATUS[0]} ))
# 2. Decoding on the embedded SmolLM2-135M, batch 1 and 8, eager and compiled (compiled rows: the model cut to
#    4 blocks, which keeps compilation short; the DoRA/LoRA ratios are per block)
timeout 180 "$PY" benchmarks/decode.py --device cuda --dtype bfloat16 --tokens 32 --repeats 7 --compile \
    --compile-layers 4 --output "$DEST/decode.md" 2>&1 | tee "$DEST/decode.log"
status=$(( status | ${PIPESTATUS[0]} ))
# 3. Training sizes in bf16: per layer at 8k/32k tokens, a 1B Llama training step (DoRA, LoRA, PEFT-DoRA, NF4 base)
timeout 280 "$PY" benchmarks/gpu.py --output "$DEST/gpu.md" 2>&1 | tee "$DEST/gpu_bench.log"
status=$(( status | ${PIPESTATUS[0]} ))
exit $status
