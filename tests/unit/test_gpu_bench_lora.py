"""The GPU benchmark's LoRA section (`--only lora`, run by bench/gpu_check.sh on its own) runs on
the CPU first with tiny shapes, so a broken section never costs a GPU lease."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gpu_bench_lora_section_smoke(tmp_path):
    out = tmp_path / "lora.json"
    proc = subprocess.run([sys.executable, "bench/gpu_bench.py", "--smoke", "--only", "lora",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"lora", "failures"} and results["failures"] == []
    lora = results["lora"]
    assert "error" not in lora
    assert {(r["proj"], r["mode"]) for r in lora["rows"]} == {
        (p, m) for p in ("qkv", "gate_up", "down") for m in ("bgmv", "sgmv")}
    assert all(r["rel_err"] <= 1e-4 for r in lora["rows"])
    assert set(lora["decode_step"]) == {"eager_base_ms", "eager_4_adapters_ms"}
