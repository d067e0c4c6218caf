#!/usr/bin/env bash
# One-call GPU check (about 5 minutes on one H100/H200): preflight, GPU tests, GPU benchmark.
# Exits 2 when the preflight fails (CuPy cannot compile or load a kernel), else with the first
# non-zero status of the tests and the benchmark. Writes under $OUT (if set; else a temp dir):
#   preflight.txt, pytest_gpu.txt, junit_gpu.xml, gpu_bench.txt, gpu_bench.json (rewritten after
#   every benchmark section, so a time-out still leaves the finished sections),
#   gpu_bench_lora.txt, gpu_bench_lora.json (the LoRA section, run on its own); with two or more
#   CUDA devices also gpu_tp.txt and gpu_tp_{float32,bfloat16}.json (bench/gpu_tp.sh: TP=2).
# Packages the device lacks (orjson, structlog, gguf) are installed from .gpu_wheels/ when
# present: fill it here first with `bash bench/gpu_wheels.sh` and carry it.
#   bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d /tmp/specdec_gpu.XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD"
status=0
keep() { [ "$status" = 0 ] && status=$1; return 0; }

# CuPy 14 compiles with NVRTC and needs the CUDA headers: find a toolkit or pip's nvidia headers.
if [ -z "${CUDA_PATH:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-13* /usr/local/cuda-12* /opt/cuda; do
    if [ -f "$d/include/cuda_runtime.h" ]; then export CUDA_PATH="$d"; break; fi
  done
fi
if [ -z "${CUDA_PATH:-}" ]; then
  CUDA_PATH=$("$PY" - <<'PYEOF'
import glob, os, site
for root in site.getsitepackages():
    for header in sorted(glob.glob(os.path.join(root, "nvidia", "**", "include", "cuda_runtime.h"),
                                   recursive=True)):
        print(os.path.dirname(os.path.dirname(header)))
        raise SystemExit
PYEOF
)
  [ -n "$CUDA_PATH" ] && export CUDA_PATH || unset CUDA_PATH
fi
echo "== CUDA_PATH=${CUDA_PATH:-unset}"
WHEELS="${SPECDEC_GPU_WHEELS:-.gpu_wheels}"
if [ -d "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl \
    || echo "warning: installing $WHEELS failed"
fi
# The server and the GGUF reader import these; there is no fallback in the code.
if ! "$PY" -c "import orjson, structlog, gguf" 2>/dev/null; then
  echo "orjson, structlog or gguf is missing: run bash bench/gpu_wheels.sh here and carry .gpu_wheels"
  exit 2
fi
echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

echo "== preflight (limit 120 s)"
timeout -s INT 120 "$PY" bench/gpu_preflight.py 2>&1 | tee "$OUT/preflight.txt"
pre=${PIPESTATUS[0]}
if [ "$pre" != 0 ]; then
  echo "preflight exit code: $pre: not measuring a fallback; fix the kernels first"
  exit 2
fi

echo "== pytest tests/gpu (limit 200 s, 60 s per test)"
timeout_flag=""
"$PY" -c "import pytest_timeout" 2>/dev/null && timeout_flag="--timeout=60"
timeout -s INT 200 "$PY" -m pytest tests/gpu tests/unit/test_gpu_bench_smoke.py -q \
    -p no:cacheprovider -rfEs --durations=10 $timeout_flag --junitxml="$OUT/junit_gpu.xml" \
    > "$OUT/pytest_gpu.txt" 2>&1
rc=$?; keep $rc
echo "pytest exit code: $rc" | tee -a "$OUT/pytest_gpu.txt"
tail -n 40 "$OUT/pytest_gpu.txt"

echo "== bench/gpu_bench.py (budget 200 s, limit 240 s)"
timeout -s INT 240 "$PY" bench/gpu_bench.py --budget 200 --out "$OUT/gpu_bench.json" \
    > "$OUT/gpu_bench.txt" 2>&1
rc=$?; keep $rc
echo "bench exit code: $rc" | tee -a "$OUT/gpu_bench.txt"
grep -v "Writing model shards" "$OUT/gpu_bench.txt" | tail -n 60
# -- LoRA (issue 16): the kernels at real projection sizes against the reference, and a decode
# step on 4 adapters vs the base; its own run, so the main benchmark's budget is untouched.
echo "== bench/gpu_bench.py --only lora (budget 60 s, limit 90 s)"
timeout -s INT 90 "$PY" bench/gpu_bench.py --only lora --budget 60 \
    --out "$OUT/gpu_bench_lora.json" > "$OUT/gpu_bench_lora.txt" 2>&1
rc=$?; keep $rc
echo "lora bench exit code: $rc" | tee -a "$OUT/gpu_bench_lora.txt"
grep -v "Writing model shards" "$OUT/gpu_bench_lora.txt" | tail -n 16
# -- end LoRA

# Tensor parallelism (TP=2 vs TP=1): its own script, a no-op with fewer than two devices.
OUT="$OUT" PYTHON="$PY" bash bench/gpu_tp.sh; keep $?
echo "== results under $OUT; exit $status"
exit "$status"
