"""A cache of the adaptive controller's start-up calibration (the runners' cost tables).

Timing the target and the draft at a few batch sizes takes seconds on a CPU; the result only
depends on the machine, the models, their dtype / quantization, the thread count and the
code. So the tables are saved under a key made of those, in
`$SPECDEC_CACHE_DIR/calibration/<hash>.json` (default `~/.cache/specdec/calibration`), and a
second start with the same key reuses them. `SPECDEC_RECALIBRATE=1` forces a new measurement.

A stale table costs speed, never correctness (the output is the target's either way), and
live steps keep refining the tables after the start.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile

import torch

import specdec

# 2: the server steps on the thread that loaded it (one OpenMP team); 3: int4 decode and verify
# steps on the CPU run the fused decoder stack (specdec/kernels/decoder_cpu.py); 4: so do its
# prefill chunks (the catch-up costs the tables hold)
CALIBRATION_VERSION = 4


def cache_dir() -> str:
    root = os.environ.get("SPECDEC_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "specdec")
    return os.path.join(root, "calibration")


def machine_id(device: torch.device) -> dict:
    """What makes one machine time differently from another."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "arch": platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def model_id(path: str) -> dict:
    """The model's identity: its manifest's weight hash, else its files' sizes and mtimes."""
    from specdec.model import store
    from specdec.model.weights import safetensors_files

    manifest = store.read_manifest(path)
    if manifest is not None:
        return {"path": os.path.abspath(path), "files": {
            name: entry["xxh3_128"] for name, entry in manifest["files"].items()
            if name.endswith(".safetensors")}}
    return {"path": os.path.abspath(path), "files": {
        os.path.basename(f): [os.path.getsize(f), os.stat(f).st_mtime_ns]
        for f in safetensors_files(path)}}


def calibration_key(device: torch.device, models: dict[str, dict],
                    token_counts: dict[str, list[int]], block_size: int) -> dict:
    """models: role ("target", "draft") -> {"path", "dtype", "quantization"}."""
    from specdec.kernels import decoder_cpu, q4_cpu
    from specdec.model import quant

    return {
        "version": CALIBRATION_VERSION, "specdec": specdec.__version__,
        # NOTE: OpenMP's wait policy moves a CPU step by up to 40 % (spinning workers against
        # sleeping ones, specdec/kernels/q4_cpu.py DYNAMIC_SPLIT): costs measured under one
        # policy mislead the controller under another.
        "openmp": {name: os.environ.get(name) for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "q4_dynamic_split": q4_cpu.DYNAMIC_SPLIT,
        "cpu_decoder": decoder_cpu.enabled(),
        "quant_format": getattr(quant, "FORMAT_VERSION", None),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": machine_id(device), "block_size": block_size,
        "models": {role: {**model_id(m["path"]), "dtype": str(m["dtype"]),
                          "quantization": m["quantization"],
                          **({"tensor_parallel_size": m["tensor_parallel_size"]}
                             if m.get("tensor_parallel_size", 1) > 1 else {})}
                   for role, m in models.items()},
        "token_counts": token_counts,
    }


def _file(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return os.path.join(cache_dir(), f"{digest}.json")


def load(key: dict) -> dict[str, dict[int, float]] | None:
    """The saved cost tables for `key` (role -> {num_tokens: seconds}), or None."""
    if os.environ.get("SPECDEC_RECALIBRATE") == "1":
        return None
    try:
        with open(_file(key)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    if saved.get("key") != json.loads(json.dumps(key)):
        return None  # a hash collision or a hand-edited file: measure again
    try:
        return {role: {int(n): float(s) for n, s in table.items()}
                for role, table in saved["tables"].items()}
    except (AttributeError, TypeError, ValueError):
        return None


def save(key: dict, tables: dict[str, dict[int, float]]) -> str | None:
    """Write the tables atomically; returns the file, or None if the cache is not writable."""
    path = _file(key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "tables": {role: {str(n): s for n, s in table.items()}
                                              for role, table in tables.items()}}, f)
        os.replace(tmp, path)
    except OSError:
        return None
    return path
