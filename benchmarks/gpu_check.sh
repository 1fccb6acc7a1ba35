#!/usr/bin/env bash
# The GPU path, on a machine with a CUDA device:
#   1. the kernel-vs-torch equality tests (tests/algorithms/test_kernels.py) and the
#      CUDA-vs-CPU factor equality tests (tests/algorithms/test_cuda_paths.py, skipped
#      without CUDA: here they must run, so a skip counts as a failure);
#   2. the calibration benchmark on SmolLM2 (benchmarks/bench_calibration.py --device cuda);
#   3. the 7B-geometry benchmark (benchmarks/bench_geometry_7b.py --device cuda).
# On CUDA tensors the algorithms take the batched torch paths (kernels.use_kernels is
# False off CPU); only the observers' inputs and statistics live on the device.
#
#   bash benchmarks/gpu_check.sh [PYTHON]        # default: .venv/bin/python, else python3
#
# Environment: GPU_CHECK_FULL=1 runs both benchmarks at full size (longer: 8 layers of a
# 7B-sized MLP at 4096-token context); the default fits a 15-minute device slot;
# GPU_CHECK_OUT=DIR keeps each step's output there (default: a temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${GPU_CHECK_OUT:-$(mktemp -d)}"
mkdir -p "$OUT"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to $("$PY" -c 'import torch; print("torch", torch.__version__)') -" \
         "install a CUDA build of torch and run this on a GPU machine" >&2
    exit 2
fi
"$PY" - <<'EOF'
import torch
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv

echo "== 1. kernel/torch and CUDA/CPU equality tests"
# -rs lists skips; a skipped CUDA test means the device was not used: fail
"$PY" -m pytest -q -p no:cacheprovider -rs tests/algorithms/test_kernels.py tests/algorithms/test_cuda_paths.py \
    | tee "$OUT/tests.txt"
if grep -q "SKIPPED.*test_cuda_paths" "$OUT/tests.txt"; then
    echo "gpu_check: CUDA tests were skipped" >&2
    exit 1
fi

# a GPU holds far more than the 2-core defaults: a 7B-sized MLP and vocabulary, long context
if [[ "${GPU_CHECK_FULL:-0}" == 1 ]]; then
    CAL_ARGS=(--samples 64 --seq-len 512)
    GEO_ARGS=(--layers 8 --intermediate 14336 --vocab 32000 --samples 16 --seq-len 4096 \
              --mem-samples 4 --mem-seq-len 4096)
else
    CAL_ARGS=(--samples 32 --seq-len 512 --mem-samples 2)
    GEO_ARGS=(--layers 2 --intermediate 14336 --vocab 32000 --samples 4 --seq-len 2048 \
              --mem-samples 1 --mem-seq-len 2048)
fi

echo "== 2. calibration benchmark, SmolLM2-135M on CUDA"
"$PY" benchmarks/bench_calibration.py --device cuda "${CAL_ARGS[@]}" | tee "$OUT/bench_calibration.txt"

echo "== 3. 7B-geometry benchmark on CUDA"
"$PY" benchmarks/bench_geometry_7b.py --device cuda "${GEO_ARGS[@]}" | tee "$OUT/bench_geometry_7b.txt"

echo "gpu_check: all steps passed; outputs in $OUT"
