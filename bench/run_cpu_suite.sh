#!/usr/bin/env bash
# The CPU benchmark runs behind docs/BENCHMARKS.md, in one go (about an hour on 2 cores).
# Results land in bench/results/ (JSON, PNG); logs in $LOGS (default /tmp/specdec-bench).
# Nothing else should run on the machine meanwhile: 2 cores, and every number is a timing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOGS=${LOGS:-/tmp/specdec-bench}
PORT=${PORT:-8011}
R=bench/results
mkdir -p "$R" "$LOGS"

# ---- batch 1 (bench/latency.py): the Qwen pair, then SmolLM2
lat() { $PY bench/latency.py --pair qwen --threads 2 --k 5 --draft-quantization int4 "$@"; }
lat --dataset code --num-prompts 5 --max-tokens 96 --dtype bfloat16 --draft-dtype float32 \
    --systems hf,hf-assisted,ours,ours-draft,ours-ngram \
    --output "$R/latency-qwen-code-bf16.json" 2>&1 | tee "$LOGS/lat-bf16.log" | tail -9
lat --dataset mtbench --num-prompts 8 --max-tokens 96 --dtype bfloat16 --draft-dtype float32 \
    --systems hf,hf-assisted,ours,ours-draft \
    --output "$R/latency-qwen-mtbench-bf16.json" 2>&1 | tee "$LOGS/lat-mtbench.log" | tail -8
lat --dataset code --num-prompts 5 --max-tokens 96 --dtype float32 --draft-dtype float32 \
    --systems hf,hf-assisted,ours,ours-draft \
    --output "$R/latency-qwen-code-fp32.json" 2>&1 | tee "$LOGS/lat-fp32.log" | tail -8
$PY bench/latency.py --pair smollm2 --dataset code --num-prompts 8 --max-tokens 128 --threads 2 \
    --dtype float32 --k 4 --systems hf,hf-ngram,ours,ours-ngram \
    --output "$R/latency-smollm2-code-fp32.json" 2>&1 | tee "$LOGS/lat-smollm2.log" | tail -8

# ---- serving (bench/serve.py against `specdec serve`, the default config)
serve_run() {  # dataset, label, concurrency, prompts, extra server flags...
  local dataset=$1 label=$2 conc=$3 n=$4; shift 4
  .venv/bin/specdec serve --config configs/qwen2.5-coder-1.5b+0.5b.toml --port "$PORT" "$@" \
      > "$LOGS/server-$dataset-$label-$conc.log" 2>&1 &
  local pid=$!
  for _ in $(seq 240); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
  $PY bench/serve.py --base-url "http://127.0.0.1:$PORT" --dataset "$dataset" --num-prompts "$n" \
      --max-tokens 128 --max-concurrency "$conc" --label "$label" --disable-tqdm \
      --output "$R/serve-qwen-$dataset-$label-c$conc.json" 2>&1 | tail -25
  kill -TERM "$pid"; wait "$pid"
}
for dataset in code mtbench; do
  for conc in 1 4 16; do
    n=$((conc == 1 ? 6 : conc == 4 ? 12 : 32))
    serve_run "$dataset" spec "$conc" "$n" 2>&1 | tee -a "$LOGS/serve.log"
    serve_run "$dataset" no-spec "$conc" "$n" --spec.method none 2>&1 | tee -a "$LOGS/serve.log"
  done
  $PY bench/plot.py "$R"/serve-qwen-"$dataset"-*.json -o "$R/serve-qwen-$dataset.png"
done
