"""The GPU benchmark runs on the CPU first (`--smoke`, tiny shapes), so a broken section is found
here and never costs a GPU lease; and the CUDA start-up checks fail loudly, never silently."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gpu_bench_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_bench.json"
    proc = subprocess.run([sys.executable, "bench/gpu_bench.py", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    sections = {"env", "copy_bandwidth", "kernels", "decode_batch1", "verify_steps", "spec_e2e",
                "host_syncs", "profile"}
    assert sections <= set(results)
    assert {name: results[name].get("error") for name in sections} == dict.fromkeys(sections)
    assert results["failures"] == []
    e2e = results["spec_e2e"]
    assert e2e["float32_greedy_equal"] is True
    runs = e2e["exact_float32"]["runs"]
    assert set(runs) == {"no_spec", "draft_copy_k4", "draft_0.5b_k4", "draft_0.5b_adaptive",
                         "ngram_k4"}
    assert all(isinstance(r, dict) and r["tokens"] == 16 for r in runs.values()), runs
    assert runs["draft_copy_k4"]["acceptance"] == 1.0  # the target drafting for itself
    ragged = results["verify_steps"]["ragged"]  # padded ragged windows (graphs on CUDA)
    assert ragged["window_lens"] == [1, 5, 3, 2] and ragged["eager_ms"] > 0


def test_compare_greedy_reports_the_near_tie_rule():
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_bench import compare_greedy

    top2 = [(0.0, [(7, -0.1), (8, -2.0)]), (0.0, [(3, -0.50), (4, -0.55)])]
    report = compare_greedy({"no_spec": [7, 3], "a": [7, 3], "b": [7, 4], "c": [8, 3]},
                            top2, "bfloat16")
    assert report["a"] == {"equal": True}
    assert report["b"]["first_difference"] == 1 and report["b"]["near_tie"] is True
    assert report["c"]["first_difference"] == 0 and report["c"]["near_tie"] is False
    assert compare_greedy({"no_spec": [7, 3], "b": [7, 4]}, top2, "float32")["b"][
        "near_tie"] is False  # 0.05 is a tie in bf16, a bug in float32


def test_cuda_without_kernels_is_a_start_up_error():
    """device = cuda with device.kernels = "cupy" (the default) must fail before loading
    weights, naming the way out; never a silent torch fallback."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the kernels may well load")
    from specdec.core.config import from_dict
    from specdec.engine import Engine

    with pytest.raises(RuntimeError, match='device.kernels = "torch"'):
        Engine(from_dict({"model": {"path": "/nonexistent"}, "device": {"device": "cuda"}}))


def test_kernels_setting_is_validated():
    from specdec.core.config import ConfigError, from_dict

    assert from_dict({"device": {"kernels": "torch"}}).device.kernels == "torch"
    with pytest.raises(ConfigError, match="device.kernels"):
        from_dict({"device": {"kernels": "triton"}})


def test_cpu_tensors_never_dispatch_to_cupy():
    from specdec.kernels import ops

    assert ops._use_kernels(torch.zeros(1), 64, True) is False


def test_gpu_check_stops_at_the_preflight_without_kernels(tmp_path):
    """On a machine without working CuPy kernels the check exits 2 after the preflight, with
    the reason, instead of spending the lease measuring the torch fallback."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "SPECDEC_GPU_WHEELS": str(tmp_path / "none")}
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "PREFLIGHT FAILED: torch.cuda.is_available() is False" in (
        tmp_path / "preflight.txt").read_text()
    assert not (tmp_path / "pytest_gpu.txt").exists()


def test_gpu_bench_reports_what_the_gpu_check_must(tmp_path):
    """The report has the fields the GPU targets are judged on: share of the bandwidth bound,
    draft/target step ratio, a profiler table."""
    out = tmp_path / "gpu_bench.json"
    proc = subprocess.run([sys.executable, "bench/gpu_bench.py", "--smoke", "--out", str(out),
                           "--only", "env,copy_bandwidth,decode_batch1,profile"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    decode = results["decode_batch1"]
    assert 0 < decode["qwen2.5-coder-1.5b"]["share_of_bound"]
    assert decode["draft_step_over_target_step"] > 0
    assert len(results["profile"]["top"]) >= 5
