#!/usr/bin/env bash
# The GPU checks of one device session, in one call: the CUDA tests, then the Llama-7B-shaped timings.
#
#     bash bench/gpu_session.sh          # from the repository root, on a machine with one CUDA GPU
#
# Needs torch, transformers, accelerate, safetensors, huggingface_hub, tqdm, pyyaml, jinja2 and pytest, nothing else:
# hfcompress runs from this checkout (PYTHONPATH), not installed. The log and the results go to $OUT when it is set
# (bench/results otherwise); each run's row is printed as soon as it ends, so a cut-off run keeps the rows before it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
log=$out/gpu_session.log
mkdir -p "$out"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c \
    "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } \
    2>&1 | tee "$log"
timeout "${TEST_SECONDS:-240}" python3 -m pytest tests/test_gpu.py -s -q -p no:cacheprovider 2>&1 | tee -a "$log"
timeout "${BENCH_SECONDS:-420}" python3 bench/gpu_llama7b.py "$@" 2>&1 | tee -a "$log"
[ "$out" = bench/results ] || cp bench/results/gpu_llama7b.json bench/results/gpu_llama7b.md "$out/" 2>/dev/null
exit 0
