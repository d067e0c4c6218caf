#!/usr/bin/env bash
# The CPU benchmark runs behind docs/BENCHMARKS.md, in one go (about 40 minutes on 2 cores).
# Results land in bench/results/ (JSON, PNG); logs in $LOGS (default /tmp/specdec-bench).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOGS=${LOGS:-/tmp/specdec-bench}
PORT=${PORT:-8011}
mkdir -p bench/results "$LOGS"

lat() { $PY bench/latency.py --pair qwen --dataset code --num-prompts 5 --max-tokens 96 \
          --threads 2 --k 5 --draft-quantization int4 "$@"; }
lat --dtype float32 --draft-dtype float32 --systems hf,hf-assisted,ours,ours-draft \
    --output bench/results/latency-qwen-code-fp32.json 2>&1 | tee "$LOGS/lat-fp32.log" | tail -8
lat --dtype bfloat16 --draft-dtype float32 --systems hf,hf-assisted,ours,ours-draft,ours-ngram \
    --output bench/results/latency-qwen-code-bf16.json 2>&1 | tee "$LOGS/lat-bf16.log" | tail -9

serve_run() {  # label, concurrency, prompts, extra server flags...
  local label=$1 conc=$2 n=$3; shift 3
  .venv/bin/specdec serve --config configs/qwen2.5-coder-1.5b+0.5b.toml --port "$PORT" "$@" \
      > "$LOGS/server-$label-$conc.log" 2>&1 &
  local pid=$!
  for _ in $(seq 240); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
  $PY bench/serve.py --base-url "http://127.0.0.1:$PORT" --dataset code --num-prompts "$n" \
      --max-tokens 128 --max-concurrency "$conc" --label "$label" --disable-tqdm \
      --output "bench/results/serve-qwen-$label-c$conc.json" 2>&1 | tail -25
  kill -TERM "$pid"; wait "$pid"
}
for conc in 1 16; do
  n=$([ "$conc" = 1 ] && echo 6 || echo 32)
  serve_run spec "$conc" "$n"
  serve_run no-spec "$conc" "$n" --spec.method none
done
$PY bench/plot.py bench/results/serve-qwen-*.json -o bench/results/serve-qwen.png
