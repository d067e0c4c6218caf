#!/usr/bin/env bash
# One-call GPU check (< 8 minutes on one H100): GPU tests, then the GPU benchmark.
# Installs nothing. Writes pytest output, the bench log and gpu_bench.json under $OUT if set.
#   bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d /tmp/specdec_gpu.XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__)" || true

echo "== pytest tests/gpu (limit 200 s)"
timeout 200 "$PY" -m pytest tests/gpu -q -p no:cacheprovider -rfEs --durations=5 \
    > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest exit code: $?" | tee -a "$OUT/pytest_gpu.txt"
tail -n 60 "$OUT/pytest_gpu.txt"

echo "== bench/gpu_bench.py (budget 210 s, limit 250 s)"
timeout 250 "$PY" bench/gpu_bench.py --budget 210 --out "$OUT/gpu_bench.json" \
    > "$OUT/gpu_bench.txt" 2>&1
echo "bench exit code: $?" | tee -a "$OUT/gpu_bench.txt"
grep -v "Writing model shards" "$OUT/gpu_bench.txt" | tail -n 60
echo "== results under $OUT"
