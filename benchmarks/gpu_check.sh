#!/usr/bin/env bash
# The accelerator path on a machine with a CUDA device, in about 6 minutes of an H200
# (budget: 8), with no network and no bundled model:
#   1. the CPU == device tests (tests/algorithms/test_cuda_paths.py), the device-path tests
#      (tests/observers/test_device_path.py: no host sync per batch), the grouped updates
#      (tests/observers/test_stacked.py), their CUDA variants;
#      a skipped CUDA test means the device was not used: the check fails;
#   2. benchmarks/bench_fused.py: the fused histogram count against the torch operations on
#      one staged group at 8B geometry, atomic contention included (Gaussian, heavy-tailed
#      and 90%-zero data);
#   3. benchmarks/bench_gpu.py: a random 8B-geometry Llama built on the device, 64 x 2048
#      tokens of built-in pseudo-text through a locally fitted word-level tokenizer, every
#      configuration and target against the no-logits forward, and the INT8-cache decode rows.
#
#   bash benchmarks/gpu_check.sh [PYTHON]        # default: .venv/bin/python, else python3
#
# Environment:
#   GPU_CHECK_WHEELS=DIR  wheels the machine's image lacks, installed with
#                         pip install --no-index --no-deps --target OUT/site (see
#                         benchmarks/ACCELERATORS.md for the list) and put on PYTHONPATH;
#   GPU_CHECK_OUT=DIR     keeps each step's output there (default: a temporary folder);
#   GPU_CHECK_BENCH="..." extra arguments for bench_gpu.py (e.g. "--samples 8 --decode ''").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${GPU_CHECK_OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${GPU_CHECK_WHEELS:-}" ]]; then
    "$PY" -m pip install -q --no-index --no-deps --target "$OUT/site" "$GPU_CHECK_WHEELS"/*.whl
    export PYTHONPATH="$PWD:$OUT/site${PYTHONPATH#"$PWD"}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to $("$PY" -c 'import torch; print("torch", torch.__version__)') -" \
         "install a CUDA build of torch and run this on a GPU machine" >&2
    exit 2
fi
"$PY" - <<'EOF'
import torch, transformers
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, transformers {transformers.__version__}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv

echo "== 1. CPU == device and device-path tests"
# -rs lists skips; a skipped CUDA test means the device was not used: fail
# (the same tests' forced-torch-path variants on CPU and the kernel tests run in CI)
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/algorithms/test_cuda_paths.py tests/algorithms/test_fused.py \
    tests/observers/test_device_path.py tests/observers/test_stacked.py \
    -k "cuda or bank or deferred or sees" | tee "$OUT/tests.txt"
if grep -q "SKIPPED.*no CUDA" "$OUT/tests.txt"; then
    echo "gpu_check: CUDA tests were skipped" >&2
    exit 1
fi

echo "== 2. the fused count kernel against the torch operations (one staged group, 8B geometry)"
timeout 60 "$PY" benchmarks/bench_fused.py | tee "$OUT/bench_fused.jsonl"

echo "== 3. 8B-geometry calibration and decode benchmark"
# shellcheck disable=SC2086
timeout 420 "$PY" benchmarks/bench_gpu.py ${GPU_CHECK_BENCH:-} | tee "$OUT/bench_gpu.jsonl"

echo "gpu_check: all steps passed; outputs in $OUT"
