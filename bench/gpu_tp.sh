#!/usr/bin/env bash
# bench/gpu_check.sh's tensor-parallel section: TP=2 against TP=1 (NCCL, cuda:0 + cuda:1) with
# bench/gpu_tp.py, only when at least two CUDA devices are visible (else it says so, exit 0).
# Writes $OUT/gpu_tp.txt and $OUT/gpu_tp.json; exits with gpu_tp.py's status (1: an argmax
# disagreed in float32) or 124 on its time limit.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d /tmp/specdec_gpu.XXXXXX)}"
PY="${PYTHON:-python3}"
n=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${n:-0}" -lt 2 ]; then
  echo "== tensor parallel: skipped ($n CUDA device(s) visible, TP=2 needs 2)"
  exit 0
fi
echo "== bench/gpu_tp.py: TP=2 vs TP=1 on $n devices (limit 240 s)"
rc=0
for dtype in float32 bfloat16; do
  timeout -s INT 120 "$PY" bench/gpu_tp.py --device cuda --shape qwen2.5-1.5b --dtype "$dtype" \
      --out "$OUT/gpu_tp_$dtype.json" >> "$OUT/gpu_tp.txt" 2>&1
  r=$?; [ "$rc" = 0 ] && rc=$r
done
grep -v "Writing model shards" "$OUT/gpu_tp.txt" | tail -n 20
echo "gpu_tp exit code: $rc"
exit "$rc"
